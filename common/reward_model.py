"""Bradley-Terry reward models: a scalar-head sequence classifier trained on preference pairs.

The model (Ouyang et al. 2022, arXiv 2203.02155, §3.5; Stiennon et al. 2020, arXiv 2009.01325) is a causal-LM
backbone with a linear head read at the last token (transformers' ``AutoModelForSequenceClassification`` with
``num_labels=1``). For a pair of completions of one prompt, chosen y_w and rejected y_l, the loss is

    L = -log sigmoid(r(x, y_w) - r(x, y_l))                     (Bradley & Terry 1952; InstructGPT eq. 1)

averaged over pairs; held-out pair accuracy is the fraction with r(x, y_w) > r(x, y_l).

Pairs come from the verifiable tasks (:class:`VerifiedPairs`): completions of a prompt sampled from a policy and
labelled by the task's verifier (correct = chosen, incorrect = rejected), plus, optionally, the task's reference
answer written as a completion (``"The answer is 42."``, kept only if the verifier accepts it) as a chosen one,
for prompts where the policy rarely answers correctly. :class:`PreferencePairData` splits them by prompt: the
held-out pairs come from the prompt source's validation set, so no held-out prompt is seen in training.

The trained model is read by ``common.rewards.model.RewardModelReward`` from the Lightning checkpoint (which
carries the model config, the tokenizer files and the input format) or from the Hugging Face folder written to
``export_dir`` at the end of fit (LoRA merged; safetensors + tokenizer + ``reward_format.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.models import LoRA, PolicySource, TinyLlama
from common.rewards.base import RewardFunction
from common.rollout.base import Sampling

CHARS_PER_TOKEN_BOUND = 32  # completions are cut to max_completion_tokens x this many characters before tokenising
FORMAT_FILE = "reward_format.json"


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """``mean(-log sigmoid(r_w - r_l))`` (InstructGPT eq. 1). Shapes: chosen (N,), rejected (N,) -> ().
    ``F.logsigmoid`` is finite for any finite margin (no log(0) at large negative margins)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be 1-D of the same shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if chosen.numel() == 0:
        return chosen.sum() * 0.0  # no pairs: a zero loss that still has a graph
    return -F.logsigmoid(chosen - rejected).mean()


