"""The EAGLE-3 draft as a Policy of the shared loop (common/loop.py), and EAGLE-3's token loss as a method part.

One training step of either phase is the loop's step over these parts (DESIGN.md, "The update loop"):

    1. rollout     target-aligned sequences (the data's batch) -> the target's features; Phase II (GTO, arXiv
                   2509.22134 Algorithm 1) grows the draft's decoding-time tree at K x m roots per sequence and
                   verifies it with the frozen target: one row per root, the action = the longest accepted
                   branch Ŝ_i, the group = its m adjacent roots, the reward = the Draft Tree Reward debiased by the
                   frozen reference M0's tree, R_i = r_i − r̄_i (GTO eq. 6-9). Phase I: one row per sequence and
                   nothing drafted (no reward, no advantage).
    4. advantages  group standardisation of R (``speculative.gto.GTOAdvantage``: GRPO's, GTO eq. 10)
    6. loss        ω·L_GTO (``speculative.gto.GTOLoss``: the PPO clip of the per-token geometric-mean ratio
                   draft / M0 along Ŝ_i, from ``forward`` and ``forward(reference=True)``) + the TTT token loss
                   (:class:`TokenLoss`, EAGLE-3 arXiv 2503.01840 §3.2), L = L_token + ω·L_GTO (GTO eq. 11)

The target is frozen and only provides features, distributions and verification; the trained parameters are
the draft's. Per-row data are declared: ``completion_ids`` (Bt, 1, D) the branch tokens (one action per row),
``inputs``: ``sequence``, ``valid`` (Bt, S) the row's sequence, ``seq`` (Bt,) its index in the step, ``root``
(Bt,) the root r (the prefix ends at x_{r+1}), ``length`` (Bt,) l_i. The target features are recomputed from
``sequence`` where a part needs them (one target forward of the step's distinct sequences, no gradient) rather
than carried per row: Bt = B·K·m copies of (S, 3h) features and (S, V) logits would not fit at paper scale.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.losses.aggregate import Normaliser
from common.losses.base import LossOutput
from common.methods.base import Method
from common.policies.base import Policy, PolicyOutput
from speculative.draft import Draft, target_features, ttt_loss
from speculative.gto import accepted_branch, group_roots, path_logprob, prefix_trees, tree_reward, verify_prefix_trees

__all__ = ["DraftPolicy", "TokenLoss"]


def distinct_sequences(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """The step's sequences that the rows of ``batch`` belong to, once each, in step order.
    Shapes -> ids (U, S), valid (U, S), inverse (Bt,) the row's index into them."""
    seq = batch.inputs["seq"]  # (Bt,)
    uniq, inverse = torch.unique(seq, return_inverse=True)  # (U,), (Bt,)
    rows = torch.arange(len(seq), device=seq.device)
    first = torch.full((len(uniq),), len(seq), dtype=torch.long, device=seq.device).scatter_reduce_(
        0, inverse, rows, "amin")  # (U,) the first row of each sequence
    return batch.inputs["sequence"][first], batch.inputs["valid"][first], inverse


