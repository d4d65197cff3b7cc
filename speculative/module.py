"""LightningModules of the speculative domain: Phase I (EAGLE-3 draft training -> the frozen reference M0) and
Phase II (GTO, arXiv 2509.22134 Algorithm 1).

The policy being trained is the draft head; the target (``policy`` in YAML, as in every recipe) is frozen and
only provides features, distributions and verification. There is no sampling rollout: a training step reads
target-aligned sequences, so ``training_step`` replaces the shared rollout loop of PolicyOptimizationModule
(whose constructor, checkpointed RNG and CLI integration are reused). GTO's group advantages and clipped
surrogate come from ``common`` (``grpo``, ``clipped_surrogate``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from common.metrics import AcceptanceLength
from common.models import PolicySource
from common.module import PolicyOptimizationModule
from speculative.decode import DecodeStats, SpeculativeDecoder
from speculative.draft import Draft, feature_layers, target_features, ttt_loss
from speculative.gto import (accepted_branch, group_roots, gto_advantages, gto_surrogate, path_logprob,
                             prefix_trees, tree_reward, verify_prefix_trees)

__all__ = ["EagleModule", "GTOModule", "load_draft", "save_draft"]


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


class EagleModule(PolicyOptimizationModule):
    """Phase I: train an EAGLE-3 draft head for a frozen target with the TTT token-level loss.

    Args:
        policy: the frozen target (``speculative.data.MarkovTarget``, ``common.models.BundledSmolLM2``, ...).
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
        super().__init__(policy=policy, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        if ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
        self.policy.eval().requires_grad_(False)
        self.layers = feature_layers(self.policy.config.num_hidden_layers)
        self.draft = Draft.from_target(self.policy, train_head=train_head, seed=seed)
        if draft_init:
            load_draft(self.draft, draft_init)
        self.ttt_steps, self.top_k, self.depth, self.total_tokens = ttt_steps, top_k, depth, total_tokens
        self.betas, self.warmup_steps = tuple(betas), warmup_steps
        self.save_draft_path = save_draft
        self.val_prefix, self.val_new_tokens, self.val_temperature = val_prefix, val_new_tokens, val_temperature
        self.val_tau = AcceptanceLength()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids, valid = batch["input_ids"], batch["valid"]
        with torch.no_grad():
            feats, logits, out = target_features(self.policy, ids, self.layers, use_cache=self.needs_cache)
        loss_token, acc = ttt_loss(self.draft, feats, logits, ids, valid, self.ttt_steps)
        loss, metrics = self.objective(ids, valid, feats, logits, out, loss_token)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.draft.parameters() if p.requires_grad],
                                                   self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        opt.step()
        self.lr_schedulers().step()
        log = {"train/loss": loss.detach(), "train/loss_token": loss_token.detach(), "train/top1_acc": acc,
               "train/grad_norm": grad_norm, **{f"train/{k}": v for k, v in metrics.items()}}
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=ids.shape[0])

    needs_cache = False

    def objective(self, ids, valid, feats, logits, out, loss_token) -> tuple[Tensor, dict[str, Tensor]]:
        """Phase I: the token-level loss alone."""
        return loss_token, {}

    def configure_optimizers(self):
        params = [p for p in self.draft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        warm = max(self.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return [opt], [sched]

    def on_train_end(self) -> None:
        if self.save_draft_path and self.trainer.is_global_zero:
            save_draft(self.draft, self.save_draft_path)

    # ------------------------------------------------------------------ validation: τ of tree decoding
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        decoder = SpeculativeDecoder(self.policy, self.draft, self.top_k, self.depth, self.total_tokens,
                                     self.val_temperature, self.layers)
        for ids, valid in zip(batch["input_ids"], batch["valid"]):  # batch 1 decoding, one sequence at a time
            stats = DecodeStats()
            decoder.generate(ids[valid][None, : self.val_prefix], self.val_new_tokens, stats=stats)
            self.val_tau.update(torch.tensor(stats.accepted, device=self.device))

    def on_validation_epoch_end(self) -> None:
        self.log("val/tau", self.val_tau.compute(), prog_bar=True)
        self.val_tau.reset()


class GTOModule(EagleModule):
    """Phase II: Group Tree Optimization from the frozen reference draft M0 (``reference``).

    Args (besides EagleModule's):
        reference: safetensors file of M0 (Phase I's draft); the policy draft starts from it unless
            ``draft_init`` says otherwise. M0 is a frozen copy that never changes.
        omega: ω, the weight of L_GTO (0.5).
        groups, group_size: K groups of m adjacent prefixes per sequence (paper 16 x 8; 4 x 4 at CPU scale).
        eta: η of the smooth max (1). reduce: "lse" (the paper), "max" or "mean" (ablations).
        clip_eps: ε of the clipped ratio (not stated in the paper; 0.2). std_eps: δ of the standardisation.
        debias: subtract the reference tree's reward (the paper); False is the ablation.
    """

    needs_cache = True

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
        super().__init__(policy, ttt_steps, top_k, depth, total_tokens, lr, weight_decay, betas, warmup_steps,
                         max_grad_norm, train_head, draft_init or reference, save_draft, val_prefix, val_new_tokens,
                         val_temperature, seed)
        self.reference_draft = load_draft(copy.deepcopy(self.draft), reference).requires_grad_(False)  # M0
        self.omega, self.groups, self.group_size, self.eta, self.reduce = omega, groups, group_size, eta, reduce
        self.clip_eps, self.std_eps, self.debias = clip_eps, std_eps, debias

    def objective(self, ids, valid, feats, logits, out, loss_token) -> tuple[Tensor, dict[str, Tensor]]:
        seq, roots, gid = group_roots(valid, self.groups, self.group_size)  # (Bt,) each
        L = ids.shape[1] - 1
        pos = torch.arange(L, device=ids.device).expand(ids.shape[0], L)
        g0, ctx = self.draft.context(feats[:, :-1], ids[:, 1:], pos)  # with grad: the ratio's numerator
        tree_kw = dict(top_k=self.top_k, depth=self.depth, total_tokens=self.total_tokens)
        with torch.no_grad():
            tree = prefix_trees(self.draft, (ctx[0].detach(), ctx[1].detach()), g0.detach(), ids, seq, roots, **tree_kw)
            probs, choice = verify_prefix_trees(self.policy, out.past_key_values, logits, seq, roots, tree)
            r = tree_reward(probs, tree, self.eta, self.reduce)  # (Bt,)
            g0_ref, ctx_ref = self.reference_draft.context(feats[:, :-1], ids[:, 1:], pos)
            r_ref = None
            if self.debias:
                ref_tree = prefix_trees(self.reference_draft, ctx_ref, g0_ref, ids, seq, roots, **tree_kw)
                r_ref = tree_reward(verify_prefix_trees(self.policy, out.past_key_values, logits, seq, roots,
                                                        ref_tree)[0], ref_tree, self.eta, self.reduce)
            adv = gto_advantages(r, r_ref, gid, eps=self.std_eps, standardise=self.group_size > 1)
            tokens, length = accepted_branch(tree, choice)  # Ŝ_i, l_i
            ref_logp = path_logprob(self.reference_draft, ctx_ref, g0_ref, seq, roots, tokens, length)
        logp = path_logprob(self.draft, ctx, g0, seq, roots, tokens, length)
        loss_gto, clip_frac = gto_surrogate(logp, ref_logp, length, adv, gid, clip_eps=self.clip_eps)
        metrics = {"loss_gto": loss_gto.detach(), "tree_reward": r.mean(), "accepted_len": length.float().mean() + 1,
                   "clip_frac": clip_frac}
        if r_ref is not None:
            metrics["tree_reward_gain"] = (r - r_ref).mean()
        return loss_token + self.omega * loss_gto, metrics
