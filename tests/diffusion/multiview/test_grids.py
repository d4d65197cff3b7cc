"""The sampler's images reach the rewards (ImagesForRewards / attach_images), the tripwire metrics, view grids by hand,
and the grid callback's fixed-noise sampling that leaves the training RNG untouched. A real DiffusionSamplerPolicy
on a tiny MultiviewUNet with real MiniLM caption rows."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.policies.diffusion import ClassifierFreeGuidance, DiffusionSamplerPolicy
from common.sampling.gaussian_step import DDIMStep
from diffusion.multiview.data import MultiviewPrompts
from diffusion.multiview.grids import ViewGridCallback, save_grid_png, view_grid
from diffusion.multiview.methods import ImagesForRewards, ImageTripwires, attach_images, batch_images
from diffusion.multiview.model import CaptionEncoder, MultiviewUNet
from diffusion.multiview.pretrain import PretrainConfig
from diffusion.multiview.rewards import AttributeAccuracy, JointConsistency, ViewAlignment


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    net = MultiviewUNet(views=4, size=16, channels=(16, 32))
    return DiffusionSamplerPolicy(net, DDIMStep(PretrainConfig().scheduler("ddim"), 2, 1.0),
                                  CaptionEncoder(disk_cache=False), (12, 16, 16), guidance=ClassifierFreeGuidance(3.0),
                                  condition_kwarg="cond")


@pytest.fixture(scope="module")
def prompts():
    d = MultiviewPrompts()
    d.setup()
    return d.val_set[:2]


def test_images_reach_the_rewards(policy, prompts):
    torch.manual_seed(1)
    batch = policy.rollout(prompts, 2)
    assert batch.inputs["images"].shape == (4, 12, 16, 16) and batch.completions == []
    out = ImagesForRewards(views=4).after_rollout(None, batch)
    assert len(out.completions) == 4 and all(c.count(" | ") == 3 for c in out.completions)
    assert out.samples[0]["prompt"] == prompts[0]["prompt"] and out.samples[2]["prompt"] == prompts[1]["prompt"]
    assert torch.equal(out.samples[3]["images"], batch.inputs["images"][3].view(4, 3, 16, 16))
    assert "images" not in prompts[0]  # the data module's records are not touched
    for fn in (ViewAlignment(), JointConsistency(), AttributeAccuracy()):
        r = fn(out.completions, out.samples)
        assert r.shape == (4,) and torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
    metrics = ImageTripwires(views=4).after_update(None, out)
    assert set(metrics) == {"hf_energy", "grid_energy", "group_diversity"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in metrics.values())
    assert metrics["group_diversity"] > 0  # two different noises per prompt
    with pytest.raises(ValueError, match="inputs\\['images'\\]"):
        attach_images(batch, views=1)


def test_view_grid_by_hand(tmp_path):
    imgs = torch.zeros(2, 3, 3, 2, 2)
    imgs[1, 2] = 0.5  # sample 1, view 2
    g = view_grid(imgs, pad=1)
    assert g.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert (g[:, 4:6, 7:9] == 0.5).all() and (g[:, 1:3, 1:3] == 0).all() and (g[:, 0] == 1).all() and (g[:, :, 3] == 1).all()
    path = save_grid_png(imgs, tmp_path / "g.png", scale=2)
    from PIL import Image

    back = np.asarray(Image.open(path))
    assert back.shape == (14, 20, 3) and (back[8:12, 14:18] == 128).all()


def test_grid_callback_fixed_noise_and_rng(policy, prompts, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    cb = ViewGridCallback(every_n_steps=5, rows=2, seed=3)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = cb.grid_images(policy, prompts)
    assert torch.equal(torch.get_rng_state(), before)  # the training stream is untouched
    assert a.shape == (2, 4, 3, 16, 16) and torch.equal(a, cb.grid_images(policy, prompts))
    logger = TensorBoardLogger(str(tmp_path), name="t")
    trainer = SimpleNamespace(global_step=10, logger=logger, datamodule=SimpleNamespace(val_set=prompts, train_set=[]),
                              is_global_zero=True)
    cb.log_grid(trainer, SimpleNamespace(policy=policy))
    assert (tmp_path / "t" / "version_0" / "views" / "step_000010.png").exists()
    trainer.global_step = 11
    cb.log_grid(trainer, SimpleNamespace(policy=policy))
    assert not (tmp_path / "t" / "version_0" / "views" / "step_000011.png").exists()
    with pytest.raises(ValueError, match="every_n_steps"):
        ViewGridCallback(every_n_steps=-1)
