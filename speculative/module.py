"""LightningModules of the speculative domain: Phase I (EAGLE-3 draft training -> the frozen reference M0) and
Phase II (GTO, arXiv 2509.22134 Algorithm 1), both the shared update loop (common/module.py, common/loop.py).

The network being trained is the draft head, as the policy ``speculative.policy.DraftPolicy``; the target
(``policy`` in YAML, as in every recipe) is frozen and only provides features, distributions and verification.
A training step is the loop's: the rollout grows and verifies the draft trees at K x m roots (Phase II), the
estimator standardises the debiased Draft Tree Rewards in groups (``speculative.gto.GTOAdvantage``), the loss is
ω·L_GTO (``speculative.gto.GTOLoss``, the clipped geometric-mean ratio to M0) plus the TTT token loss (the method
part ``speculative.policy.TokenLoss``): L = L_token + ω·L_GTO. Phase I is the same loop with ω = 0 and no trees.
These modules only build those parts, decode the validation prefixes (``val/tau``) and write the draft file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from common.advantages.base import AdvantageEstimator
from common.losses.base import PolicyLoss
from common.metrics import AcceptanceLength
from common.models import PolicySource
from common.module import PolicyOptimizationModule
from speculative.data import MarkovTarget
from speculative.decode import DecodeStats, SpeculativeDecoder
from speculative.draft import Draft, feature_layers
from speculative.gto import GTOAdvantage, GTOLoss
from speculative.policy import DraftPolicy, TokenLoss

__all__ = ["DraftModule", "EagleModule", "GTOModule", "load_draft", "save_draft"]


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


class DraftModule(PolicyOptimizationModule):
    """The shared loop over a :class:`DraftPolicy` (module docstring); build it with :class:`EagleModule` or
    :class:`GTOModule`. Adds only AdamW's betas, the validation τ and the draft file written at the end of fit.

    Args:
        policy: the DraftPolicy. loss: ``GTOLoss`` (ω = 0 in Phase I; typed as the general ``PolicyLoss`` slot).
            advantage: ``GTOAdvantage``.
        ttt_steps: the TTT unroll n of the token loss (``TokenLoss``). group_size: m (the loop's G).
        lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW, linear warm-up (common/schedules.py), clipping.
        top_k, depth, total_tokens, val_prefix, val_new_tokens, val_temperature: validation = speculative decoding
            of each held-out sequence's first ``val_prefix`` tokens with this tree; logs ``val/tau``.
        save_draft: write the trained draft here at the end of fit.
        canaries: the loop's run-time checks (off in Phase I, whose rewards are all 0 by design).
    """

    def __init__(self, policy: DraftPolicy, loss: PolicyLoss, advantage: AdvantageEstimator, *, ttt_steps: int,
                 group_size: int, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                 max_grad_norm: float, top_k: int, depth: int, total_tokens: int, save_draft: str | None,
                 val_prefix: int, val_new_tokens: int, val_temperature: float, canaries: bool):
        super().__init__(policy, advantage=advantage, loss=loss, methods=[TokenLoss(ttt_steps)], group_size=group_size,
                         lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
                         log_samples_every=0, canaries=canaries)
        self.betas, self.save_draft_path = tuple(betas), save_draft
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.val_prefix, self.val_new_tokens, self.val_temperature = val_prefix, val_new_tokens, val_temperature
        self.val_tau = AcceptanceLength()

    @property
    def draft(self) -> Draft:
        return self.policy.draft

    @property
    def target(self) -> torch.nn.Module:
        return self.policy.target

    def configure_optimizers(self):
        """The shared AdamW and schedule, with the recipe's betas (EAGLE-3 / GTO: (0.9, 0.95))."""
        out = super().configure_optimizers()
        for group in (out if isinstance(out, torch.optim.Optimizer) else out["optimizer"]).param_groups:
            group["betas"] = self.betas
        return out

    def on_train_end(self) -> None:
        if self.save_draft_path and self.trainer.is_global_zero:
            save_draft(self.policy.draft, self.save_draft_path)

    # ------------------------------------------------------------------ validation: τ of tree decoding
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        decoder = SpeculativeDecoder(self.policy.target, self.policy.draft, self.top_k, self.depth, self.total_tokens,
                                     self.val_temperature, self.policy.layers)
        for ids, valid in zip(batch["input_ids"], batch["valid"]):  # batch 1 decoding, one sequence at a time
            stats = DecodeStats()
            decoder.generate(ids[valid][None, : self.val_prefix], self.val_new_tokens, stats=stats)
            self.val_tau.update(torch.tensor(stats.accepted, device=self.device))

    def on_validation_epoch_end(self) -> None:
        self.log("val/tau", self.val_tau.compute(), prog_bar=True)
        self.val_tau.reset()


def draft_for(policy: PolicySource | None, train_head: bool, seed: int, draft_init: str | None):
    """(frozen target, its feature layers, a draft for it: fresh with the target's head, or loaded)."""
    target, _ = (policy if policy is not None else MarkovTarget()).load()
    target.eval().requires_grad_(False)
    draft = Draft.from_target(target, train_head=train_head, seed=seed)
    if draft_init:
        load_draft(draft, draft_init)
    return target, feature_layers(target.config.num_hidden_layers), draft


class EagleModule(DraftModule):
    """Phase I: train an EAGLE-3 draft head for a frozen target with the TTT token-level loss (the shared loop with
    ω = 0: no trees, no reward).

    Args:
        policy: the frozen target's source (``speculative.data.MarkovTarget`` (default),
            ``common.models.BundledSmolLM2``, ...).
        ttt_steps: TTT unroll n (EAGLE-3: 7; 3 at CPU scale).
        top_k, depth, total_tokens: the decoding tree used in validation.
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
        target, layers, draft = draft_for(policy, train_head, seed, draft_init)
        super().__init__(DraftPolicy(target, draft, layers, top_k=top_k, depth=depth, total_tokens=total_tokens),
                         GTOLoss(omega=0.0), GTOAdvantage(), ttt_steps=ttt_steps, group_size=1, lr=lr,
                         weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                         top_k=top_k, depth=depth, total_tokens=total_tokens, save_draft=save_draft,
                         val_prefix=val_prefix, val_new_tokens=val_new_tokens, val_temperature=val_temperature,
                         canaries=False)


class GTOModule(DraftModule):
    """Phase II: Group Tree Optimization from the frozen reference draft M0 (``reference``):
    L = L_token + ω·L_GTO through the shared loop (module docstring).

    Args (besides EagleModule's):
        reference: safetensors file of M0 (Phase I's draft); the policy draft starts from it unless
            ``draft_init`` says otherwise. M0 is a frozen copy that never changes (``policy.reference``).
        omega: ω, the weight of L_GTO (0.5).
        groups, group_size: K groups of m adjacent prefixes per sequence (paper 16 x 8; 4 x 4 at CPU scale).
        eta: η of the smooth max (1). reduce: "lse" (the paper), "max" or "mean" (ablations).
        clip_eps: ε of the clipped ratio (not stated in the paper; 0.2). std_eps: δ of the standardisation.
        debias: subtract the reference tree's reward (the paper); False is the ablation.
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
        target, layers, draft = draft_for(policy, train_head, seed, draft_init or reference)
        m0 = load_draft(copy.deepcopy(draft), reference)
        policy_ = DraftPolicy(target, draft, layers, m0, groups=groups, group_size=group_size, eta=eta, reduce=reduce,
                              debias=debias, top_k=top_k, depth=depth, total_tokens=total_tokens)
        super().__init__(policy_, GTOLoss(omega=omega, clip_eps=clip_eps),
                         GTOAdvantage(std_eps=std_eps, standardise=group_size > 1), ttt_steps=ttt_steps,
                         group_size=group_size, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, top_k=top_k, depth=depth,
                         total_tokens=total_tokens, save_draft=save_draft, val_prefix=val_prefix,
                         val_new_tokens=val_new_tokens, val_temperature=val_temperature, canaries=True)
