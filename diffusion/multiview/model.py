"""The base text-to-multiview model: a diffusers ``UNet2DConditionModel`` with the ``Nv`` views stacked on channels,
conditioned on the bundled all-MiniLM-L6-v2's caption embeddings (domains.md §2(e): "ε-prediction CNN taking all views
stacked on channels [B, 4·3, 16, 16], so cross-view coupling exists, like MV-Adapter's multiview attention").

Conditioning ``cond`` is one tensor ``(B, 1 + L, 384)`` per caption (:class:`CaptionEncoder`): row 0 the sentence
embedding (mean-pooled, unit norm — MiniLM's own sentence vector), rows 1..L the caption's contextual token states
(each scaled to unit norm; zero rows past its last token). Sentence embeddings alone cannot tell "a red cube with a
blue stripe" from "a blue cube with a red stripe" (cosine 0.996), so the UNet reads both: the sentence vector through
the class-embedding projection (added to the timestep embedding, FiLM-like in every ResNet block) and the token
states through cross-attention at the coarse resolution, with padding rows masked out. The null condition of
classifier-free guidance is all zeros (:meth:`MultiviewUNet.null_cond`): the projection sees only its bias and
cross-attention returns zeros (no key is valid).

Shapes: ``sample`` (B, Nv·3, H, W) in the model's [-1, 1] space (views stacked: channels 3v..3v+2 are view v;
:func:`stack_views` / :func:`unstack_views`), ``timestep`` (B,) or scalar, ``cond`` (B, 1 + L, 384) -> ε̂ (B, Nv·3, H, W).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from common.models import cache_dir

TEXT_DIM = 384  # all-MiniLM-L6-v2


def stack_views(x: Tensor) -> Tensor:
    """(B, Nv, 3, H, W) -> (B, Nv·3, H, W)."""
    return x.flatten(1, 2)


def unstack_views(x: Tensor, views: int) -> Tensor:
    """(B, Nv·3, H, W) -> (B, Nv, 3, H, W)."""
    return x.unflatten(1, (views, x.shape[1] // views))


class CaptionEncoder:
    """Caption -> ``(1 + max_tokens, 384)`` conditioning rows from the bundled all-MiniLM-L6-v2 (offline), cached in
    memory and on disk (``<cache_dir>/multiview/minilm-captions-L<max_tokens>.pt``, a dict caption -> tensor), so a
    run whose captions were all seen before never loads the encoder. The empty caption maps to zeros, the null
    condition (so a sampler's negative prompt "" is :meth:`MultiviewUNet.null_cond`). One shared instance per
    ``max_tokens`` (:meth:`shared`); ``encode`` is the same call.

    Args:
        max_tokens: token rows kept after the sentence row (longer captions are truncated; [CLS]/[SEP] count).
        disk_cache: keep the on-disk cache (False: memory only).
    """

    _shared: dict[int, "CaptionEncoder"] = {}

    def __init__(self, max_tokens: int = 12, disk_cache: bool = True):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        self.max_tokens, self.disk_cache = max_tokens, disk_cache
        self._memory: dict[str, Tensor] = {}
        self._encoder = None
        self._loaded_disk = False

    @classmethod
    def shared(cls, max_tokens: int = 12) -> "CaptionEncoder":
        if max_tokens not in cls._shared:
            cls._shared[max_tokens] = cls(max_tokens)
        return cls._shared[max_tokens]

    @property
    def path(self) -> Path:
        return cache_dir() / "multiview" / f"minilm-captions-L{self.max_tokens}.pt"

    def _load_disk(self) -> None:
        if self._loaded_disk or not self.disk_cache:
            return
        self._loaded_disk = True
        if self.path.exists():
            try:
                stored = torch.load(self.path, weights_only=True)
                self._memory.update({k: v for k, v in stored.items() if k not in self._memory})
            except Exception:  # noqa: BLE001 - a torn or foreign file is recomputed, never trusted
                pass

    def _save_disk(self) -> None:
        if not self.disk_cache:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(dict(self._memory), tmp)
        os.replace(tmp, self.path)  # atomic: concurrent runs never read a torn file

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> Tensor:
        if self._encoder is None:
            from retrieval.embedding import MiniLMEncoder

            self._encoder = MiniLMEncoder()
        enc = self._encoder
        tok = enc.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                            return_tensors="pt")
        h = enc.model(**tok).last_hidden_state  # (n, L, 384)
        m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)  # (n, L, 1)
        pooled = nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)  # (n, 384)
        tokens = nn.functional.normalize(h, dim=-1) * m  # (n, L, 384), zero past the caption
        return torch.cat([pooled[:, None], tokens], 1)  # (n, 1 + L, 384)

    def __call__(self, captions: Sequence[str]) -> Tensor:
        """(B,) captions -> (B, 1 + max_tokens, 384) float32."""
        captions = [str(c) for c in captions]
        self._load_disk()
        self._memory[""] = torch.zeros(1 + self.max_tokens, TEXT_DIM)  # the empty caption is the null condition
        missing = [c for c in dict.fromkeys(captions) if c not in self._memory]
        if missing:
            self._memory.update(zip(missing, self._encode(missing)))
            self._save_disk()
        if not captions:
            return torch.zeros(0, 1 + self.max_tokens, TEXT_DIM)
        return torch.stack([self._memory[c] for c in captions])

    encode = __call__


class MultiviewUNet(nn.Module):
    """ε-prediction UNet over the stacked views (module docstring); the diffusers model is ``self.unet``.

    Args:
        views: Nv (4 for multiview, 1 for the single-view SePPO images).
        size: H = W of each view.
        channels: block_out_channels of the two UNet levels (the second level has cross-attention).
        layers_per_block: ResNet layers per level.
        head_dim: attention head dimension.
        max_tokens: caption token rows (the conditioning is (B, 1 + max_tokens, 384)).
    """

    def __init__(self, views: int = 4, size: int = 16, channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                 head_dim: int = 8, max_tokens: int = 12):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if views < 1 or size < 4 or size % 2:
            raise ValueError(f"views must be >= 1 and size an even number >= 4, got views={views}, size={size}")
        if len(channels) != 2 or any(c % 16 for c in channels):
            raise ValueError(f"channels must be two multiples of 16 (GroupNorm groups), got {list(channels)}")
        self.views, self.size, self.max_tokens = views, size, max_tokens
        self.config = {"views": views, "size": size, "channels": [int(c) for c in channels],
                       "layers_per_block": layers_per_block, "head_dim": head_dim, "max_tokens": max_tokens}
        self.unet = UNet2DConditionModel(
            sample_size=size, in_channels=3 * views, out_channels=3 * views,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=tuple(int(c) for c in channels), layers_per_block=layers_per_block,
            cross_attention_dim=TEXT_DIM, attention_head_dim=head_dim, norm_num_groups=16,
            class_embed_type="projection", projection_class_embeddings_input_dim=TEXT_DIM)

    def forward(self, sample: Tensor, timestep: Tensor | int | float, cond: Tensor) -> Tensor:
        """ε̂: sample (B, Nv·3, H, W), timestep (B,) or scalar, cond (B, 1 + L, 384) -> (B, Nv·3, H, W)."""
        if sample.dim() != 4 or sample.shape[1] != 3 * self.views:
            raise ValueError(f"sample must be (B, {3 * self.views}, H, W) (the {self.views} views stacked on "
                             f"channels), got {tuple(sample.shape)}")
        if cond.dim() != 3 or cond.shape[0] != sample.shape[0] or cond.shape[2] != TEXT_DIM:
            raise ValueError(f"cond must be (B={sample.shape[0]}, 1 + L, {TEXT_DIM}) caption rows, got {tuple(cond.shape)}")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.dim() == 0 else t
        cond = cond.to(sample.dtype)
        mask = cond.abs().sum(-1) > 0  # (B, 1 + L): valid key rows
        return self.unet(sample, t, encoder_hidden_states=cond, encoder_attention_mask=mask,
                         class_labels=cond[:, 0]).sample

    def null_cond(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """The unconditional input of classifier-free guidance: zeros (n, 1 + L, 384)."""
        return torch.zeros(n, 1 + self.max_tokens, TEXT_DIM, device=device)

    def embed(self, captions: Sequence[str]) -> Tensor:
        """Captions -> cond (B, 1 + L, 384) on this model's device (the shared :class:`CaptionEncoder`)."""
        return CaptionEncoder.shared(self.max_tokens)(captions).to(next(self.parameters()).device)


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able config (the key of cached weights)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


__all__ = ["CaptionEncoder", "MultiviewUNet", "TEXT_DIM", "config_hash", "stack_views", "unstack_views"]