@dataclass
class RewardFormat:
    """How (prompt, completion) becomes the reward model's input; the same for training and scoring, and saved
    with the model. The prompt is chat-templated exactly as ``CausalLMPolicy.prompt_texts`` does (optional system
    message, ``prompt + instruction`` as the user turn, the generation prompt; by that method's own code), then the
    completion follows.

    Args:
        system_prompt: the policy's system message (None = the template's default).
        instruction: the policy's instruction appended to every prompt.
        chat_template, chat_template_kwargs: the policy's template override and template options.
        max_prompt_tokens: the templated prompt is cut to its last this-many tokens.
        max_completion_tokens: the completion is cut to its first this-many tokens (after cutting its text to
            ``CHARS_PER_TOKEN_BOUND`` x as many characters, so a hostile 1 MB completion is never tokenised whole).
    """

    system_prompt: str | None = None
    instruction: str = ""
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 256
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RewardFormat: {name} must be a positive integer, got {v!r}")

    def encode(self, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ids (N, L) long and attention mask (N, L) long of the templated prompt + completion."""
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}")
        from common.policies.causal_lm import CausalLMPolicy

        texts = CausalLMPolicy.prompt_texts(_PromptFormat(tokenizer, self), [{"prompt": str(p)} for p in prompts])
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        cap = self.max_completion_tokens * CHARS_PER_TOKEN_BOUND
        # split_special_tokens: a completion that spells "<|im_end|>" stays text, it cannot forge the template
        comp_ids = tokenizer([str(c)[:cap] for c in completions], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        rows = [p[-self.max_prompt_tokens:] + c[: self.max_completion_tokens] for p, c in zip(prompt_ids, comp_ids)]
        width = max((len(r) for r in rows), default=0)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (N, L)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, L)
        for i, r in enumerate(rows):  # ok: tokeniser output is ragged python lists
            if r:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
        return ids, mask


class _PromptFormat:
    """What ``CausalLMPolicy.prompt_texts`` reads from a policy: the prompt text is the policy's, by its own code."""

    def __init__(self, tokenizer, fmt: RewardFormat):
        self.tokenizer, self.system_prompt, self.instruction = tokenizer, fmt.system_prompt, fmt.instruction
        self.chat_template, self.chat_template_kwargs = fmt.chat_template, fmt.chat_template_kwargs


def last_token_scores(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Scalar rewards (N,) float32 of left-padded inputs, by the classifier's own pooling (so any
    ``AutoModelForSequenceClassification`` works). For causal-LM classifiers that is the rightmost token that is not
    ``pad_token_id``: here always the last position, because every row ends with its completion's last token (or
    the generation prompt's) and the completion is tokenised with ``split_special_tokens``, so it never holds the
    pad (SmolLM2: end-of-turn) token."""
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def classifier_from_causal_lm(source: PolicySource):
    """(sequence-classification model with num_labels=1, tokenizer) from a policy source: the causal LM's backbone
    weights in ``AutoModelForSequenceClassification`` with a new scalar head (seeded, std 0.02)."""
    from transformers import AutoModelForSequenceClassification

    lm, tok = source.load()
    cfg = lm.config
    cfg.num_labels = 1
    cfg.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=next(lm.parameters()).dtype)
    prefix = lm.base_model_prefix
    missing, unexpected = getattr(model, prefix).load_state_dict(getattr(lm, prefix).state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier_from_causal_lm: backbone weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, tok


def _peft_config(lora: LoRA, layers: list[int] | None):
    from peft import LoraConfig, TaskType

    if lora.rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {lora.rank}")
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), layers_to_transform=layers)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's saved files as {name: text} (they are JSON/text), to ride inside a checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {f.name: f.read_text() for f in Path(d).iterdir() if f.is_file()}


class RewardModelModule(L.LightningModule):
    """Trains a scalar reward model with the Bradley-Terry loss on (prompt, chosen, rejected) batches
    (:class:`PreferencePairData`). Logs ``train/loss``, ``train/pair_accuracy``, ``val/loss``, ``val/pair_accuracy``
    (held-out prompts) and ``val/margin`` (mean r_w - r_l).

    Args:
        backbone: the causal LM whose backbone is used (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``).
        lora: LoRA adapters on the backbone (the head is always trained); None = see ``trainable_layers``.
        trainable_layers: train only the last this-many decoder layers (LoRA on them, or all their weights without
            LoRA); 0 = a head on a frozen backbone; None = every layer.
        format: the input format (the policy's system prompt / instruction; token bounds).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        export_dir: where fit's end writes the Hugging Face folder (LoRA merged) for ``RewardModelReward``; None = no export.
    """

    def __init__(self, backbone: PolicySource | None = None, lora: LoRA | None = None, trainable_layers: int | None = None,
                 format: RewardFormat | None = None, lr: float = 1e-4, weight_decay: float = 0.0, export_dir: str | None = None):
        super().__init__()
        if trainable_layers is not None and (not isinstance(trainable_layers, int) or trainable_layers < 0):
            raise ValueError(f"RewardModelModule: trainable_layers must be None or an integer >= 0, got {trainable_layers!r}")
        if not lr > 0:
            raise ValueError(f"RewardModelModule: lr must be > 0, got {lr!r}")
        self.format = format if format is not None else RewardFormat()
        self.lr, self.weight_decay, self.export_dir = lr, weight_decay, export_dir
        model, self.tokenizer = classifier_from_causal_lm(backbone if backbone is not None else TinyLlama())
        n_layers = model.config.num_hidden_layers
        layers = None if trainable_layers is None else list(range(max(0, n_layers - trainable_layers), n_layers))
        self.lora_config = None
        if lora is not None and layers != []:
            from peft import get_peft_model

            self.lora_config = _peft_config(lora, layers)
            model = get_peft_model(model, self.lora_config)  # freezes the backbone; the head is a module to save
        else:
            head = {n for n, _ in model.named_parameters() if n.split(".")[0] not in (model.base_model_prefix,)}
            for n, p in model.named_parameters():
                layer = _layer_index(n)
                p.requires_grad_(n in head or layers is None or (layer is not None and layer in layers))
        self.model = model
        self.model.eval()  # no dropout: scores are a deterministic function of the input

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        ids, mask = self.format.encode(self.tokenizer, prompts, completions)
        return last_token_scores(self.model, ids.to(self.device), mask.to(self.device))  # (N,)

    def pair_scores(self, batch: Mapping[str, Sequence[str]]) -> tuple[Tensor, Tensor]:
        n = len(batch["prompt"])
        r = self.scores(list(batch["prompt"]) * 2, list(batch["chosen"]) + list(batch["rejected"]))  # (2N,)
        return r[:n], r[n:]

    def training_step(self, batch: Mapping[str, Sequence[str]], batch_idx: int) -> Tensor:
        self.model.eval()  # Lightning calls train() before fit; dropout stays off
        rw, rl = self.pair_scores(batch)
        loss = bradley_terry_loss(rw, rl)
        n = len(rw)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/pair_accuracy", (rw > rl).float().mean(), batch_size=n)
        return loss

    def validation_step(self, batch: Mapping[str, Sequence[str]], batch_idx: int) -> None:
        rw, rl = self.pair_scores(batch)
        n = len(rw)
        self.log("val/loss", bradley_terry_loss(rw, rl), batch_size=n)
        self.log("val/pair_accuracy", (rw > rl).float().mean(), prog_bar=True, batch_size=n)
        self.log("val/margin", (rw - rl).mean(), batch_size=n)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ what the reward function loads
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["reward_model"] = {
            "config": self._base().config.to_dict(),
            "lora": None if self.lora_config is None else _lora_dict(self.lora_config),
            "tokenizer_files": tokenizer_files(self.tokenizer),
            "format": asdict(self.format),
        }

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if self.lora_config is not None else self.model

    def merged(self) -> nn.Module:
        """The plain sequence-classification model with LoRA merged into a copy (this module is unchanged)."""
        import copy

        model = copy.deepcopy(self.model)
        return model.merge_and_unload() if self.lora_config is not None else model

    def export(self, path: str | os.PathLike) -> Path:
        """Write the Hugging Face folder: merged safetensors, tokenizer and ``reward_format.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.merged().save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / FORMAT_FILE).write_text(json.dumps(asdict(self.format), indent=1))
        return path

    def on_fit_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            print(f"reward model: exported to {self.export(self.export_dir)}")


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _lora_dict(cfg) -> dict:
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules), "layers_to_transform": cfg.layers_to_transform}


