"""A neural reward: completions scored by a scalar reward model (a sequence classifier with one output).

The model is a Bradley-Terry reward model (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155, §3.5), trained by
``common.reward_model.RewardModelModule`` or any Hugging Face ``AutoModelForSequenceClassification`` folder with
``num_labels=1``. In YAML, beside or instead of the task's verifier:

    rewards:
      - class_path: common.rewards.model.RewardModelReward
        init_args: {path: runs/reward_model/export}

Each (prompt, completion) is formatted with the policy's chat template (the same system prompt and instruction),
the completion bounded to ``max_completion_tokens`` (its text first cut to a multiple of that in characters), and
scored in batches under ``torch.no_grad`` on the trainer's device (the RL module moves reward functions that are
``nn.Module``s to its device when fit starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.rewards.base import RewardFunction

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_reward_model(path: str | os.PathLike) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, saved format dict) from a Hugging Face folder or a ``RewardModelModule`` checkpoint
    (``.ckpt``: its config, tokenizer files and format ride in ``checkpoint["reward_model"]``; read with
    ``weights_only=True``)."""
    p = Path(path).expanduser()
    if not p.exists():  # before importing transformers: a wrong path fails in well under a second
        raise FileNotFoundError(f"RewardModelReward: path {str(path)!r} (resolved: {p.resolve()}) does not exist")
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from common.reward_model import FORMAT_FILE

    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"RewardModelReward: path {str(path)!r} has no config.json (expected a Hugging Face "
                                    "sequence-classification folder or a .ckpt of common.reward_model.RewardModelModule)")
        model = AutoModelForSequenceClassification.from_pretrained(p, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        fmt = json.loads((p / FORMAT_FILE).read_text()) if (p / FORMAT_FILE).is_file() else {}
    elif p.is_file():
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        meta = ckpt.get("reward_model") if isinstance(ckpt, dict) else None
        if meta is None:
            raise ValueError(f"RewardModelReward: path {str(path)!r} is not a checkpoint of common.reward_model.RewardModelModule "
                             "(no 'reward_model' entry)")
        config = dict(meta["config"])
        cfg = AutoConfig.for_model(config.pop("model_type"), **config)
        model = AutoModelForSequenceClassification.from_config(cfg)
        if meta["lora"] is not None:
            from peft import LoraConfig, TaskType, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **meta["lora"]))
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        if meta["lora"] is not None:
            model = model.merge_and_unload()
        with tempfile.TemporaryDirectory() as d:
            for name, text in meta["tokenizer_files"].items():
                (Path(d) / Path(name).name).write_text(text)
            tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        fmt = meta["format"]
    else:
        raise FileNotFoundError(f"RewardModelReward: path {str(path)!r} is neither a folder nor a checkpoint file")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, fmt


class RewardModelReward(RewardFunction, nn.Module):
    """Reward = the reward model's scalar output for (prompt, completion). Shapes: B completions -> (B,) float32.

    Args:
        path: a ``RewardModelModule`` checkpoint (``.ckpt``) or a Hugging Face sequence-classification folder
            (e.g. the ``export_dir`` of configs/text_reasoning/reward_model.yaml).
        batch_size: completions per forward.
        max_completion_tokens: completions are cut to this many tokens (None = what the model was trained with,
            else 256).
        max_prompt_tokens: templated prompts keep their last this-many tokens (None = as trained, else 256).
        system_prompt, instruction: the policy's prompt format (None = as the reward model was trained; its chat
            template override and options, if any, come with the saved format).
        dtype: "float32", "bfloat16" or "float16".
        name: the logged component's name.
    """

    def __init__(self, path: str, batch_size: int = 32, max_completion_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, system_prompt: str | None = None, instruction: str | None = None,
                 dtype: str = "float32", name: str = "reward_model"):
        nn.Module.__init__(self)
        from common.reward_model import RewardFormat

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardModelReward: batch_size must be a positive integer, got {batch_size!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"RewardModelReward: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        for arg, v in (("max_completion_tokens", max_completion_tokens), ("max_prompt_tokens", max_prompt_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"RewardModelReward: {arg} must be a positive integer or None, got {v!r}")
        model, self.tokenizer, saved = load_reward_model(path)
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"RewardModelReward: path {path!r} holds a classifier with num_labels={model.config.num_labels}; "
                             "a reward model has one output")
        self.model = model.to(_DTYPES[dtype]).eval().requires_grad_(False)
        given = {"system_prompt": system_prompt, "instruction": instruction, "max_prompt_tokens": max_prompt_tokens,
                 "max_completion_tokens": max_completion_tokens}
        known = {f.name for f in dataclasses.fields(RewardFormat)}
        self.format = RewardFormat(**{**{k: v for k, v in saved.items() if k in known},
                                      **{k: v for k, v in given.items() if v is not None}})
        self.batch_size, self.name = batch_size, name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> RewardModelReward:
        return super().train(False)  # always eval: no dropout in a reward

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        from common.reward_model import last_token_scores

        if len(completions) != len(samples):
            raise ValueError(f"RewardModelReward: {len(completions)} completions for {len(samples)} samples")
        prompts = [str(s.get("prompt", "")) for s in samples]
        out = []
        with torch.no_grad():
            for i in range(0, len(completions), self.batch_size):  # batches of the rollout, not single rows
                ids, mask = self.format.encode(self.tokenizer, prompts[i:i + self.batch_size], completions[i:i + self.batch_size])
                out.append(last_token_scores(self.model, ids.to(self.device), mask.to(self.device)))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)  # (B,)
