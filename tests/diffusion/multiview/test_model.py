"""The base multiview model: real MiniLM caption conditioning, forward shapes, classifier-free guidance's null
condition, a few pre-training steps lowering the denoising loss, and the on-disk cache round trip."""

import pytest
import torch

from diffusion.multiview.model import CaptionEncoder, MultiviewUNet, stack_views, unstack_views
from diffusion.multiview.pretrain import PretrainConfig, base_dir, pretrain, pretrained_base

TINY = dict(size=8, channels=(16, 32), steps=30, batch_size=16, lr=2e-3, warmup=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVLAB_CACHE", str(tmp_path))


@pytest.fixture(scope="module")
def encoder():
    return CaptionEncoder(max_tokens=12, disk_cache=False)


def test_caption_rows(encoder):
    cond = encoder(["a red cube with a blue stripe", "a blue cube with a red stripe", "a red cube with a blue stripe"])
    assert cond.shape == (3, 13, 384) and torch.equal(cond[0], cond[2])
    assert torch.allclose(cond[:, 0].norm(dim=-1), torch.ones(3), atol=1e-5)  # sentence rows: unit norm
    rows = cond[0, 1:].norm(dim=-1)
    assert torch.allclose(rows[:9], torch.ones(9), atol=1e-5) and (rows[9:] == 0).all()  # [CLS] 7 words [SEP], padding
    # the sentence vectors of swapped colours nearly coincide; the token rows tell them apart
    assert torch.cosine_similarity(cond[0, 0], cond[1, 0], dim=0) > 0.99
    assert (cond[0, 3] - cond[1, 3]).norm() > 0.1  # the 'red' / 'blue' token rows
    assert encoder([]).shape == (0, 13, 384)


def test_forward_shapes_and_null_condition(encoder):
    torch.manual_seed(0)
    m = MultiviewUNet(views=4, size=16, channels=(16, 32))
    x = torch.randn(3, 12, 16, 16)
    cond = encoder(["a red cube with a blue stripe", "a green cone with a cyan stripe", "a blue sphere with a red stripe"])
    eps = m(x, torch.tensor([0, 500, 999]), cond)
    assert eps.shape == (3, 12, 16, 16) and torch.isfinite(eps).all()
    assert m(x, 10, cond).shape == (3, 12, 16, 16)  # a scalar timestep
    null = m.null_cond(3)
    assert null.shape == (3, 13, 384)
    out_null = m(x, torch.tensor([5, 5, 5]), null)
    assert torch.isfinite(out_null).all() and not torch.allclose(out_null, m(x, torch.tensor([5, 5, 5]), cond))
    v = torch.randn(2, 4, 3, 16, 16)
    assert torch.equal(unstack_views(stack_views(v), 4), v) and torch.equal(stack_views(v)[:, 3:6], v[:, 1])
    single = MultiviewUNet(views=1, size=16, channels=(16, 32))
    assert single(torch.randn(2, 3, 16, 16), 3, cond[:2]).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="sample must be"):
        m(torch.randn(2, 3, 16, 16), 3, cond[:2])
    with pytest.raises(ValueError, match="cond must be"):
        m(x, 3, cond[:2])
    with pytest.raises(ValueError, match="channels must be"):
        MultiviewUNet(channels=(10, 20))


def test_pretraining_lowers_the_loss_and_caches(tmp_path):
    torch.set_num_threads(1)
    config = PretrainConfig(**TINY)
    model, record = pretrain(config, log=None)
    assert record["eval_loss_after"] < 0.8 * record["eval_loss_before"]  # the same fixed (x0, t, ε) set
    assert record["train_loss_last50"] < record["train_loss_first50"] or config.steps <= 50
    cached = pretrained_base(config, log=None)  # trains (same seed: same weights) and saves
    assert (base_dir(config) / "model.safetensors").exists()
    for a, b in zip(model.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)  # pre-training is deterministic under its seed
    again = pretrained_base(config, log=None)  # loaded, not retrained
    assert again.record == cached.record
    for a, b in zip(cached.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    other = PretrainConfig(**{**TINY, "seed": 1})
    assert other.key() != config.key()
    with pytest.raises(ValueError, match="style must be"):
        PretrainConfig(style="fancy")
    with pytest.raises(ValueError, match="views must be"):
        PretrainConfig(views=3)


def test_prediction_targets_by_hand(encoder):
    import dataclasses

    from diffusion.multiview.model import config_hash
    from diffusion.multiview.pretrain import denoising_loss

    torch.manual_seed(0)
    m = MultiviewUNet(views=1, size=8, channels=(16, 32))
    alphas = PretrainConfig().scheduler().alphas_cumprod
    x0, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 700])
    cond = encoder(["a red cube with a blue stripe", ""])
    assert (cond[1] == 0).all()  # the empty caption is the null condition
    a = alphas[t].view(-1, 1, 1, 1)
    out = m(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, cond)
    for kind, target in (("epsilon", eps), ("sample", x0), ("v_prediction", a.sqrt() * eps - (1 - a).sqrt() * x0)):
        assert torch.allclose(denoising_loss(m, alphas, x0, cond, t, eps, kind), (out - target).square().mean(), atol=1e-6)
    eps_cfg, x0_cfg = PretrainConfig(), PretrainConfig(prediction_type="sample")
    d = dataclasses.asdict(eps_cfg)
    del d["prediction_type"]
    assert eps_cfg.key() == config_hash(d) != x0_cfg.key()  # caches made before the field existed stay valid
    assert x0_cfg.scheduler("ddim").config.prediction_type == "sample"