# ====================================================================== preference pairs from verifiable tasks
@dataclass
class VerifiedPairs:
    """Pairs (correct, incorrect) of completions of one prompt: ``samples_per_prompt`` completions sampled from
    ``policy``, labelled by ``verifier`` (> 0.5 = correct); with ``reference_chosen`` the prompt's reference answer,
    written as ``reference_template.format(answer=...)`` and kept only if the verifier accepts it, is one more
    correct completion. Every (correct, incorrect) combination of a prompt, at most ``max_pairs_per_prompt`` of them.

    Args:
        policy: the policy whose completions are labelled (use the policy that GRPO will train).
        verifier: the task's verifier ``fn(completions, samples) -> (B,)``.
        sampling: sampling options (the policy's training sampling).
        system_prompt, instruction: the policy's prompt format.
        samples_per_prompt: completions sampled per prompt.
        max_pairs_per_prompt: cap on pairs from one prompt.
        reference_chosen: add the reference answer as a correct completion.
        reference_template: how the reference answer is written.
        batch_prompts: prompts per generate call.
    """

    policy: PolicySource
    verifier: RewardFunction
    sampling: Sampling | None = None
    system_prompt: str | None = None
    instruction: str = ""
    samples_per_prompt: int = 2
    max_pairs_per_prompt: int = 2
    reference_chosen: bool = True
    reference_template: str = "The answer is {answer}."
    batch_prompts: int = 16

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_pairs_per_prompt", "batch_prompts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VerifiedPairs: {name} must be a positive integer, got {v!r}")
        if self.samples_per_prompt < 2 and not self.reference_chosen:
            raise ValueError("VerifiedPairs: samples_per_prompt must be >= 2 without reference_chosen (a pair needs two completions)")

    def fingerprint(self) -> str:
        keys = {k: (repr(vars(v)) if hasattr(v, "__dict__") else repr(v)) for k, v in vars(self).items()}
        keys["policy"] = type(self.policy).__name__ + repr(vars(self.policy))
        keys["verifier"] = type(self.verifier).__name__
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    def make(self, samples: Sequence[Mapping[str, Any]], seed: int, progress: str = "") -> list[dict]:
        """Pairs ``{"prompt", "chosen", "rejected", "answer"}`` from ``samples`` (dicts with ``prompt``)."""
        from common.policies.causal_lm import CausalLMPolicy

        torch.manual_seed(seed)
        policy = CausalLMPolicy(self.policy, self.sampling, system_prompt=self.system_prompt, instruction=self.instruction)
        pairs: list[dict] = []
        G = self.samples_per_prompt
        for start in range(0, len(samples), self.batch_prompts):
            chunk = list(samples[start:start + self.batch_prompts])
            with torch.no_grad():
                batch = policy.rollout(chunk, G)
            correct = torch.as_tensor(self.verifier(batch.completions, batch.samples)).view(len(chunk), G) > 0.5
            for i, s in enumerate(chunk):  # ok: data preparation, once
                comps = batch.completions[i * G:(i + 1) * G]
                good = [c for c, k in zip(comps, correct[i].tolist()) if k]
                bad = [c for c, k in zip(comps, correct[i].tolist()) if not k]
                if self.reference_chosen:
                    ref = self.reference_template.format(answer=s.get("answer", ""))
                    if float(torch.as_tensor(self.verifier([ref], [s])).reshape(-1)[0]) > 0.5:
                        good.append(ref)
                combos = [(g, b) for g in good for b in bad][: self.max_pairs_per_prompt]
                pairs += [{"prompt": s["prompt"], "chosen": g, "rejected": b, "answer": str(s.get("answer", ""))} for g, b in combos]
            if progress:
                print(f"{progress}: {min(start + self.batch_prompts, len(samples))}/{len(samples)} prompts, {len(pairs)} pairs", flush=True)
        return pairs


