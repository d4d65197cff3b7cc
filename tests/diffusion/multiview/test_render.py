"""The multiview renderer: silhouettes and colours by hand, the stripe's views, determinism, bad input."""

import math

import numpy as np
import pytest

from diffusion.multiview.render import (AZIMUTHS, BACKGROUND, COLOURS, ELEVATION, YAW, ObjectSpec, Style, all_objects,
                                        from_model_space, object_index, random_style, render, render_batch, templates,
                                        to_model_space)


def pixel_centres(size):
    return (np.arange(size) + 0.5) / size * 2 - 1  # image-plane coordinates of the pixel centres, EXTENT = 1


def test_cube_from_four_azimuths_by_hand():
    r = render(ObjectSpec("cube", "red", "blue"), size=16)
    assert r.images.shape == (4, 3, 16, 16) and r.images.dtype == np.float32
    # Orthographic silhouette of the half-size-0.5 cube turned by 30 deg: half-width 0.5 (cos 30 + sin 30) along the
    # image's right axis, half-height 0.5 (cos e + sin e (|sin 30| + |cos 30|)) along its up axis, in every view
    # (the cube's 90-deg symmetry makes the four silhouettes identical).
    th, e = math.radians(YAW), math.radians(ELEVATION)
    hw = 0.5 * (math.cos(th) + math.sin(th))
    hh = 0.5 * (math.cos(e) + math.sin(e) * (abs(math.sin(th)) + abs(math.cos(th))))
    c = pixel_centres(16)
    cols = np.abs(c) < hw
    rows = np.abs(c) < hh  # symmetric about the centre
    for v in range(4):
        assert (r.mask[v].any(0) == cols).all()  # which columns hold the cube
        assert (r.mask[v].any(1) == rows).all()
        assert (r.mask[v] == r.mask[0]).all()
    # colours are exact: body red, stripe blue, background grey, nothing else
    red, blue, grey = np.array(COLOURS["red"]), np.array(COLOURS["blue"]), np.full(3, BACKGROUND)
    px = r.images.transpose(0, 2, 3, 1)  # (4, H, W, 3)
    assert (px[r.mask & ~r.stripe] == red).all() and (px[r.stripe] == blue).all() and (px[~r.mask] == grey).all()
    # the stripe faces views 0 and 1 (on the front face, columns differ); views 2, 3 see only its top end
    front = r.stripe.sum((1, 2))
    assert front[0] >= 10 and front[1] >= 6 and front[2] <= 4 and front[3] <= 4
    assert r.stripe[0].any(0).nonzero()[0].mean() != r.stripe[1].any(0).nonzero()[0].mean()
    assert not r.stripe[2, 6:].any() and not r.stripe[3, 6:].any()  # nothing below the top face from behind


def test_sphere_silhouette_is_the_disc():
    r = render(ObjectSpec("sphere", "green", "yellow"), size=32, style=Style(shift=(0.1, -0.2)))
    c = pixel_centres(32)
    disc = (c[None, :] - 0.1) ** 2 + (-c[:, None] + 0.2) ** 2 < 0.62 ** 2  # row 0 at the top: v = -c
    for v in range(4):
        assert (r.mask[v] == disc).all()


def test_saturation_and_scale():
    r = render(ObjectSpec("sphere", "red", "blue"), style=Style(saturation=0.5, scale=0.5), azimuths=(0.0,))
    body = r.images[0].transpose(1, 2, 0)[r.mask[0] & ~r.stripe[0]]
    assert np.allclose(body, [2 / 3, 1 / 6, 1 / 6])  # 0.5 (1, 0, 0) + 0.5 (1/3)
    c = pixel_centres(16)
    assert (r.mask[0] == ((c[None, :] ** 2 + c[:, None] ** 2) < 0.31 ** 2)).all()


def test_every_shape_and_determinism():
    objs = all_objects()
    assert len(objs) == 120 and len({o.caption for o in objs}) == 120
    assert objs[object_index(ObjectSpec("cone", "cyan", "red"))] == ObjectSpec("cone", "cyan", "red")
    a, b = render_batch(objs[::7]), render_batch(objs[::7])
    assert a.shape == (18, 4, 3, 16, 16) and (a == b).all()
    masks = templates()[1]
    assert masks.any((2, 3)).all()  # every object is visible in every view
    shapes = {o.shape: masks[i, 0] for i, o in enumerate(objs)}
    assert len({m.tobytes() for m in shapes.values()}) == 4  # the four silhouettes differ
    s1, s2 = random_style(np.random.default_rng(3)), random_style(np.random.default_rng(3))
    assert s1 == s2 and s1 != random_style(np.random.default_rng(4))
    assert (render(objs[0], style=s1).images == render(objs[0], style=s2).images).all()
    x = render(objs[5]).images
    assert np.allclose(from_model_space(to_model_space(x)), x)


def test_bad_input():
    with pytest.raises(ValueError, match="shape must be one of"):
        ObjectSpec("pyramid", "red", "blue")
    with pytest.raises(ValueError, match="accent must be one of"):
        ObjectSpec("cube", "red", "purple")
    with pytest.raises(ValueError, match="size must be"):
        render(ObjectSpec("cube", "red", "blue"), size=2)
    with pytest.raises(ValueError, match="kind must be"):
        random_style(np.random.default_rng(0), "wild")


def test_prompt_data_and_pretraining_batches():
    import torch

    from diffusion.multiview.data import MultiviewPrompts, RenderDataset, pretrain_batch, render_samples

    d = MultiviewPrompts(val_size=20, prompts_per_step=4, seed=3)
    d.setup()
    assert len(d.train_set) == 100 and len(d.val_set) == 20
    assert not {s["prompt"] for s in d.train_set} & {s["prompt"] for s in d.val_set}
    s = d.train_set[0]
    obj = ObjectSpec(s["shape"], s["body"], s["accent"])
    assert s["prompt"] == obj.caption and s["object"] == object_index(obj) and s["views"] == 4
    batch = d.next_prompts()
    assert len(batch) == 4 and all(b in d.train_set for b in batch)
    x, caps = pretrain_batch(7, 5)
    x2, caps2 = pretrain_batch(7, 5)
    assert x.shape == (5, 12, 16, 16) and torch.equal(x, x2) and caps == caps2
    rows = [object_index(o) for o in all_objects() if o.caption in caps]
    assert x.min() == -1 and x.max() == 1 and len(rows) >= 1
    assert torch.equal(x[0], torch.from_numpy(templates()[0][[o.caption for o in all_objects()].index(caps[0])]).flatten(0, 1) * 2 - 1)
    broad, _ = pretrain_batch(7, 5, views=1, style="broad")
    assert broad.shape == (5, 3, 16, 16) and not torch.equal(broad, pretrain_batch(8, 5, views=1, style="broad")[0])
    win = render_samples(d.val_set[:2], views=1, style="winner", seed=1)
    assert win.shape == (2, 1, 3, 16, 16) and torch.equal(win, render_samples(d.val_set[:2], views=1, style="winner", seed=1))
    img, cap = RenderDataset(10, style="jitter")[3]
    assert img.shape == (12, 16, 16) and cap == all_objects()[3].caption
    with pytest.raises(ValueError, match="views must be"):
        MultiviewPrompts(views=2)
    with pytest.raises(ValueError, match="'shape'"):
        render_samples([{"prompt": "x"}])
