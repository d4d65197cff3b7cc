"""LightningModules of the speculative domain: Phase I (EAGLE-3 draft training -> the frozen reference M0) and
Phase II (GTO, arXiv 2509.22134 Algorithm 1).

The network being trained is the draft head; the target (``policy`` in YAML, as in every recipe) is frozen and
only provides features, distributions and verification. There is no sampling rollout: a training step reads
target-aligned sequences. So these are plain LightningModules, not the RL loop (common/loop.py): one training
step is :func:`draft_step` (target features -> TTT token loss [+ ω·L_GTO] -> backward -> clip -> step), which the
reproduction (reproductions/gto.py) calls too. GTO's objective is a part, :class:`GTOObjective` (the frozen M0
and the hyperparameters of L_GTO); its group advantages and clipped surrogate come from ``common`` (``grpo``,
``clipped_surrogate``) through speculative/gto.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from common.metrics import AcceptanceLength
from common.models import PolicySource
from common.rng import rng_state, set_rng_state
from speculative.data import MarkovTarget
from speculative.decode import DecodeStats, SpeculativeDecoder
from speculative.draft import Draft, feature_layers, target_features, ttt_loss
from speculative.gto import (accepted_branch, group_roots, gto_advantages, gto_surrogate, path_logprob,
                             prefix_trees, tree_reward, verify_prefix_trees)

__all__ = ["EagleModule", "GTOModule", "GTOObjective", "draft_step", "load_draft", "save_draft"]


def save_draft(draft: Draft, path: str | Path) -> None:
    """The draft's weights as safetensors, without the frozen token embedding (it is the target's: 113 MB for
    SmolLM2); ``d2t`` is included, so ``Draft.from_target(target, draft_vocab=file["d2t"])`` rebuilds it."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in draft.state_dict().items() if k != "embed.weight"}, str(path))


def load_draft(draft: Draft, path: str | Path) -> Draft:
    """Load a file written by :func:`save_draft` into a draft built with ``Draft.from_target`` (embedding kept)."""
    from safetensors.torch import load_file

    missing, unexpected = draft.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"embed.weight"}:
        raise ValueError(f"{path} does not match the draft: missing {missing}, unexpected {unexpected}")
    return draft


class GTOObjective(nn.Module):
    """L_GTO of one batch (arXiv 2509.22134 Algorithm 1): K groups of m adjacent prefixes per sequence, each grows
    the decoding-time draft tree; the Draft Tree Reward (smooth max over branches of the expected accepted length,
    verified by the target) is debiased by the frozen reference M0's tree and standardised within each group; the
    surrogate is the PPO-clipped per-token geometric-mean ratio draft / M0 along the longest accepted branch.

    Args:
        reference: the frozen reference draft M0 (never updated).
        omega: ω, the weight of L_GTO in L = L_token + ω·L_GTO (0.5).
        groups, group_size: K groups of m adjacent prefixes per sequence (paper 16 x 8; 4 x 4 at CPU scale).
        eta: η of the smooth max (1). reduce: "lse" (the paper), "max" or "mean" (ablations).
        clip_eps: ε of the clipped ratio (not stated in the paper; 0.2). std_eps: δ of the standardisation.
        debias: subtract the reference tree's reward (the paper); False is the ablation.
        top_k, depth, total_tokens: the draft tree grown at every root.
    """

    def __init__(self, reference: Draft, *, omega: float = 0.5, groups: int = 4, group_size: int = 4, eta: float = 1.0,
                 reduce: Literal["lse", "max", "mean"] = "lse", clip_eps: float = 0.2, std_eps: float = 1e-6,
                 debias: bool = True, top_k: int = 4, depth: int = 4, total_tokens: int = 16):
        super().__init__()
        self.reference = reference.requires_grad_(False)  # M0
        self.omega, self.groups, self.group_size, self.eta, self.reduce = omega, groups, group_size, eta, reduce
        self.clip_eps, self.std_eps, self.debias = clip_eps, std_eps, debias
        self.tree = dict(top_k=top_k, depth=depth, total_tokens=total_tokens)

    def forward(self, draft: Draft, target: nn.Module, ids: Tensor, valid: Tensor, feats: Tensor, logits: Tensor,
                out) -> tuple[Tensor, dict[str, Tensor]]:
        """L_GTO and its diagnostics. Shapes: ids, valid (B, L); feats, logits: the target's (``target_features``
        with ``use_cache=True``; ``out.past_key_values`` verifies the trees)."""
        seq, roots, gid = group_roots(valid, self.groups, self.group_size)  # (Bt,) each
        L = ids.shape[1] - 1
        pos = torch.arange(L, device=ids.device).expand(ids.shape[0], L)
        g0, ctx = draft.context(feats[:, :-1], ids[:, 1:], pos)  # with grad: the ratio's numerator
        with torch.no_grad():
            tree = prefix_trees(draft, (ctx[0].detach(), ctx[1].detach()), g0.detach(), ids, seq, roots, **self.tree)
            probs, choice = verify_prefix_trees(target, out.past_key_values, logits, seq, roots, tree)
            r = tree_reward(probs, tree, self.eta, self.reduce)  # (Bt,)
            g0_ref, ctx_ref = self.reference.context(feats[:, :-1], ids[:, 1:], pos)
            r_ref = None
            if self.debias:
                ref_tree = prefix_trees(self.reference, ctx_ref, g0_ref, ids, seq, roots, **self.tree)
                r_ref = tree_reward(verify_prefix_trees(target, out.past_key_values, logits, seq, roots, ref_tree)[0],
                                    ref_tree, self.eta, self.reduce)
            adv = gto_advantages(r, r_ref, gid, eps=self.std_eps, standardise=self.group_size > 1)
            tokens, length = accepted_branch(tree, choice)  # Ŝ_i, l_i
            ref_logp = path_logprob(self.reference, ctx_ref, g0_ref, seq, roots, tokens, length)
        logp = path_logprob(draft, ctx, g0, seq, roots, tokens, length)
        loss_gto, clip_frac = gto_surrogate(logp, ref_logp, length, adv, gid, clip_eps=self.clip_eps)
        metrics = {"loss_gto": loss_gto.detach(), "tree_reward": r.mean(), "accepted_len": length.float().mean() + 1,
                   "clip_frac": clip_frac}
        if r_ref is not None:
            metrics["tree_reward_gain"] = (r - r_ref).mean()
        return loss_gto, metrics


