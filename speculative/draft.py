"""The EAGLE-3 draft head: fused target features + token embedding -> one decoder layer -> norm and LM head.

EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test (Li et al. 2025,
arXiv 2503.01840), §3 and the reference code ``SafeAILab/EAGLE`` ``eagle/traineagle3/cnets.py``:

    f_t      = FC([h^low_t ; h^mid_t ; h^high_t])                  (3h -> h, no bias) target features fused
    a_t      = Attn([RMSNorm(e(x_{t+1})) ; RMSNorm(f_t)]) + f_t     attention projections read the 2h concat
    g_t      = MLP(RMSNorm(a_t)) + a_t                              the draft's output hidden state
    q(·|t)   = softmax(LMHead(Norm(g_t)))                           predicts x_{t+2}

Training-time test (TTT): unroll n steps; at step k > 0 the feature input is the draft's own g from step k-1
(no FC), the token is shifted one more position, and a query attends the step-0 keys causally and the keys of
steps 1..k at its own position (the tree of a decoding-time path). The token-level objective (eq. in §3.2):

    L_token = Σ_{k=0}^{n-1} γ^k · CE(p_T(·|x_{≤t+k+1}), q^{(k)}_t)     γ = 0.8, averaged over valid t

The draft vocabulary is the target's, or (EAGLE-3's ``d2t`` map) a subset of Vd frequent target tokens: the head
then has Vd rows, the loss uses the target's distribution restricted to the subset and skips positions whose
target argmax is outside it, and ``logits`` scatters back to the full vocabulary (-inf elsewhere), so decoding
never proposes a token outside the subset. The embedding is the target's, frozen. The norm and LM
head start from the target's; they are trained (EAGLE-3's own head) unless ``train_head=False`` (then frozen).
Shapes: B sequences, L pair positions, h hidden, H heads, V vocabulary, C context keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Draft", "target_features", "feature_layers", "ttt_loss", "ttt_unroll"]

TTT_DECAY = 0.8  # γ in EAGLE-3's code (``ploss_weight = 0.8 ** k``)


def feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Indices into HF ``hidden_states`` (0 = embedding output) for low / mid / high features: EAGLE-3's
    (2, L/2, L-3) for deep targets; (0, L/2, L) for a target of fewer than 6 layers (the toy's 2)."""
    if num_layers >= 6:
        return (2, num_layers // 2, num_layers - 3)
    return (0, num_layers // 2, num_layers)


def target_features(target: nn.Module, input_ids: Tensor, layers: tuple[int, int, int], **kwargs):
    """One target forward; returns (features (B, L, 3h), logits (B, L, V), the model output)."""
    out = target(input_ids=input_ids, output_hidden_states=True, **kwargs)
    feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # (B, L, 3h)
    return feats, out.logits, out


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(h)), eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half form). x (B, H, L, d), pos (B, L) -> (B, H, L, d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = pos[:, None, :, None].float() * inv  # (B, 1, L, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Draft(nn.Module):
    """EAGLE-3 draft head for a Llama-style target.

    Args:
        hidden_size, vocab_size, num_heads, intermediate_size, rms_eps, rope_theta: the layer's shape (use
            :meth:`from_target` to copy them, the embedding, norm and head from a HF causal LM).
        train_head: train the norm and LM head (EAGLE-3) or keep the target's frozen.
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, intermediate_size: int,
                 rms_eps: float = 1e-6, rope_theta: float = 10000.0, train_head: bool = True,
                 draft_vocab: Tensor | None = None):
        super().__init__()
        h = hidden_size
        if h % num_heads:
            raise ValueError(f"hidden_size {h} must be divisible by num_heads {num_heads}")
        self.h, self.heads, self.rope_theta = h, num_heads, rope_theta
        self.embed = nn.Embedding(vocab_size, h).requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.emb_norm, self.feat_norm, self.post_norm = RMSNorm(h, rms_eps), RMSNorm(h, rms_eps), RMSNorm(h, rms_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(2 * h, h, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(h, h, bias=False)
        self.gate, self.up = nn.Linear(h, intermediate_size, bias=False), nn.Linear(h, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, h, bias=False)
        self.norm = RMSNorm(h, rms_eps)
        self.vocab_size = vocab_size
        d2t = torch.arange(vocab_size) if draft_vocab is None else torch.as_tensor(draft_vocab, dtype=torch.long)
        if d2t.dim() != 1 or len(d2t) > vocab_size or bool((d2t < 0).any() | (d2t >= vocab_size).any()):
            raise ValueError(f"draft_vocab must be a 1-D tensor of distinct target token ids < {vocab_size}")
        self.register_buffer("d2t", d2t)  # (Vd,) draft index -> target token
        self.full_vocab = draft_vocab is None
        self.lm_head = nn.Linear(h, len(d2t), bias=False)
        self.norm.requires_grad_(train_head)
        self.lm_head.requires_grad_(train_head)

    @classmethod
    def from_target(cls, target: nn.Module, train_head: bool = True, seed: int = 0,
                    draft_vocab: Tensor | None = None) -> "Draft":
        c = target.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draft = cls(c.hidden_size, c.vocab_size, c.num_attention_heads, c.intermediate_size,
                        getattr(c, "rms_norm_eps", 1e-6), float(getattr(c, "rope_theta", None) or 10000.0), train_head,
                        draft_vocab)
        draft.embed.weight.data.copy_(target.get_input_embeddings().weight.data)
        draft.lm_head.weight.data.copy_(target.get_output_embeddings().weight.data[draft.d2t])
        draft.norm.weight.data.copy_(target.model.norm.weight.data)
        return draft.to(target.dtype)

    def draft_logits(self, g: Tensor) -> Tensor:
        """g (..., h) -> (..., Vd) over the draft vocabulary."""
        return self.lm_head(self.norm(g))

    def logits(self, g: Tensor) -> Tensor:
        """g (..., h) -> (..., V) over the target vocabulary (-inf outside the draft vocabulary)."""
        z = self.draft_logits(g)
        if self.full_vocab:
            return z
        full = z.new_full((*z.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, z)

    def layer(self, tokens: Tensor, features: Tensor, pos: Tensor, past: tuple[Tensor, Tensor] | None,
              mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder layer over L new pairs (token, feature) attending ``past`` keys and themselves.

        Shapes: tokens (B, L), features (B, L, h) (already fused), pos (B, L), past keys/values (B, H, C, d) or
        None, mask (B, L, C + L) bool (True = may attend) -> g (B, L, h), keys (B, H, L, d), values (B, H, L, d).
        """
        B, L, h = features.shape
        x = torch.cat([self.emb_norm(self.embed(tokens)), self.feat_norm(features)], -1)  # (B, L, 2h)
        split = lambda t: t.view(B, L, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731 (B, H, L, d)
        q = _rope(split(self.q_proj(x)), pos, self.rope_theta)
        k = _rope(split(self.k_proj(x)), pos, self.rope_theta)
        v = split(self.v_proj(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])  # (B, H, L, d)
        a = features + self.o_proj(att.transpose(1, 2).reshape(B, L, h))  # (B, L, h)
        y = self.post_norm(a)
        g = a + self.down(F.silu(self.gate(y)) * self.up(y))  # (B, L, h)
        return g, k, v

    def context(self, target_feats: Tensor, next_tokens: Tensor, pos: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Step 0 over pairs (target features h_t, token x_{t+1}), causal among themselves, after ``past``.

        Shapes: target_feats (B, L, 3h), next_tokens (B, L), pos (B, L) -> g (B, L, h), keys/values with the
        new ones appended (B, H, C + L, d)."""
        B, L = next_tokens.shape
        C = 0 if past is None else past[0].shape[2]
        mask = torch.ones(L, C + L, dtype=torch.bool, device=next_tokens.device).tril(C)  # (L, C + L)
        g, k, v = self.layer(next_tokens, self.fc(target_feats), pos, past, mask.expand(B, L, C + L))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        return g, (k, v)


def ttt_unroll(draft: Draft, target_feats: Tensor, input_ids: Tensor, steps: int) -> list[Tensor]:
    """Training-time test: the draft unrolled ``steps`` times over a sequence (teacher-forced tokens).

    Step k at pair position t reads token x_{t+k+1} and (k > 0) the draft's own g^{(k-1)}_t; it attends step-0
    keys at positions <= t and the keys of steps 1..k at position t. Shapes: target_feats (B, S, 3h), input_ids
    (B, S) -> ``steps`` tensors g^{(k)} (B, S-1, h); g^{(k)}_t predicts x_{t+k+2}.
    """
    B, S = input_ids.shape
    L = S - 1
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
    eye = torch.eye(L, dtype=torch.bool, device=input_ids.device)
    pad = torch.zeros(B, steps, dtype=torch.long, device=input_ids.device)
    shifted = torch.cat([input_ids, pad], 1)  # (B, S + steps) tokens past the end are masked out of the loss
    feats = draft.fc(target_feats[:, :-1])  # (B, L, h)
    outs, keys, values = [], None, None
    for k in range(steps):
        mask = torch.cat([causal] + [eye] * k, 1).expand(B, L, (k + 1) * L)  # (B, L, (k+1)L)
        g, kk, vv = draft.layer(shifted[:, 1 + k : 1 + k + L], feats, pos + k, None if k == 0 else (keys, values), mask)
        keys = kk if keys is None else torch.cat([keys, kk], 2)
        values = vv if values is None else torch.cat([values, vv], 2)
        outs.append(g)
        feats = g
    return outs


def ttt_loss(draft: Draft, target_feats: Tensor, target_logits: Tensor, input_ids: Tensor, valid: Tensor,
             steps: int, decay: float = TTT_DECAY, in_vocab: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """EAGLE-3 token-level loss ``Σ_k γ^k CE(p_T, q^{(k)})`` (forward KL to the target's full distribution).

    Shapes: target_feats (B, S, 3h), target_logits (B, S, V), input_ids (B, S), valid (B, S) bool (real tokens;
    right padding) -> loss (), top-1 agreement of step 0 with the target argmax ().
    With a reduced draft vocabulary the logits may come already restricted, (B, S, Vd) in ``d2t`` order (cached
    target outputs are Vd/V the size), with in_vocab (B, S) bool: the target's full argmax lies in the subset.
    """
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have at least 2 tokens per sequence, got shape {tuple(input_ids.shape)}")
    restricted = not draft.full_vocab and target_logits.shape[-1] == len(draft.d2t) != draft.vocab_size
    if restricted and (in_vocab is None or in_vocab.shape != input_ids.shape):
        raise ValueError(f"target_logits restricted to the draft vocabulary ({len(draft.d2t)}) need in_vocab of shape "
                         f"{tuple(input_ids.shape)}, got {None if in_vocab is None else tuple(in_vocab.shape)}")
    B, S = input_ids.shape
    L = S - 1
    outs = ttt_unroll(draft, target_feats, input_ids, steps)
    loss = target_logits.new_zeros(())
    acc = target_logits.new_zeros(())
    for k, g in enumerate(outs):
        n = max(L - k - 1, 0)  # pair t predicts with target logits at t+k+1 <= S-1
        if n == 0:
            break
        z = target_logits[:, 1 + k : 1 + k + n]  # (B, n, V)
        m = valid[:, 1 + k : 1 + k + n] & valid[:, :n]  # (B, n) both ends real
        if restricted:
            m = m & in_vocab[:, 1 + k : 1 + k + n]
        elif not draft.full_vocab:  # EAGLE-3: the target restricted to the draft vocabulary; skip argmax outside it
            member = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device).index_fill_(0, draft.d2t, True)
            m = m & member[z.argmax(-1)]
            z = z[..., draft.d2t]  # (B, n, Vd)
        p = z.float().softmax(-1)
        logq = draft.draft_logits(g[:, :n]).float().log_softmax(-1)  # (B, n, Vd)
        ce = -(p * logq).sum(-1)  # (B, n)
        loss = loss + decay**k * (ce * m).sum() / m.sum().clamp(min=1)
        if k == 0:
            acc = ((logq.argmax(-1) == p.argmax(-1)) & m).sum() / m.sum().clamp(min=1)
    return loss, acc

