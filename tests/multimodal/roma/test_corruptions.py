"""Corruptions: hand checks on small images, determinism under (seed, sample, step, view), box round trips."""

import math

import pytest
import torch

from multimodal.roma import corruptions as C


def delta(H=5, W=5, at=(2, 2), channels=1):
    x = torch.zeros(1, channels, H, W)
    x[..., at[0], at[1]] = 1.0
    return x


def test_blur_of_a_delta_is_the_outer_product_of_the_hand_computed_kernel():
    sigma = 0.5  # radius ceil(1.5) = 2; weights exp(-d^2/0.5): d=0 -> 1, d=1 -> e^-2, d=2 -> e^-8
    w = torch.tensor([math.exp(-8), math.exp(-2), 1.0, math.exp(-2), math.exp(-8)], dtype=torch.float64)
    w = w / w.sum()
    torch.testing.assert_close(C.gaussian_kernel1d(sigma), w)
    x = delta(4, 4, at=(1, 1))  # a 4x4 image, the delta at row 1, column 1
    out = C.gaussian_blur(x, torch.tensor([sigma]))[0, 0].double()
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            expected[i, j] = w[i - 1 + 2] * w[j - 1 + 2] if abs(i - 1) <= 2 and abs(j - 1) <= 2 else 0.0
    # the delta sits one pixel from the top/left edge, whose replicated rows/columns hold zeros: exactly w ⊗ w shifted
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # and the interior of a delta far from the edges is exactly w ⊗ w, mass 1
    big = C.gaussian_blur(delta(9, 9, at=(4, 4)), torch.tensor([sigma]))[0, 0].double()
    torch.testing.assert_close(big[2:7, 2:7], torch.outer(w, w), rtol=0, atol=1e-6)
    assert abs(float(big.sum()) - 1.0) < 1e-6


def test_blur_per_row_sigma_and_constant_image():
    x = torch.cat([delta(9, 9, at=(4, 4)), delta(9, 9, at=(4, 4))])
    out = C.gaussian_blur(x, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out[0], C.gaussian_blur(x[:1], torch.tensor([0.5]))[0])
    torch.testing.assert_close(out[1], C.gaussian_blur(x[1:], torch.tensor([2.0]))[0])
    const = torch.full((2, 3, 6, 6), 0.3)
    torch.testing.assert_close(C.gaussian_blur(const, torch.tensor([1.0, 2.0])), const)


def test_downscale_upscale_of_a_constant_image_is_identity_and_of_a_checkerboard_is_its_mean():
    const = torch.full((5, 3, 8, 8), 0.42)
    out = C.downscale(const, torch.tensor([1.5, 2.0, 2.5, 3.0, 4.0]))
    torch.testing.assert_close(out, const, rtol=0, atol=1e-6)
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()[None, None]  # 0/1 checkerboard
    # factor 2: every 2x2 block averages to 0.5, bilinear of a constant 4x4 is constant
    torch.testing.assert_close(C.downscale(board, torch.tensor([2.0])), torch.full_like(board, 0.5))
    torch.testing.assert_close(C.pixelate(board, torch.tensor([2.0])), torch.full_like(board, 0.5))


def test_pixelate_makes_blocks_by_hand():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 15
    out = C.pixelate(x, torch.tensor([2.0]))[0, 0]
    blocks = torch.tensor([[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]) / 4 / 15
    torch.testing.assert_close(out, blocks.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_jpeg_is_deterministic_changes_texture_and_keeps_flat_grey_within_the_dc_step():
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(2, 3, 16, 16, generator=g)
    q = torch.tensor([10, 40])
    a, b = C.jpeg(texture, q), C.jpeg(texture, q)
    assert torch.equal(a, b)
    assert (a - texture).abs().max() > 0.05  # quality 10 destroys random texture
    assert torch.equal(a * 255, (a * 255).round())  # decoded bytes
    # Flat grey v (r = g = b): the luminance DC coefficient is 8(v − 128); at quality 10 libjpeg scales the base
    # DC step 16 by 5000/10 % -> 80, so the DC error is <= 40 and the pixel error <= 40/8 = 5 levels; the colour
    # conversion's rounding adds at most 2 levels. Chroma of grey is exactly 128 (no error).
    for v in (0, 37, 128, 200, 255):
        flat = torch.full((1, 3, 16, 16), v / 255)
        out = C.jpeg(flat, torch.tensor([10]))
        assert float((out - flat).abs().max()) <= 7 / 255 + 1e-6, v
    gray = torch.full((1, 1, 8, 8), 0.5)
    assert C.jpeg(gray, torch.tensor([30])).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="C=2"):
        C.jpeg(torch.zeros(1, 2, 8, 8), torch.tensor([30]))


def test_noise_is_a_pure_function_of_the_key_and_has_the_right_scale():
    x = torch.full((3, 3, 32, 32), 0.5)
    keys = torch.tensor([11, 12, 11])
    out = C.gaussian_noise(x, torch.tensor([0.1, 0.1, 0.1]), keys)
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert torch.equal(out[1:2], C.gaussian_noise(x[1:2], torch.tensor([0.1]), keys[1:2]))  # row-independent
    z = C.gaussian_normal(torch.arange(64), (32, 32))  # 65536 normals
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02  # 4-5 standard errors
    dev = (out - x) / 0.1  # not clamped: |σξ| < 0.5 for |ξ| < 5
    assert abs(float(dev.std()) - 1) < 0.05


def test_contrast_motion_blur_salt_pepper_by_hand():
    x = torch.tensor([[0.0, 1.0], [0.2, 0.6]]).view(1, 1, 2, 2)  # mean 0.45
    torch.testing.assert_close(C.contrast(x, torch.tensor([0.4])), (x - 0.45) * 0.4 + 0.45)
    row = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]).view(1, 1, 1, 5)
    torch.testing.assert_close(C.motion_blur(row, torch.tensor([3])), torch.tensor([0.0, 1, 1, 1, 0]).view(1, 1, 1, 5))
    img = torch.full((4, 3, 32, 32), 0.5)
    out = C.salt_pepper(img, torch.tensor([0.0, 0.1, 0.1, 1.0]), torch.tensor([1, 2, 2, 3]))
    assert torch.equal(out[0], img[0]) and torch.equal(out[1], out[2])
    hit = (out[1] != 0.5).all(0)  # (32, 32) all channels move together
    assert torch.equal((out[1] != 0.5).any(0), hit)
    assert 0.05 < float(hit.float().mean()) < 0.15  # p = 0.1 of 1024 pixels (sd 0.009)
    assert set(out[3].unique().tolist()) <= {0.0, 1.0}


