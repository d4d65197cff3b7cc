"""Supervised fine-tuning (SFT) as a first-class module: ``advlab fit --config configs/<domain>/sft.yaml``.

A plain LightningModule (not the RL loop): a batch of ``{prompt, response}`` examples is tokenised with the
*policy's own* prompt encoding (``CausalLMPolicy.encode``: the chat template, system prompt and instruction that
the RL recipes sample from, so SFT and RL see the same prompt text), the response is tokenised on its own and
ends with EOS (what generation stops on), and an **objective** turns the batch into a loss on the response tokens
only (prompt and padding never count). The objective is a part named by ``class_path`` in YAML:

- :class:`NextTokenCE` (default): causal-LM cross-entropy, Σ_{response tokens} −log p(x_i | x_<i) / N_response;
- ``diffusion.dllm.sft.MaskedDiffusionCE``: LLaDA's masked-diffusion SFT loss (the prompt is never masked).

The normaliser N_response is the number of response tokens of the whole step (all micro-batches, all DDP ranks),
so splitting a step into micro-batches, or packing, does not change the loss or the gradient.

**Packing** (``pack_length``): the examples of a step are placed first-fit-decreasing into rows of at most
``pack_length`` tokens. Every token carries its example's id (``SFTBatch.example_ids``) and its position inside
its example (``position_ids`` restart at 0 for each example), and attention is confined to the example: an explicit
4-D block-diagonal mask (causal inside the block for a causal LM, full for a masked-diffusion LM), passed to the
model as transformers' "custom 4-D mask". Each example is therefore computed exactly as on its own row; a test
checks that the packed loss equals the unpacked one to float32 rounding.

Data: :class:`SFTData` (a ``ResumableData``: exact data position in the checkpoint, DDP split) over sources:
:class:`Records` (a local JSONL / JSON / Parquet file with a column mapping), ``text_reasoning.traces.TaskTraces``
(reference solutions of the generated reasoning tasks), ``retrieval.sft.TeacherAnswers`` (generate-and-rank).
"""

from __future__ import annotations

import itertools

import copy
import random
import time
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric

from common.data import SEED_STRIDE, ResumableData
from common.distributed import all_reduce_sum
from common.files import read_rows
from common.loop import Stepper
from common.losses.logprobs import token_logprobs
from common.models import LoRA, PolicySource, TinyLlama
from common.policies.base import Policy
from common.rewards.base import RewardFunction
from common.rng import load_rank_states, save_rank_states, seed_rank
from common.rollout.base import Sampling
from common.schedules import lr_scheduler, schedule_problems


