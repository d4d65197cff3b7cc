"""Generated VQA data: determinism, answers checked by hand against the pixels and boxes, the reward (incl. hostile
completions), the DataModule's held-out split."""

from __future__ import annotations

import time

import pytest
import torch

from multimodal.vlm.data import ANSWERS, COLOURS, QUESTIONS, TASKS, VQAReward, VisualQAData, first_word, generate, render
from multimodal.vlm.model import IMAGE_TOKEN


def test_deterministic_under_a_seed_and_different_across_seeds():
    a, b, c = generate(20, 3), generate(20, 3), generate(20, 4)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["answer"] == y["answer"] and torch.equal(x["boxes"], y["boxes"])
    assert sum(torch.equal(x["image"], z["image"]) for x, z in zip(a, c)) == 0
    assert [s["task"] for s in a[:5]] == list(TASKS)  # equal shares, task i % 5
    s = a[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 32, 32)
    assert s["prompt"] == f"{IMAGE_TOKEN}\n{QUESTIONS[s['task']]}" and s["uid"] == (3, 0)
    assert render("count", 3, 2, 32)["answer"] == a[2]["answer"]  # a pure function of (task, seed, index)


def _inside(s, k=0):
    """The pixel at the centre of box k, (3,) int."""
    x, y = s["points"][k].floor().long().tolist()
    return s["image"][:, y, x].long()


@pytest.mark.parametrize("index", range(12))
def test_answers_match_the_pixels(index):
    s = render("colour", 7, index)
    assert torch.equal(_inside(s), torch.tensor(COLOURS[s["answer"]]))  # the shape's centre has its colour
    s = render("position", 7, index)
    x0, _, x1, _ = s["boxes"][0].tolist()
    assert (x1 <= 32 / 3) if s["answer"] == "left" else (x0 >= 32 - 32 / 3)
    s = render("count", 7, index)
    assert len(s["boxes"]) == int(s["answer"]) and s["answer"] in ANSWERS["count"]
    b = s["boxes"]  # boxes in distinct quadrants: never overlapping
    for i in range(len(b)):
        for j in range(i + 1, len(b)):
            assert b[i, 2] <= b[j, 0] or b[j, 2] <= b[i, 0] or b[i, 3] <= b[j, 1] or b[j, 3] <= b[i, 1]
    s = render("bars", 7, index)
    heights = (s["boxes"][:, 3] - s["boxes"][:, 1]).tolist()
    assert s["answer"] == ("left", "middle", "right")[max(range(3), key=heights.__getitem__)]
    top = s["boxes"][:, 1].long()  # each bar's top row is coloured, the row above it is background
    for k in range(3):
        x = int(s["points"][k, 0])
        assert s["image"][:, top[k], x].tolist() in [list(c) for c in COLOURS.values()]
        assert min(s["image"][:, top[k] - 1, x].tolist()) >= 215
    s = render("shape", 7, index)
    assert s["answer"] in ANSWERS["shape"] and torch.equal(_inside(s), torch.tensor(COLOURS[_colour_at(s)]))


def _colour_at(s):
    px = tuple(_inside(s).tolist())
    return next(n for n, c in COLOURS.items() if c == px)


def test_a_square_fills_its_box_and_a_circle_does_not_fill_the_corners():
    found = set()
    for i in range(60):
        s = render("shape", 1, i)
        x0, y0, x1, y1 = s["boxes"][0].long().tolist()
        patch = s["image"][:, y0:y1, x0:x1]
        coloured = (patch.int().min(0).values < 200)  # background is >= 215 in every channel
        if s["answer"] == "square":
            assert coloured.all()
        else:  # circle and triangle leave the top-left corner empty
            assert not coloured[0, 0]
        found.add(s["answer"])
    assert found == set(ANSWERS["shape"])


def test_reward_by_hand_and_hostile_completions():
    r = VQAReward(format_bonus=0.1)
    samples = [{"answer": "red"}, {"answer": "3"}, {"answer": "left"}, {"answer": "red"}, {"answer": "red"}]
    got = r(["Red.", " 3 shapes", "right", "", "the red one"], samples)
    torch.testing.assert_close(got, torch.tensor([1.1, 1.0, 0.1, 0.0, 0.0]))
    hostile = ["__import__('os').system('echo hi')", "9**9**9", "(" * 100_000, "x" * 1_000_000, "red" + "\x00" * 10]
    t0 = time.process_time()
    got = VQAReward()(hostile, [{"answer": "red"}] * len(hostile))
    assert time.process_time() - t0 < 1.0  # bounded before the regex: CPU time, not wall
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    assert first_word("x" * 1_000_000 + " red") == "x" * 200


def test_datamodule_holds_out_validation_and_rejects_bad_tasks():
    dm = VisualQAData(train_size=40, val_size=10, image_size=16, seed=2)
    dm.setup()
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10
    val = {(s["task"], s["image"].numpy().tobytes()) for s in dm.val_set}
    assert not any((s["task"], s["image"].numpy().tobytes()) in val for s in dm.train_set)
    dm2 = VisualQAData(train_size=40, val_size=10, image_size=16, seed=2)
    dm2.setup()
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(dm.train_set, dm2.train_set))
    assert len(dm.train_batch(0)) == 4
    with pytest.raises(ValueError, match=r"tasks must be a non-empty list drawn from"):
        VisualQAData(tasks=["colour", "sudoku"])
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        generate(-1, 0)


def test_caption_is_what_the_image_shows_and_pads_to_the_feature_count():
    from multimodal.vlm.model import vlm_tokenizer
    from multimodal.vlm.pretrain import caption_targets

    for s in generate(40, 3):
        c, a, t = s["caption"], s["answer"], s["task"]
        if t in ("colour", "shape"):
            assert c.startswith("1 ") and f" {a}" in c
        elif t == "position":  # the whole shape is in the left or right third, so its centre is too
            assert c.startswith("1 ") and c.endswith(f", {a}.")
        elif t == "count":
            assert c.startswith(f"{a} ") and (c.endswith("shapes.") or a == "1")
        else:
            assert c == f"3 bars, tallest {a}."
    tok = vlm_tokenizer()
    ids = caption_targets(tok, ["1 red circle, left.", "3 bars, tallest middle."], 8)  # (2, 8)
    space = tok.convert_tokens_to_ids("\u0120")
    assert tok.decode(ids[0, :6]) == "1 red circle, left." and ids[0, 6:].eq(space).all()
    assert caption_targets(tok, ["1 red circle, left."], 4).tolist()[0] == ids[0, :4].tolist()  # cut to 4 features