class DraftPolicy(Policy):
    """The draft head being trained, with the frozen target it drafts for (module docstring).

    Args:
        target: the frozen target (a HF causal LM; never updated).
        draft: the EAGLE-3 draft head (``speculative.draft.Draft``): its trainable parameters are the policy's.
        layers: the target's hidden-state indices fused into the draft's features (``feature_layers``).
        reference: the frozen reference draft M0 (Phase II); None = Phase I (no trees are grown).
        groups, group_size: K groups of m adjacent roots per sequence (paper 16 x 8; 4 x 4 at CPU scale).
        eta, reduce: η and the reduction of the Draft Tree Reward ("lse" the paper; "max", "mean" ablations).
        debias: subtract M0's tree reward (the paper); False is the ablation.
        top_k, depth, total_tokens: the draft tree grown at every root.
    """

    def __init__(self, target: nn.Module, draft: Draft, layers: tuple[int, int, int], reference: Draft | None = None,
                 *, groups: int = 4, group_size: int = 4, eta: float = 1.0,
                 reduce: Literal["lse", "max", "mean"] = "lse", debias: bool = True, top_k: int = 4, depth: int = 4,
                 total_tokens: int = 16):
        super().__init__()
        problems = []
        if groups < 1 or group_size < 1:
            problems.append(f"groups and group_size must be >= 1, got {groups} and {group_size}")
        if eta <= 0:
            problems.append(f"eta must be > 0, got {eta}")
        if reduce not in ("lse", "max", "mean"):
            problems.append(f"reduce must be 'lse', 'max' or 'mean', got {reduce!r}")
        if problems:
            raise ValueError("DraftPolicy: " + "; ".join(problems))
        self.target = target.eval().requires_grad_(False)
        self.draft, self.layers = draft, tuple(layers)
        self.reference = None if reference is None else reference.requires_grad_(False)  # M0
        self.groups, self.group_size, self.eta, self.reduce, self.debias = groups, group_size, eta, reduce, debias
        self.tree = dict(top_k=top_k, depth=depth, total_tokens=total_tokens)

    # ------------------------------------------------------------------ step 1
    @torch.no_grad()
    def rollout(self, prompts: dict[str, Tensor], n: int = 1, *, greedy: bool = False) -> RolloutBatch:
        """``prompts``: the data's batch, ``input_ids`` (B, S) long and ``valid`` (B, S) bool (right padding).
        Phase II: Bt = B·K·m rows, one per root (``n`` is the loop's group size m; the groups are the roots').
        Phase I: B rows, nothing drafted."""
        ids, valid = prompts["input_ids"], prompts["valid"]  # (B, S) each
        if ids.dim() != 2 or valid.shape != ids.shape:
            raise ValueError(f"prompts must hold input_ids and valid of one shape (B, S), got "
                             f"{tuple(ids.shape)} and {tuple(valid.shape)}")
        B, S = ids.shape
        if self.reference is None:  # Phase I: the token loss only
            seq = torch.arange(B, device=ids.device)
            zeros = torch.zeros(B, device=ids.device)
            return RolloutBatch(completion_ids=torch.zeros(B, 1, 1, dtype=torch.long, device=ids.device),
                                completion_mask=torch.ones(B, 1, dtype=torch.bool, device=ids.device), group_ids=seq,
                                rewards=zeros, reward_components=zeros[:, None][:, :0], advantages=zeros,
                                inputs=dict(sequence=ids, valid=valid, seq=seq, root=torch.zeros_like(seq),
                                            length=torch.zeros_like(seq)))
        feats, logits, out = target_features(self.target, ids, self.layers, use_cache=True)  # (B, S, 3h), (B, S, V)
        seq, roots, gid = group_roots(valid, self.groups, self.group_size)  # (Bt,) each
        pos = torch.arange(S - 1, device=ids.device).expand(B, S - 1)
        g0, ctx = self.draft.context(feats[:, :-1], ids[:, 1:], pos)
        tree = prefix_trees(self.draft, ctx, g0, ids, seq, roots, **self.tree)
        probs, choice = verify_prefix_trees(self.target, out.past_key_values, logits, seq, roots, tree)
        r = tree_reward(probs, tree, self.eta, self.reduce)  # (Bt,) r_i
        r_ref = torch.zeros_like(r)
        if self.debias:  # r̄_i: M0's tree at the same root
            g0_ref, ctx_ref = self.reference.context(feats[:, :-1], ids[:, 1:], pos)
            ref_tree = prefix_trees(self.reference, ctx_ref, g0_ref, ids, seq, roots, **self.tree)
            r_ref = tree_reward(verify_prefix_trees(self.target, out.past_key_values, logits, seq, roots, ref_tree)[0],
                                ref_tree, self.eta, self.reduce)
        tokens, length = accepted_branch(tree, choice)  # Ŝ_i (Bt, D), l_i (Bt,)
        return RolloutBatch(completion_ids=tokens[:, None], completion_mask=torch.ones(len(seq), 1, dtype=torch.bool,
                                                                                       device=ids.device),
                            group_ids=gid, rewards=r - r_ref, reward_components=torch.stack([r, r_ref], 1),
                            reward_names=("tree_reward", "reference_tree_reward"),
                            inputs=dict(sequence=ids[seq], valid=valid[seq], seq=seq, root=roots, length=length))

    # ------------------------------------------------------------------ log-probs of the branches
    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """(1/l_i) log M(Ŝ_i | x_{1:i}) per row (M0's with ``reference``): the log of the per-token geometric mean,
        so exp(current − reference) is GTO's ratio s_i. A row with l_i = 0 gets 0 (s_i = 1, no gradient).
        Shapes -> logprobs, entropy (Bt, 1) (entropy 0: not used)."""
        length = batch.inputs["length"]  # (Bt,)
        if self.reference is None:  # Phase I: nothing drafted
            lp = torch.zeros(len(length), 1, device=length.device)
            return PolicyOutput(lp, torch.zeros_like(lp))
        net = self.reference if reference else self.draft
        ids, _, inverse = distinct_sequences(batch)  # (U, S)
        with torch.no_grad():
            feats, _, _ = target_features(self.target, ids, self.layers)
        U, S = ids.shape
        pos = torch.arange(S - 1, device=ids.device).expand(U, S - 1)
        g0, ctx = net.context(feats[:, :-1], ids[:, 1:], pos)  # with gradient: the ratio's numerator
        logp = path_logprob(net, ctx, g0, inverse, batch.inputs["root"], batch.completion_ids[:, 0], length)  # (Bt,)
        lp = (logp / length.clamp(min=1).to(logp.dtype))[:, None]  # (Bt, 1)
        return PolicyOutput(lp, torch.zeros_like(lp))

    def enable_reference(self) -> None:
        if self.reference is None:
            raise ValueError("DraftPolicy: reference (M0, the Phase I draft) is needed by a loss that reads the "
                             "reference log-probs (GTOLoss with omega > 0)")


