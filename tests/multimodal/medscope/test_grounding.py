"""tIoU by hand, get_frame inside the evidence window counts as grounded, the reward parts and the logged metrics."""

from __future__ import annotations

import torch

from common.batch import RolloutBatch
from multimodal.medscope import video as V
from multimodal.medscope.env import MedScopeReward, episode_metrics, tool_calls

GT = {"answer": "red", "evidence_start": 44, "evidence_end": 51}


def call(name: str, **args) -> str:
    import json
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def test_tiou_by_hand():
    t = lambda *w: float(V.tiou(*(torch.tensor(float(x)) for x in w)))  # noqa: E731
    assert t(40, 56, 44, 51) == 7 / 16  # inside: |[44,51]| / |[40,56]|
    assert abs(t(48, 60, 44, 51) - 3 / 16) < 1e-7  # overlap [48,51] = 3, union [44,60] = 16
    assert abs(t(60, 40, 44, 51) - 7 / 20) < 1e-7  # a reversed window is its swap [40, 60]
    assert t(56, 40, 44, 51) == 7 / 16
    assert t(0, 10, 44, 51) == 0.0  # disjoint
    assert t(44, 51, 44, 51) == 1.0
    assert t(47, 47, 44, 51) == 1.0 and t(44, 44, 44, 51) == 1.0 and t(52, 52, 44, 51) == 0.0  # timestamps
    assert V.best_tiou([], (44, 51)) == 0.0


def test_get_frame_inside_the_window_counts_as_grounded_and_the_reward_parts():
    ground, acc, fmt = (MedScopeReward(p, max_tool_calls=2) for p in ("grounding", "accuracy", "format"))
    texts = [call("get_frame", time=47) + "<result>x</result><answer>red</answer>",
             call("get_frame", time=60) + "<answer>blue</answer>",
             call("crop_video", start_time=40, end_time=56) + call("get_frame", time=30) + "<answer>red</answer>",
             call("crop_video", start_time=40, end_time=56) + call("crop_video", start_time=40, end_time=56)
             + call("get_frame", time=47) + "<answer>red</answer>",  # third call beyond the cap: refused, no credit
             '<tool_call>{"name": "crop_video", "arguments": {"start_time": "a"}}</tool_call><answer>red</answer>',
             "no answer at all"]
    samples = [GT] * len(texts)
    assert ground(texts, samples).tolist() == [1.0, 0.0, 7 / 16, 7 / 16, 0.0, 0.0]
    assert acc(texts, samples).tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert fmt(texts, samples).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert isinstance(tool_calls(texts[4])[0], str)  # the malformed call is an error entry, not an exception
    # hostile input: long, nested, unclosed; bounded parsing, no exception
    assert ground(["<tool_call>" + "[" * 5000, "<answer>" + "x" * 100000], [GT, GT]).tolist() == [0.0, 0.0]


def test_logged_metrics_by_hand():
    texts = [call("crop_video", start_time=40, end_time=56) + "<answer>red</answer>",  # tIoU 7/16, 8 frames
             call("get_frame", time=47) + call("crop_video", start_time=44, end_time=51) + "<answer>blue</answer>",  # 1.0
             "<answer>red</answer>"]  # no call: tIoU 0
    b = RolloutBatch(completion_ids=torch.zeros(3, 1, dtype=torch.long), completion_mask=torch.ones(3, 1, dtype=torch.bool),
                     group_ids=torch.zeros(3, dtype=torch.long), samples=[GT] * 3, completions=texts)
    m = episode_metrics(b, max_tool_calls=3)
    assert abs(float(m["miou"]) - (7 / 16 + 1 + 0) / 3) < 1e-6
    assert abs(float(m["r_at_0.5"]) - 1 / 3) < 1e-6
    assert abs(float(m["answer_accuracy"]) - 2 / 3) < 1e-6
    assert abs(float(m["tool_calls"]) - 1.0) < 1e-6  # (1 + 2 + 0) / 3
    assert abs(float(m["frames_read"]) - (8 + 3 + 8) / 3) < 1e-6
