"""Multiview rewards on hand-built images: the true render scores the maximum, wrong colours and inconsistent view
sets score what the formulas give by hand, degenerate images give finite values, and the tripwires."""

import math

import numpy as np
import pytest
import torch

from diffusion.multiview.render import (COLOURS, PREFERRED, ObjectSpec, all_objects, object_index, render,
                                        render_batch)
from diffusion.multiview.rewards import (AttributeAccuracy, JointConsistency, PreferenceIoU, ViewAlignment,
                                         attribute_accuracy, detect_attributes, grid_energy, group_diversity,
                                         high_frequency_energy, joint_consistency, view_consistency, view_fidelity)

RED_CUBE = ObjectSpec("cube", "red", "blue")
GREEN_CUBE = ObjectSpec("cube", "green", "blue")


def test_true_renders_score_the_maximum():
    imgs = torch.from_numpy(render_batch(all_objects()))
    rows = torch.arange(120)
    assert torch.equal(view_fidelity(imgs, rows), torch.ones(120, 4))
    assert torch.allclose(joint_consistency(imgs), torch.ones(120))
    assert torch.equal(attribute_accuracy(imgs, rows), torch.ones(120))
    wrong_caption = (rows + 1) % 120  # same shape, another stripe or body colour
    assert (view_fidelity(imgs, (rows + 24) % 120) < 1).all()  # another shape: silhouettes differ
    assert (view_fidelity(imgs, wrong_caption) <= 1).all()


def test_wrong_colour_view_by_hand():
    red, green = render(RED_CUBE), render(GREEN_CUBE)
    imgs = torch.from_numpy(red.images.copy())[None]
    imgs[0, 2] = torch.from_numpy(green.images[2])  # view 2 of the green cube: same silhouette, same stripe
    row = torch.tensor([object_index(RED_CUBE)])
    dist = math.dist(COLOURS["red"], COLOURS["green"]) / math.sqrt(3)  # sqrt(2)/sqrt(3)
    fid = view_fidelity(imgs, row)[0]
    assert torch.allclose(fid, torch.tensor([1, 1, 1 - 0.5 * dist, 1]), atol=1e-6)
    # consistency: views 0, 1, 3 still imply the red cube at view 2, which the green view contradicts on its body
    # pixels (agreement 1 - dist) and agrees with on its stripe pixels; views 0, 1, 3 are implied exactly
    nb, ns = int((green.mask[2] & ~green.stripe[2]).sum()), int(green.stripe[2].sum())
    expect = (nb * (1 - dist) + ns) / (nb + ns)
    cons = view_consistency(imgs)[0]
    assert torch.allclose(cons, torch.tensor([1, 1, expect, 1]), atol=1e-6)
    assert joint_consistency(imgs)[0] < 1


def test_inconsistent_stripe_and_shape_score_lower():
    true = torch.from_numpy(render(RED_CUBE).images)[None]
    no_stripe = true.clone()
    no_stripe[0, 0] = torch.from_numpy(render(ObjectSpec("cube", "red", "blue")).images[2])  # a back view at view 0
    assert joint_consistency(no_stripe) < joint_consistency(true)
    mixed = true.clone()
    mixed[0, 1] = torch.from_numpy(render(ObjectSpec("cylinder", "red", "blue")).images[1])
    assert joint_consistency(mixed) < 1
    colours, shapes = detect_attributes(mixed)
    assert colours.tolist() == [[0, 0, 0, 0]] and shapes.tolist() == [[0, 2, 0, 0]]  # red; cube, cylinder, cube x2
    assert attribute_accuracy(mixed, torch.tensor([object_index(RED_CUBE)])).item() == 0.75


def test_degenerate_images_are_finite():
    grey = torch.full((2, 4, 3, 16, 16), 0.5)
    rows = torch.tensor([0, 50])
    assert torch.allclose(view_fidelity(grey, rows), torch.full((2, 4), 0.25))  # colour term 1/2 · sqrt(.75)/sqrt(3)
    nan = torch.full((2, 4, 3, 16, 16), float("nan"))
    for x in (grey, nan, torch.zeros_like(grey), torch.ones_like(grey)):
        for v in (view_fidelity(x, rows), joint_consistency(x), attribute_accuracy(x, rows)):
            assert torch.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()
    with pytest.raises(ValueError, match="images must be"):
        view_fidelity(torch.zeros(2, 3, 16, 16), rows)


def test_reward_functions_read_the_samples():
    objs = [RED_CUBE, ObjectSpec("cone", "yellow", "cyan")]
    imgs = torch.from_numpy(render_batch(objs)) * 2 - 1  # the model's [-1, 1]
    samples = [{"prompt": o.caption, "shape": o.shape, "body": o.body, "accent": o.accent, "images": x}
               for o, x in zip(objs, imgs)]
    assert torch.allclose(ViewAlignment()([""] * 2, samples), torch.ones(2))
    assert torch.allclose(JointConsistency()([""] * 2, samples), torch.ones(2))
    assert torch.allclose(AttributeAccuracy()([""] * 2, samples), torch.ones(2))
    assert ViewAlignment.name == "alignment" and JointConsistency.name == "consistency"
    with pytest.raises(ValueError, match="'images'"):
        ViewAlignment()([""], [{"shape": "cube", "body": "red", "accent": "blue"}])
    with pytest.raises(ValueError, match="'shape'"):
        ViewAlignment()([""], [{"images": imgs[0]}])
    # single view, the hidden preference: the preferred rendering scores 1, the canonical (smaller) one less
    pref = torch.from_numpy(render(RED_CUBE, azimuths=(0.0,), style=PREFERRED).images[0]) * 2 - 1  # (3, H, W)
    canon = torch.from_numpy(render(RED_CUBE, azimuths=(0.0,)).images[0]) * 2 - 1
    one = {"shape": "cube", "body": "red", "accent": "blue"}
    h = PreferenceIoU()([""] * 2, [{**one, "images": pref}, {**one, "images": canon}])
    assert h[0] == 1 and 0 < h[1] < 1


def test_tripwires_by_hand():
    flat = torch.full((3, 4, 3, 16, 16), 0.3)
    assert torch.equal(high_frequency_energy(flat), torch.zeros(3)) and torch.equal(grid_energy(flat), torch.zeros(3))
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((i + j) % 2).float().expand(3, 4, 3, 16, 16)
    assert torch.allclose(grid_energy(checker), torch.ones(3)) and torch.allclose(high_frequency_energy(checker), torch.ones(3))
    smooth = torch.sin(2 * math.pi * j / 16).float().expand(1, 1, 3, 16, 16)  # one cycle: the lowest frequency
    assert high_frequency_energy(smooth).item() < 1e-6
    base = torch.rand(4, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base[:1], base[:1] + 0.25, base[1:2].expand(2, -1, -1, -1, -1), base[3:]])  # groups 0, 0, 1, 1, 2
    div = group_diversity(x, torch.tensor([0, 0, 1, 1, 2]))
    assert torch.allclose(div, torch.tensor([0.25, 0.25, 0, 0, 0]), atol=1e-6)  # RMS distance of a pair; collapsed; single