def read_pairs(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(meta, pairs) of a JSONL pair file: an optional first line ``{"meta": ...}``, then one
    ``{"prompt", "chosen", "rejected", "split"?}`` per line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise FileNotFoundError(f"pairs file {str(path)!r} cannot be read: {err}") from err
    meta, pairs = {}, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"pairs file {str(path)!r} line {n} is not JSON: {err}") from err
        if n == 1 and isinstance(row, dict) and set(row) == {"meta"}:
            meta = row["meta"]
            continue
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"pairs file {str(path)!r} line {n}: expected an object with string prompt, chosen, rejected")
        pairs.append(row)
    if not pairs:
        raise ValueError(f"pairs file {str(path)!r} has no pairs")
    return meta, pairs


class PreferencePairData(L.LightningDataModule):
    """Batches of preference pairs (dicts of lists ``prompt``, ``chosen``, ``rejected``), split by prompt.

    Pairs are read from ``path`` (JSONL; rows with ``"split": "val"`` are held out), or, with ``build``, made from
    the training and validation prompts of ``prompts`` (a data module with ``train_set``/``val_set`` after
    ``setup``, e.g. ``text_reasoning.data.ReasoningData``: its validation prompts never appear in its training set)
    and written to ``path`` once; a file built with other settings is rebuilt.

    Args:
        path: the JSONL pair file (read, or the cache of ``build``).
        build: how to make pairs (:class:`VerifiedPairs`); None = ``path`` must exist.
        prompts: where ``build`` takes prompts from.
        train_prompts: training prompts used by ``build`` (the first ones of ``prompts.train_set``).
        val_prompts: held-out prompts used by ``build`` (the first ones of ``prompts.val_set``).
        batch_size: pairs per batch.
        seed: seed of the sampling and the shuffling.
    """

    def __init__(self, path: str, build: VerifiedPairs | None = None, prompts: L.LightningDataModule | None = None,
                 train_prompts: int = 128, val_prompts: int = 64, batch_size: int = 8, seed: int = 0):
        super().__init__()
        if build is not None and prompts is None:
            raise ValueError("PreferencePairData: build needs prompts (a data module with train_set / val_set)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PreferencePairData: batch_size must be a positive integer, got {batch_size!r}")
        if build is None and not Path(path).is_file():
            raise FileNotFoundError(f"PreferencePairData: path {path!r} does not exist (and no build is given to make it)")
        self.path, self.build, self.prompts = path, build, prompts
        self.train_prompts, self.val_prompts, self.batch_size, self.seed = train_prompts, val_prompts, batch_size, seed
        self.train_pairs: list[dict] = []
        self.val_pairs: list[dict] = []

    def meta(self) -> dict:
        return {"fingerprint": self.build.fingerprint() if self.build else None, "train_prompts": self.train_prompts,
                "val_prompts": self.val_prompts, "seed": self.seed}

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs:
            return
        path = Path(self.path)
        meta = read_pairs(path)[0] if path.is_file() and self.build is not None else None
        if self.build is not None and meta != self.meta():
            self.prompts.setup("fit")
            train = self.build.make(self.prompts.train_set[: self.train_prompts], self.seed, progress="pairs (train)")
            val = self.build.make(self.prompts.val_set[: self.val_prompts], self.seed + 1, progress="pairs (held out)")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(json.dumps({"meta": self.meta()}) + "\n")
                for split, rows in (("train", train), ("val", val)):
                    for r in rows:
                        f.write(json.dumps({**r, "split": split}) + "\n")
            os.replace(tmp, path)
        _, pairs = read_pairs(path)
        self.train_pairs = [p for p in pairs if p.get("split", "train") != "val"]
        self.val_pairs = [p for p in pairs if p.get("split") == "val"]
        if not self.train_pairs:
            raise ValueError(f"PreferencePairData: {self.path!r} has no training pairs")
        overlap = {p["prompt"] for p in self.train_pairs} & {p["prompt"] for p in self.val_pairs}
        if overlap:
            raise ValueError(f"PreferencePairData: {len(overlap)} prompts are in both splits of {self.path!r}, e.g. {next(iter(overlap))!r}")

    @staticmethod
    def collate(rows: list[dict]) -> dict[str, list[str]]:
        return {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_pairs, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.val_pairs, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate) if self.val_pairs else []