def draft_step(target: nn.Module, draft: Draft, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer, *,
               layers: list[int], ttt_steps: int, gto: GTOObjective | None = None, max_grad_norm: float = 0.5,
               backward: Callable[[Tensor], None] | None = None) -> dict[str, Tensor]:
    """One optimiser step of the draft: target features (no grad) -> TTT token loss over ``ttt_steps`` unrolled
    steps [+ ω·L_GTO] -> backward -> clip the global gradient norm to ``max_grad_norm`` (0 = off) -> step.
    ``batch``: ``input_ids`` (B, L) long, ``valid`` (B, L) bool. ``backward`` defaults to ``loss.backward()``
    (the Lightning module passes ``manual_backward``). Returns the step's metrics (detached)."""
    ids, valid = batch["input_ids"], batch["valid"]
    with torch.no_grad():
        feats, logits, out = target_features(target, ids, layers, use_cache=gto is not None)
    loss_token, acc = ttt_loss(draft, feats, logits, ids, valid, ttt_steps)
    loss, metrics = loss_token, {}
    if gto is not None:
        loss_gto, metrics = gto(draft, target, ids, valid, feats, logits, out)
        loss = loss_token + gto.omega * loss_gto
    optimizer.zero_grad(set_to_none=True)
    (backward if backward is not None else Tensor.backward)(loss)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in draft.parameters() if p.requires_grad],
                                               max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    return {"loss": loss.detach(), "loss_token": loss_token.detach(), "top1_acc": acc, "grad_norm": grad_norm, **metrics}


