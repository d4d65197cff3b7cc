"""SePPO parts: the flipper's sign on hand cases, the loss by hand, the checkpoint ring's save / draw / load and its
round trip through a checkpoint file loaded with weights_only=True."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.losses.aggregate import Normaliser
from diffusion.multiview.seppo import CheckpointRing, SePPOLoss, aaf_sign, denoising_error, seppo_losses


def test_flipper_sign_hand_cases():
    e_w = torch.tensor([0.10, 0.30, 0.20, 0.20])
    r_w = torch.tensor([0.20, 0.10, 0.20, 0.21])
    # current fits the anchor better (or ties) -> +1 (reference sample is a loser); worse -> −1 (treated as a winner)
    assert aaf_sign(e_w, r_w).tolist() == [1.0, -1.0, 1.0, 1.0]
    assert aaf_sign(e_w, r_w, "indicator").tolist() == [1.0, 0.0, 1.0, 1.0]
    assert aaf_sign(e_w, r_w, "off").tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="flip"):
        aaf_sign(e_w, r_w, "maybe")


def test_seppo_loss_by_hand_and_its_gradient_direction():
    e_w, r_w = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    e_l, r_l = torch.tensor([0.40, 0.25]), torch.tensor([0.35, 0.20])
    sign = aaf_sign(e_w, r_w)  # [+1, −1]
    got = seppo_losses(e_w, r_w, e_l, r_l, sign, beta=2.0, num_timesteps=10)
    want = []
    for i, s in enumerate([1.0, -1.0]):
        inner = -2.0 * 10 * ((e_w[i] - r_w[i]) - s * (e_l[i] - r_l[i]))
        want.append(-math.log(1 / (1 + math.exp(-float(inner)))))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)
    half = seppo_losses(e_w, r_w, e_l, r_l, sign, beta=4.0, num_timesteps=10, half=True)
    torch.testing.assert_close(half, got)  # ½ · β=4 is β=2
    # the gradient lowers the winner's error and, for a loser (sign +1), raises the loser's error
    ew, el = e_w.clone().requires_grad_(True), e_l.clone().requires_grad_(True)
    seppo_losses(ew, r_w, el, r_l, sign, beta=2.0, num_timesteps=10).sum().backward()
    assert (ew.grad > 0).all()  # descent lowers e_θ(x^w)
    assert el.grad[0] < 0 and el.grad[1] > 0  # loser pushed away; flipped reference sample pulled in
    # equal current and reference -> log 2 per row
    z = torch.zeros(3)
    torch.testing.assert_close(seppo_losses(z, z, z, z, torch.ones(3)), torch.full((3,), math.log(2.0)))


def test_seppo_loss_normalises_over_the_minibatch_rows():
    g = torch.Generator().manual_seed(0)
    errs = torch.rand(6, 4, generator=g)
    mask = torch.ones(6, 3, dtype=torch.bool)
    lp = torch.zeros(6, 3)
    loss = SePPOLoss(beta=5.0, num_timesteps=10)
    whole = loss(lp, lp, torch.zeros(6), mask, seppo_errors=errs).loss
    norm = Normaliser.of(mask)
    parts = sum(loss(lp[s:s + 2], lp[s:s + 2], torch.zeros(2), mask[s:s + 2], normaliser=norm,
                     seppo_errors=errs[s:s + 2]).loss for s in range(0, 6, 2))
    assert abs(float(whole - parts)) < 1e-6
    with pytest.raises(ValueError, match="seppo_errors"):
        loss(lp, lp, torch.zeros(6), mask)


def test_denoising_error_is_a_mean_over_pixels():
    eps = torch.zeros(2, 3, 4, 4)
    pred = torch.ones(2, 3, 4, 4)
    pred[1] *= 2
    assert denoising_error(pred, eps).tolist() == [1.0, 4.0]


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1))


def test_ring_saves_every_n_updates_overwrites_the_oldest_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = net()
    params = list(model.parameters())
    ring = CheckpointRing(size=3, every=2)
    ring.bind(params)
    ring.save(params)  # θ_0
    snapshots = [torch.nn.utils.parameters_to_vector(params).detach().clone()]
    for update in range(1, 9):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * update)
        if ring.step(params):
            snapshots.append(torch.nn.utils.parameters_to_vector(params).detach().clone())
    # saves at updates 2, 4, 6, 8 after θ_0: 5 saves in a ring of 3 holds the last three (6, 8 and 4 in slot order)
    assert int(ring.saved) == 5 and ring.held == 3 and int(ring.updates) == 8
    assert ring.ages.tolist() == [6, 8, 4]
    for slot, snap in zip([0, 1, 2], [snapshots[3], snapshots[4], snapshots[2]]):
        torch.testing.assert_close(ring.slots[slot], snap, rtol=0, atol=0)
    # round trip through a checkpoint file loaded with weights_only=True, into a fresh ring bound to the same shapes
    path = tmp_path / "ring.ckpt"
    torch.save({"state_dict": ring.state_dict()}, path)
    fresh = CheckpointRing(size=3, every=2)
    fresh.bind(list(net().parameters()))
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    for name, t in ring.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    # the reference network gets exactly checkpoint j
    ref = net()
    fresh.load_into(1, list(ref.parameters()))
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(ref.parameters()), snapshots[4], rtol=0, atol=0)
    # draws are uniform over the held checkpoints and follow the (checkpointed) torch RNG
    torch.manual_seed(5)
    a = [fresh.draw() for _ in range(300)]
    torch.manual_seed(5)
    assert a == [fresh.draw() for _ in range(300)]
    assert set(a) == {0, 1, 2} and all(60 < a.count(j) < 140 for j in range(3))
    with pytest.raises(ValueError, match="j must be"):
        fresh.load_into(3, list(ref.parameters()))


def test_ring_before_any_save_and_bad_arguments():
    ring = CheckpointRing(size=2, every=1)
    with pytest.raises(ValueError, match="no checkpoint"):
        ring.draw()
    ring.bind(list(net().parameters()))
    ring.save(list(net().parameters()))
    assert ring.held == 1 and ring.draw() == 0  # until the first save, the reference is θ_0
    with pytest.raises(ValueError, match="size"):
        CheckpointRing(size=0)
    with pytest.raises(ValueError, match="bind"):
        ring.save([nn.Parameter(torch.zeros(3))])


def test_seppo_rollout_samples_with_the_reference_and_restores_the_weights(one_thread):
    from diffusers import DDIMScheduler

    from common.advantages.group import GRPO
    from common.loop import Loop
    from common.policies.diffusion import DiffusionSamplerPolicy, HashPromptEmbedding
    from common.sampling.gaussian_step import DDIMStep
    from diffusion.multiview.model import TEXT_DIM, MultiviewUNet
    from diffusion.multiview.seppo import SePPO

    torch.manual_seed(0)
    net = MultiviewUNet(views=1, size=8, channels=(16, 16), head_dim=8, max_tokens=2)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False, steps_offset=1)
    pol = DiffusionSamplerPolicy(net, DDIMStep(sched, 2, eta=1.0), HashPromptEmbedding((3, TEXT_DIM)), (3, 8, 8),
                                 condition_kwarg="cond")
    method = SePPO(ring=CheckpointRing(size=2, every=1), reference="latest")
    loop = Loop(pol, lambda b: b, GRPO(), SePPOLoss(beta=5.0), methods=[method], group_size=1)
    params = pol.trainable_parameters()
    theta0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    with torch.no_grad():
        for p in params:
            p.add_(0.05)  # the current weights differ from θ_0, the ring's only checkpoint
    current = torch.nn.utils.parameters_to_vector(params).detach().clone()
    prompt = [{"prompt": "a red cube", "shape": "cube", "body": "red", "accent": "blue"}]
    torch.manual_seed(1)
    batch = method.rollout(loop, prompt, 1)
    assert torch.equal(torch.nn.utils.parameters_to_vector(params), current)  # restored exactly
    assert torch.equal(torch.nn.utils.parameters_to_vector(pol.reference.parameters()), theta0)  # θ_ref = θ_0
    with torch.no_grad():  # the loser was sampled by θ_0: the same chain as θ_0's own sampler from the row's seed
        torch.nn.utils.vector_to_parameters(theta0, params)
        again = pol.sample_batch(batch.inputs["cond"], batch.seeds)
        torch.nn.utils.vector_to_parameters(current, params)
    assert torch.equal(again.inputs["images"], batch.inputs["images"])
    assert batch.inputs["winner"].shape == (1, 3, 8, 8)
    errs = method.errors(pol, batch)  # (1, 4): e_θ(x^w), e_ref(x^w), e_θ(x^ref), e_ref(x^ref)
    assert errs.shape == (1, 4) and errs.requires_grad and bool(torch.isfinite(errs).all())
    assert float(errs[0, 0]) != float(errs[0, 1])  # current and reference differ