class TokenLoss(Method):
    """EAGLE-3's training-time-test token loss L_token = Σ_k γ^k CE(p_T, q^{(k)}) (arXiv 2503.01840 §3.2;
    ``speculative.draft.ttt_loss``) over the step's sequences, added to the policy loss (GTO eq. 11:
    L = L_token + ω·L_GTO). It is a mean over the whole step's positions, so the step must be one minibatch of one
    micro-batch (checked at start-up).

    Args:
        ttt_steps: the TTT unroll n (EAGLE-3: 7; 3 at CPU scale).
    """

    def __init__(self, ttt_steps: int = 3):
        super().__init__()
        if ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
        self.ttt_steps = ttt_steps

    def setup(self, loop: Any) -> None:
        if not isinstance(loop.policy, DraftPolicy):
            raise ValueError(f"TokenLoss trains a speculative.policy.DraftPolicy, got {type(loop.policy).__name__}")
        split = {k: v for k, v in (("minibatch_size", loop.minibatch_size), ("micro_batch_size", loop.micro_batch_size),
                                   ("micro_batch_tokens", loop.micro_batch_tokens)) if v is not None}
        if split:
            raise ValueError(f"TokenLoss: the token loss is a mean over the whole step; leave {sorted(split)} unset")

    def extra_loss(self, loop: Any, micro: RolloutBatch, out: PolicyOutput, normaliser: Normaliser) -> LossOutput:
        policy = loop.policy
        ids, valid, _ = distinct_sequences(micro)  # (U, S) each
        with torch.no_grad():
            feats, logits, _ = target_features(policy.target, ids, policy.layers)
        loss, acc = ttt_loss(policy.draft, feats, logits, ids, valid, self.ttt_steps)
        return LossOutput(loss, {"loss_token": loss.detach(), "top1_acc": acc})