class EagleModule(L.LightningModule):
    """Phase I: train an EAGLE-3 draft head for a frozen target with the TTT token-level loss.

    Args:
        policy: the frozen target's source (``speculative.data.MarkovTarget`` (default),
            ``common.models.BundledSmolLM2``, ...); loaded into ``self.target``.
        ttt_steps: TTT unroll n (EAGLE-3: 7; 3 at CPU scale).
        top_k, depth, total_tokens: the decoding tree used in validation (and by GTO's trees).
        lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW with linear warm-up and gradient clipping.
        train_head: train the draft's norm and LM head (EAGLE-3) or keep the target's frozen.
        draft_init: safetensors file to start the draft from (default: fresh, head copied from the target).
        save_draft: write the trained draft here at the end of fit (Phase II's reference M0).
        val_prefix, val_new_tokens, val_temperature: validation = speculative decoding of each held-out
            sequence's first ``val_prefix`` tokens; logs ``val/tau``.
        seed: draft initialisation seed.
    """

    def __init__(self, policy: PolicySource | None = None, ttt_steps: int = 3, top_k: int = 4, depth: int = 4,
                 total_tokens: int = 16, lr: float = 3e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_grad_norm: float = 0.5,
                 train_head: bool = True, draft_init: str | None = None, save_draft: str | None = None,
                 val_prefix: int = 16, val_new_tokens: int = 32, val_temperature: float = 0.0, seed: int = 0):
        super().__init__()
        if ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
        self.automatic_optimization = False  # draft_step does backward, clipping and the step
        self.target, _ = (policy if policy is not None else MarkovTarget()).load()
        self.target.eval().requires_grad_(False)
        self.layers = feature_layers(self.target.config.num_hidden_layers)
        self.draft = Draft.from_target(self.target, train_head=train_head, seed=seed)
        if draft_init:
            load_draft(self.draft, draft_init)
        self.gto: GTOObjective | None = None  # Phase II's objective (GTOModule)
        self.ttt_steps, self.top_k, self.depth, self.total_tokens = ttt_steps, top_k, depth, total_tokens
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.max_grad_norm, self.save_draft_path = max_grad_norm, save_draft
        self.val_prefix, self.val_new_tokens, self.val_temperature = val_prefix, val_new_tokens, val_temperature
        self.val_tau = AcceptanceLength()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        metrics = draft_step(self.target, self.draft, batch, self.optimizers(), layers=self.layers,
                             ttt_steps=self.ttt_steps, gto=self.gto, max_grad_norm=self.max_grad_norm,
                             backward=self.manual_backward)
        self.lr_schedulers().step()
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.draft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        warm = max(self.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return [opt], [sched]

    def on_train_end(self) -> None:
        if self.save_draft_path and self.trainer.is_global_zero:
            save_draft(self.draft, self.save_draft_path)

    # ------------------------------------------------------------------ checkpointed RNG (exact resume)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["advlab_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "advlab_rng" in checkpoint:
            set_rng_state(checkpoint["advlab_rng"])

    # ------------------------------------------------------------------ validation: τ of tree decoding
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        decoder = SpeculativeDecoder(self.target, self.draft, self.top_k, self.depth, self.total_tokens,
                                     self.val_temperature, self.layers)
        for ids, valid in zip(batch["input_ids"], batch["valid"]):  # batch 1 decoding, one sequence at a time
            stats = DecodeStats()
            decoder.generate(ids[valid][None, : self.val_prefix], self.val_new_tokens, stats=stats)
            self.val_tau.update(torch.tensor(stats.accepted, device=self.device))

    def on_validation_epoch_end(self) -> None:
        self.log("val/tau", self.val_tau.compute(), prog_bar=True)
        self.val_tau.reset()


class GTOModule(EagleModule):
    """Phase II: Group Tree Optimization from the frozen reference draft M0 (``reference``): EAGLE-3's module with
    the :class:`GTOObjective` part added to the token loss.

    Args (besides EagleModule's):
        reference: safetensors file of M0 (Phase I's draft); the policy draft starts from it unless
            ``draft_init`` says otherwise. M0 is a frozen copy that never changes (``self.gto.reference``).
        omega, groups, group_size, eta, reduce, clip_eps, std_eps, debias: see :class:`GTOObjective`.
    """

    def __init__(self, policy: PolicySource | None = None, reference: str | None = None, omega: float = 0.5,
                 groups: int = 4, group_size: int = 4, eta: float = 1.0,
                 reduce: Literal["lse", "max", "mean"] = "lse", clip_eps: float = 0.2, std_eps: float = 1e-6,
                 debias: bool = True, ttt_steps: int = 3, top_k: int = 4, depth: int = 4, total_tokens: int = 16,
                 lr: float = 5e-5, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 0, max_grad_norm: float = 0.5, train_head: bool = True,
                 draft_init: str | None = None, save_draft: str | None = None, val_prefix: int = 16,
                 val_new_tokens: int = 32, val_temperature: float = 0.0, seed: int = 0):
        if reference is None:
            raise ValueError("reference must name the Phase I draft file (M0), e.g. the eagle recipe's save_draft")
        super().__init__(policy=policy, ttt_steps=ttt_steps, top_k=top_k, depth=depth, total_tokens=total_tokens, lr=lr,
                         weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                         train_head=train_head, draft_init=draft_init or reference, save_draft=save_draft,
                         val_prefix=val_prefix, val_new_tokens=val_new_tokens, val_temperature=val_temperature, seed=seed)
        self.gto = GTOObjective(load_draft(copy.deepcopy(self.draft), reference), omega=omega, groups=groups,
                                group_size=group_size, eta=eta, reduce=reduce, clip_eps=clip_eps, std_eps=std_eps,
                                debias=debias, top_k=top_k, depth=depth, total_tokens=total_tokens)