# ====================================================================== batches
@dataclass
class SFTBatch:
    """Token rows of a step. Shapes: all (R, L); ``examples`` = E, the examples in the batch.

    input_ids: tokens (``pad_id`` where ``example_ids`` is -1).
    position_ids: position of each token inside its own example (0 at the example's first token).
    example_ids: which example (0..E-1) each token belongs to; -1 = padding. One example per row unless packed.
    target_mask: the response tokens, the loss's targets (never a prompt or padding token, never an example's
        first token, so a causal LM always predicts a target from inside its own example).
    packed: several examples may share a row (attention must then be confined to each example).
    """

    input_ids: Tensor
    position_ids: Tensor
    example_ids: Tensor
    target_mask: Tensor
    examples: int
    packed: bool = False

    @property
    def attention_mask(self) -> Tensor:  # (R, L) bool: real tokens
        return self.example_ids >= 0

    def block_mask(self, causal: bool, dtype: torch.dtype) -> Tensor:
        """Additive 4-D mask, 0 where query q may attend key k: same example (and k <= q if ``causal``), a large
        negative number elsewhere. Padding attends to padding, so no softmax row is empty. Shapes: -> (R, 1, L, L)."""
        e = self.example_ids
        allowed = e[:, :, None] == e[:, None, :]  # (R, L, L)
        if causal:
            L_ = e.shape[1]
            allowed &= torch.ones(L_, L_, dtype=torch.bool, device=e.device).tril()
        return torch.zeros(allowed.shape, dtype=dtype, device=e.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def rows(self, index: Tensor) -> "SFTBatch":
        """The rows ``index`` (a micro-batch); example ids keep their global numbering."""
        return SFTBatch(self.input_ids[index], self.position_ids[index], self.example_ids[index], self.target_mask[index],
                        self.examples, self.packed)

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.position_ids.to(device), self.example_ids.to(device),
                        self.target_mask.to(device), self.examples, self.packed)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, *,
            pack_length: int | None = None, max_length: int | None = None) -> SFTBatch:
    """Token lists of E examples -> an :class:`SFTBatch`, right-padded with ``pad_id``.

    Example e is ``prompts[e] + responses[e]``, cut to ``max_length`` tokens (the response's end goes first).
    Without ``pack_length`` each example has its own row; with it, examples go first-fit-decreasing (longest first,
    into the first row with room) into rows of at most ``pack_length`` tokens (an example longer than that gets a
    row of its own). Data preparation on CPU, once per step (Python over examples, not a hot path).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
    if pack_length is not None and pack_length < 2:
        raise ValueError(f"pack_length must be >= 2 tokens (or None = no packing), got {pack_length}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens (or None = no limit), got {max_length}")
    seqs, starts = [], []
    for e, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError(f"collate: example {e} has an empty prompt (the first token of an example is never a target)")
        s = (list(p) + list(r))[:max_length]
        seqs.append(s)
        starts.append(len(p))  # first response token
    if pack_length is None:
        layout = [[e] for e in range(len(seqs))]
    else:
        layout, room = [], []
        for e in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
            n = len(seqs[e])
            row = next((j for j, left in enumerate(room) if left >= n), None)
            if row is None:
                layout.append([e])
                room.append(pack_length - n)
            else:
                layout[row].append(e)
                room[row] -= n
    L_ = max([sum(len(seqs[e]) for e in row) for row in layout] + [1])
    R = len(layout)
    ids = torch.full((R, L_), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L_), dtype=torch.long)
    ex = torch.full((R, L_), -1, dtype=torch.long)
    tgt = torch.zeros((R, L_), dtype=torch.bool)
    for r, row in enumerate(layout):
        c = 0
        for e in row:
            n = len(seqs[e])
            ids[r, c : c + n] = torch.tensor(seqs[e], dtype=torch.long)
            pos[r, c : c + n] = torch.arange(n)
            ex[r, c : c + n] = e
            tgt[r, c + starts[e] : c + n] = True
            c += n
    return SFTBatch(ids, pos, ex, tgt, len(seqs), packed=pack_length is not None)


# ====================================================================== objectives
class SFTObjective(nn.Module):
    """A supervised loss on the response tokens of an :class:`SFTBatch`, named by ``class_path`` in YAML.

    ``forward(policy, batch, generator=None) -> (total, count)``: the *sum* of the per-token losses over the batch's
    response tokens (a scalar with gradient) and the number of response tokens (a scalar). The module divides the
    step's total by the step's count, so micro-batches and packing do not change the loss. ``policy`` is anything
    with ``.model`` and ``.tokenizer`` (a :class:`common.policies.causal_lm.CausalLMPolicy`, a masked-diffusion
    policy). ``generator`` seeds any randomness (validation passes a fixed one).
    """

    def response_ids(self, ids: list[int], eos_id: int) -> list[int]:
        """The target token list of a response: its tokens + EOS (what generation stops on)."""
        return list(ids) + [eos_id]

    def forward(self, policy: Any, batch: SFTBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class NextTokenCE(SFTObjective):
    """Causal-LM cross-entropy on the response tokens: total = Σ_{i ∈ response} −log p_θ(x_i | x_<i).

    The logits are formed only at the positions that predict a response token, by the chunked selective
    log-softmax of ``common.losses.logprobs`` (no float32 (R, L, V) tensor).

    Args:
        chunk_size: rows per chunk of the log-softmax.
    """

    def __init__(self, chunk_size: int = 1024):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, policy: Any, batch: SFTBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        model = policy.model
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        attn = batch.block_mask(True, head.weight.dtype) if batch.packed else batch.attention_mask.long()
        context = nullcontext()
        if getattr(policy, "gradient_checkpointing", False) and torch.is_grad_enabled():
            from common.policies.causal_lm import checkpointed_layers

            context = checkpointed_layers(model)  # the policy's activation checkpointing (CausalLMPolicy option)
        with context:
            h = decoder(input_ids=batch.input_ids, attention_mask=attn, position_ids=batch.position_ids,
                        use_cache=False).last_hidden_state  # (R, L, H)
        m = batch.target_mask[:, 1:]  # (R, L-1): position i-1 predicts token i
        lp, _ = token_logprobs(h[:, :-1][m], head.weight, batch.input_ids[:, 1:][m], bias=head.bias,
                               chunk_size=self.chunk_size)  # (N,)
        return -lp.sum(), m.sum()


# ====================================================================== data
class SFTSource:
    """Base class of SFT example sources: ``make(n, seed) -> list[dict]`` with at least ``prompt`` and
    ``response`` (other keys travel along: a verifier may read ``answer``, ``task``, ...). ``n`` None = all the
    source has (a generated source uses its own default size)."""

    def make(self, n: int | None, seed: int) -> list[dict]:
        raise NotImplementedError


class Records(SFTSource):
    """A local JSONL / JSON / Parquet file of examples (``common.files.read_rows``: no network, no cache).

    Args:
        path: the .jsonl / .json / .parquet file.
        prompt_column: the column holding the prompt (the user message).
        response_column: the column holding the target response.
    """

    def __init__(self, path: str, prompt_column: str = "prompt", response_column: str = "response"):
        suffix = Path(path).suffix
        self.kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if self.kind is None:
            raise ValueError(f"Records: path must end in .jsonl, .json or .parquet, got {path!r}")
        self.path, self.prompt_column, self.response_column = str(path), prompt_column, response_column
        p = Path(path)
        if not p.is_file():  # at start-up, before any model is loaded
            raise FileNotFoundError(f"Records: path {self.path!r} is not a file (resolved: {p.resolve()})")
        if p.stat().st_size == 0:
            raise ValueError(f"Records: path {self.path!r} is empty")

    def make(self, n: int | None, seed: int) -> list[dict]:
        try:
            rows = read_rows(self.path)  # common.files: the same reader as the task sources' local files
        except ValueError as error:
            raise ValueError(f"Records: path {self.path!r} is not readable as {self.kind}: {error}") from None
        cols = {"prompt_column": self.prompt_column, "response_column": self.response_column}
        missing = [f"{k}={v!r}" for k, v in cols.items() if v not in rows[0]]
        if missing:
            raise ValueError(f"Records: {', '.join(missing)} not in {self.path} (columns: {list(rows[0])})")
        if n is not None and n < len(rows):
            rows = random.Random(seed).sample(rows, n)
        return [{**row, "prompt": str(row[self.prompt_column]), "response": str(row[self.response_column])} for row in rows]


class SFTData(ResumableData):
    """SFT examples from ``sources`` (equal shares), a held-out validation split with no prompt in common with
    training, streamed from the exact data position (``common.data.ResumableData``: resumable, split over DDP ranks).

    Args:
        sources: example sources (:class:`Records`, ``text_reasoning.traces.TaskTraces``, ...).
        train_size: training examples (None = all the sources have; generated sources use their default size).
        val_size: examples held out for validation (validation loss; accuracy when the module has a verifier).
        batch_size: examples per training step on one rank.
        val_batch_size: examples per validation batch.
        seed: seed of the sources, the split and the shuffling.
    """

    def __init__(self, sources: Sequence[SFTSource] = (), train_size: int | None = None, val_size: int = 0,
                 batch_size: int = 8, val_batch_size: int = 32, seed: int = 0):
        super().__init__(batch_size, val_batch_size, seed)
        if not sources:
            raise ValueError("SFTData: sources is empty; give at least one (e.g. common.sft.Records with a path)")
        if val_size < 0 or (train_size is not None and train_size < 1):
            raise ValueError(f"SFTData: train_size must be >= 1 (or None) and val_size >= 0, got {train_size}, {val_size}")
        self.sources, self.train_size, self.val_size = list(sources), train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        k = len(self.sources)
        total = None if self.train_size is None else self.train_size + self.val_size
        drawn = []
        for i, s in enumerate(self.sources):
            n = None if total is None else total // k + (i < total % k)
            drawn += s.make(n, self.seed + i)
        for i, s in enumerate(drawn):
            if not isinstance(s.get("prompt"), str) or not isinstance(s.get("response"), str) or not s["prompt"]:
                raise ValueError(f"SFTData: example {i} needs a non-empty str 'prompt' and a str 'response', got "
                                 f"keys {sorted(s)[:10]}")
        order = torch.randperm(len(drawn), generator=torch.Generator().manual_seed(self.seed + SEED_STRIDE)).tolist()
        drawn = [drawn[i] for i in order]
        val_prompts, val = set(), []
        for s in drawn:
            if len(val) >= self.val_size:
                break
            if s["prompt"] not in val_prompts:
                val_prompts.add(s["prompt"])
                val.append(s)
        train = [s for s in drawn if s["prompt"] not in val_prompts]
        if self.train_size is not None:
            train = train[: self.train_size]
        if len(train) < self.prompts_per_step:
            raise ValueError(f"SFTData: {len(train)} training examples after holding out val_size={self.val_size}, "
                             f"fewer than batch_size={self.prompts_per_step}")
        self.train_set, self.val_set = train, val

    def val_dataloader(self):
        return super().val_dataloader() if self.val_set else []


# ====================================================================== the module
class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a policy on ``{prompt, response}`` examples (module docstring).

    Args:
        policy: a policy source (``common.models.BundledSmolLM2``, ``Pretrained``, ``TinyLlama``), wrapped in a
            ``CausalLMPolicy`` with ``sampling``, ``lora``, ``system_prompt``, ``instruction`` as the RL module
            does; or a ready ``Policy`` with ``.model``, ``.tokenizer`` and ``encode`` (e.g.
            ``diffusion.dllm.policy.MaskedDiffusionPolicy``).
        objective: the loss (default :class:`NextTokenCE`; ``diffusion.dllm.sft.MaskedDiffusionCE``).
        sampling: sampling of validation generations (greedy) and of the policy afterwards.
        lora: LoRA adapters (None = full fine-tuning).
        system_prompt, instruction, chat_template_kwargs, chat_template: as ``CausalLMPolicy`` (the prompt text the
            RL recipe will sample from: give them the same values there).
        gradient_checkpointing: as ``CausalLMPolicy`` (recompute activations in the backward pass).
        pack_length: pack the step's examples into rows of at most this many tokens (None = one example a row).
        max_length: cut each example to this many tokens (the response's end first; None = no limit).
        micro_batch_size: rows per forward/backward (gradient accumulation; the normaliser is the step's).
        lr, weight_decay, max_grad_norm: AdamW and global-norm clipping (0 = off).
        lr_schedule, warmup_steps, total_steps: ``common.schedules`` (default total: trainer.max_steps).
        max_consecutive_skips: a non-finite loss or gradient skips the step; this many in a row raise.
        verifier: if set, validation also generates greedily for each held-out prompt and logs ``val/accuracy``
            (the verifier's score > 0.5); ``--evaluate true`` then prints the change.
        log_samples_every: validation samples written to TensorBoard every this many validations (0 = never).
        output_dir: at the end of fit, save the model here (an HF folder with the tokenizer, LoRA merged; a model
            without ``save_pretrained`` as ``model.safetensors`` of its state dict) for an RL recipe to start from.
    """

    def __init__(self, policy: PolicySource | Policy | None = None, objective: SFTObjective | None = None,
                 sampling: Sampling | None = None, lora: LoRA | None = None, system_prompt: str | None = None,
                 instruction: str = "", pack_length: int | None = None, max_length: int | None = None,
                 micro_batch_size: int | None = None, lr: float = 1e-5, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
                 warmup_steps: int = 0, total_steps: int | None = None, max_consecutive_skips: int = 3,
                 verifier: RewardFunction | None = None, log_samples_every: int = 1, output_dir: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        problems = schedule_problems(lr_schedule, warmup_steps, total_steps)
        if pack_length is not None and pack_length < 2:
            problems.append(f"pack_length must be >= 2 tokens or None, got {pack_length}")
        if max_length is not None and max_length < 2:
            problems.append(f"max_length must be >= 2 tokens or None, got {max_length}")
        if micro_batch_size is not None and micro_batch_size < 1:
            problems.append(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if lr <= 0:
            problems.append(f"lr must be > 0, got {lr}")
        if problems:
            raise ValueError("SFTModule: " + "; ".join(problems))
        lm_args = dict(sampling=sampling, lora=lora, system_prompt=system_prompt, instruction=instruction,
                       chat_template_kwargs=chat_template_kwargs, chat_template=chat_template,
                       gradient_checkpointing=gradient_checkpointing)
        if isinstance(policy, Policy):
            given = [k for k, v in lm_args.items() if v not in (None, "", False)]
            if given:
                raise ValueError(f"SFTModule: {', '.join(given)} belong to the policy's own arguments when policy is a "
                                 "Policy (they build a CausalLMPolicy from a policy source)")
            self.policy = policy
        else:
            from common.policies.causal_lm import CausalLMPolicy

            self.policy = CausalLMPolicy(policy if policy is not None else TinyLlama(), **lm_args)
        for attr in ("model", "tokenizer", "encode"):
            if not hasattr(self.policy, attr):
                raise ValueError(f"SFTModule: policy {type(self.policy).__name__} has no {attr!r}")
        self.automatic_optimization = False
        self.objective = objective if objective is not None else NextTokenCE()
        self.pack_length, self.max_length, self.micro_batch_size = pack_length, max_length, micro_batch_size
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.lr_schedule, self.warmup_steps, self.total_steps = lr_schedule, warmup_steps, total_steps
        self.max_consecutive_skips, self.verifier = max_consecutive_skips, verifier
        self.log_samples_every, self.output_dir = log_samples_every, output_dir
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long))
        self.val_loss_sum, self.val_tokens = MeanMetric(), MeanMetric()  # Σ and count as weighted means (DDP-synced)
        self.val_accuracy = MeanMetric()
        self.val_history: list[tuple[int, float, int]] = []  # (global step, greedy accuracy, problems)
        self._validations = 0

    # ------------------------------------------------------------------ tokenisation
    def collate(self, samples: Sequence[dict]) -> SFTBatch:
        """Prompt tokens from the policy's own encoding (chat template, system prompt, instruction), response tokens
        + EOS (the objective's ``response_ids``) -> an :class:`SFTBatch` on the module's device."""
        return encode_examples(self.policy, self.objective, samples, pack_length=self.pack_length,
                               max_length=self.max_length).to(self.device)

    # ------------------------------------------------------------------ training
    def training_step(self, samples: Sequence[dict], batch_idx: int) -> None:
        t0 = time.perf_counter()
        batch = self.collate(samples)
        world = self.trainer.world_size if self._trainer is not None else 1
        opt = self.optimizers()
        stepper = Stepper(opt, [p for g in opt.param_groups for p in g["params"]], max_grad_norm=self.max_grad_norm,
                          max_consecutive_skips=self.max_consecutive_skips, backward=self.manual_backward,
                          clip=lambda: self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm,
                                                           gradient_clip_algorithm="norm"),
                          skipped=self.skipped_steps, consecutive=self.consecutive_skips, scheduler=self.lr_schedulers())
        lr = torch.tensor(opt.param_groups[0]["lr"])
        loss, count, grad_norm = sft_update(self.policy, self.objective, batch, stepper, micro_batch_size=self.micro_batch_size,
                                            world_size=world)
        real = batch.attention_mask.sum()
        dt = time.perf_counter() - t0
        log = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/response_tokens": count,
               "train/pad_frac": 1 - real.float() / batch.attention_mask.numel(),
               "train/skipped_steps": self.skipped_steps.float(), "perf/tokens_per_s": real.float() / max(dt, 1e-9)}
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=batch.examples, sync_dist=world > 1)
        self.log("loss", loss, prog_bar=True, on_step=True, logger=False, batch_size=batch.examples)

    def configure_optimizers(self):
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = lr_scheduler(opt, self.lr_schedule, self.warmup_steps, self.total_steps or getattr(self._trainer, "max_steps", None))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    # ------------------------------------------------------------------ validation
    def validation_step(self, samples: Sequence[dict], batch_idx: int) -> None:
        batch = self.collate(samples)
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same noise at every validation
        total, count = self.objective(self.policy, batch, generator=g)
        self.val_loss_sum.update(total / max(len(samples), 1), weight=len(samples))
        self.val_tokens.update(count.float() / max(len(samples), 1), weight=len(samples))
        if self.verifier is not None:
            rollouts = self.policy.rollout(list(samples), 1, greedy=True)
            scores = torch.as_tensor(self.verifier(rollouts.completions, rollouts.samples), dtype=torch.float32)
            self.val_accuracy.update((scores > 0.5).float().to(self.device))
            if batch_idx == 0 and self.log_samples_every and isinstance(self.logger, TensorBoardLogger) \
                    and self._validations % self.log_samples_every == 0:
                lines = [f"**score {float(s):.2f}** `{x['prompt'][:300]}` → `{c[:500]}`"
                         for s, x, c in zip(scores[:4].tolist(), rollouts.samples, rollouts.completions)]
                self.logger.experiment.add_text("val_samples", "\n\n".join(lines), self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._validations += 1
        tokens = self.val_tokens.compute()
        self.log("val/loss", self.val_loss_sum.compute() / tokens.clamp(min=1e-9), prog_bar=True)
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        if self.verifier is not None:
            n = int(self.val_accuracy.weight)
            acc = self.val_accuracy.compute()
            self.log("val/accuracy", acc, prog_bar=True)
            if not self.trainer.sanity_checking:
                self.val_history.append((self.global_step, float(acc), n))
            self.val_accuracy.reset()

    # ------------------------------------------------------------------ checkpoints, RNG, export
    def setup(self, stage: str) -> None:
        if stage == "fit":
            seed_rank(self.trainer.world_size, self.trainer.global_rank)
            self.policy.model.train()  # a CausalLMPolicy keeps its model in eval mode for RL; SFT trains it

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rank_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        world, rank = (self._trainer.world_size, self._trainer.global_rank) if fitting else (1, 0)
        load_rank_states(checkpoint, world, rank, fitting)

    def on_fit_end(self) -> None:
        if self.output_dir and self.trainer.is_global_zero:
            save_model(self.policy.model, self.policy.tokenizer, self.output_dir)


def encode_examples(policy: Any, objective: SFTObjective, samples: Sequence[dict], *, pack_length: int | None = None,
                    max_length: int | None = None) -> SFTBatch:
    """Tokenise ``samples`` (``prompt``, ``response``) with ``policy.encode`` (its chat template) and
    ``objective.response_ids`` -> :class:`SFTBatch` (on the CPU). A sample with ``response_segments`` (a list of
    str whose concatenation is ``response``) has each segment tokenised on its own."""
    tok = policy.tokenizer
    ids, mask = policy.encode(samples)  # (E, P) left-padded
    ids, mask = ids.cpu(), mask.cpu()
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]  # ok: tokenisation, once per step
    # a response given as segments (an agent's actions and the environment's observations) is tokenised segment by
    # segment, as its episode is at rollout time, so no BPE token straddles an action/observation boundary
    segments = [s.get("response_segments") or [s["response"]] for s in samples]
    flat = tok([seg for segs in segments for seg in segs], add_special_tokens=False)["input_ids"]
    at = [0] + list(itertools.accumulate(len(segs) for segs in segments))
    responses = [[t for piece in flat[a:b] for t in piece] for a, b in zip(at[:-1], at[1:])]
    responses = [objective.response_ids(r, tok.eos_token_id) for r in responses]
    return collate(prompts, responses, tok.pad_token_id, pack_length=pack_length, max_length=max_length)