def test_view_keys_and_draws_are_pure_functions_of_seed_sample_step_view():
    samples = torch.tensor([5, 6, 5])
    k = C.view_keys(0, samples, 3, 4)
    assert k.shape == (3, 4) and (k >= 0).all()
    assert torch.equal(k[0], k[2]) and not torch.equal(k[0], k[1])
    assert torch.equal(k, C.view_keys(0, samples, 3, 4))
    assert not torch.equal(k, C.view_keys(1, samples, 3, 4)) and not torch.equal(k, C.view_keys(0, samples, 4, 4))
    assert len(set(k[0].tolist())) == 4  # views differ
    kinds, levels = C.draw_views(C.view_keys(0, torch.arange(500), 0, 2), C.kind_ids("seen"))
    assert set(kinds.unique().tolist()) == {0, 1, 2, 3} and set(levels.unique().tolist()) == {1, 2, 3, 4, 5}
    kinds, levels = C.draw_views(k, C.kind_ids(["jpeg"]), 3, 3)
    assert (kinds == 1).all() and (levels == 3).all()


def test_corrupt_dispatches_per_row_and_records_parameters():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=g)
    kinds, levels, keys = torch.arange(8), torch.tensor([1, 2, 3, 4, 5, 1, 2, 3]), torch.arange(8) + 100
    out = C.corrupt(x, kinds, levels, keys)
    for i in range(8):  # each row equals its corruption applied alone
        c = C.CORRUPTIONS[i]
        torch.testing.assert_close(out[i:i + 1], c.fn(x[i:i + 1], torch.tensor([float(c.levels[levels[i] - 1])]), keys[i:i + 1]))
    assert torch.equal(out, C.corrupt(x, kinds, levels, keys))
    params = C.parameters(kinds, levels)
    assert params.tolist() == [0.5, 30, 2.5, 0.16, 7, 0.6, 0.02, 3]
    assert C.describe(1, 5, 7) == {"corruption": "jpeg", "level": 5, "quality": 10.0, "key": 7}
    assert not any(c.moves_pixels for c in C.CORRUPTIONS)
    with pytest.raises(ValueError, match="levels must be severities"):
        C.corrupt(x[:1], kinds[:1], torch.tensor([0]), keys[:1])
    with pytest.raises(ValueError, match="kinds must be"):
        C.corrupt(x[:1], torch.tensor([8]), levels[:1], keys[:1])
    with pytest.raises(ValueError, match="images must be a float tensor"):
        C.corrupt(torch.zeros(1, 8, 8), kinds[:1], levels[:1], keys[:1])
    with pytest.raises(ValueError, match="names must be a non-empty list"):
        C.kind_ids(["fog"])


def test_resize_moves_boxes_with_the_pixels_and_round_trips():
    img = torch.zeros(1, 1, 16, 16)
    img[..., 4:8, 2:10] = 1.0  # the box (x0, y0, x1, y1) = (2, 4, 10, 8) in pixel-edge coordinates
    boxes = torch.tensor([[[2.0, 4.0, 10.0, 8.0]]])
    small, small_boxes = C.resize(img, (8, 8), boxes)
    torch.testing.assert_close(small_boxes, torch.tensor([[[1.0, 2.0, 5.0, 4.0]]]))
    ys, xs = (small[0, 0] > 0.99).nonzero(as_tuple=True)  # the filled pixels are exactly the moved box
    assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == (1, 2, 5, 4)
    big, back = C.resize(small, (16, 16), small_boxes, mode="nearest")
    torch.testing.assert_close(back, boxes)
    torch.testing.assert_close(big, img)  # area down by 2 then nearest up restores an aligned box exactly
    pts = torch.tensor([[3.5, 7.25]])
    torch.testing.assert_close(C.scale_points(C.scale_points(pts, (16, 16), (12, 20)), (12, 20), (16, 16)), pts)
    with pytest.raises(ValueError, match="even last dimension"):
        C.scale_points(torch.zeros(3), (4, 4), (2, 2))