def sft_update(policy: Any, objective: SFTObjective, batch: SFTBatch, stepper: Stepper, *,
               micro_batch_size: int | None = None, world_size: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """One optimiser step on ``batch``: the objective's total over micro-batches of ``micro_batch_size`` rows, each
    backward divided by the step's response-token count (all-reduced over DDP ranks, so the gradient is that of
    Σ total / N over the global batch), then ``stepper`` clips and steps (a non-finite step is skipped).
    Returns (this rank's token-mean loss, the global response-token count, the gradient norm), detached; no response
    token at all gives a zero loss and no change, never NaN."""
    count = all_reduce_sum(batch.target_mask.sum().float())  # () the step's response tokens, over all ranks
    norm = count.clamp(min=1) / world_size  # DDP averages gradients over ranks
    R = batch.input_ids.shape[0]
    size = micro_batch_size or R
    total = torch.zeros((), device=batch.input_ids.device)
    for s in range(0, R, size):  # ok: micro-batches of rows (gradient accumulation)
        part, _ = objective(policy, batch.rows(torch.arange(s, min(s + size, R), device=batch.input_ids.device)))
        if part.requires_grad:  # a micro-batch without a response token has nothing to differentiate
            stepper.backward(part / norm)
        total = total + part.detach()
    grad_norm = stepper.step(total)
    return total / batch.target_mask.sum().clamp(min=1), count, grad_norm


class InMemory(PolicySource):
    """An already loaded ``(model, tokenizer)`` as a policy source (plain scripts: ``CausalLMPolicy(InMemory(m, t))``)."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def load(self):
        return self.model, self.tokenizer


def save_model(model: nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """``model`` (LoRA merged into a copy) and ``tokenizer`` as a Hugging Face folder at ``path`` (loadable with
    ``common.models.Pretrained(path)``); a model without ``save_pretrained`` is written as ``model.safetensors``
    of its state dict (e.g. ``diffusion.dllm.model.TinyDiffusionLM(checkpoint=...)``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        # tied weights are written once per key (cloned), so a strict load_state_dict of the file works
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


__all__ = ["NextTokenCE", "Records", "SFTBatch", "SFTData", "SFTModule", "SFTObjective", "SFTSource", "collate",
           "encode_examples", "InMemory", "save_model", "sft_update"]
