"""The CPU-scale ROMA task and tiny VLM of shared/methods/domains.md §4 (e): count red and blue squares, compare.

Task: a 16×16 RGB image with 0-3 red and 0-3 blue 2×2 squares (on distinct cells of the 8×8 grid of 2×2 cells)
on a textured grey background; the question is fixed ("more red or blue?"); the target completion is

    r n_r b n_b > {red | blue | equal} <eos>                                  (7 tokens; the counts are the reasoning)

Reward: 1 for the right comparison (the token before the first <eos>) + 0.1 for the exact format. ``correct`` is the
comparison alone.

Tiny VLM (``TinyVLMNet``): a CNN patch encoder (4×4 patches, stride 4 -> 16 visual tokens of width d = 64) and a
2-layer causal transformer decoder over [16 visual tokens, <bos>, o_1 .. o_{T-1}] that predicts o_1 .. o_T.
``TinyVLMPolicy`` is a Policy: ``rollout`` samples T tokens autoregressively (real sampling, vectorised over the
batch) and keeps the image it used in ``inputs["pixel_values"]`` (B, 3, 16, 16) in [0, 1]; ``forward`` teacher-forces
the batch's completion under ``inputs["pixel_values"]`` — whatever image is there (ROMA's corrupted views).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.policies.base import Policy, PolicyOutput

VOCAB = ("<eos>", "r", "b", ">", "0", "1", "2", "3", "red", "blue", "equal", "<bos>")
EOS, R, B_, GT, BOS = 0, 1, 2, 3, 11
DIGIT0, RED, BLUE, EQUAL = 4, 8, 9, 10
T_MAX = 7
IMAGE = 16


def render(seed: int, index: int) -> dict:
    """Sample ``index`` of the task under ``seed``: {"image": (3, 16, 16) float in [0, 1], "red", "blue", "answer",
    "uid"}. A pure function of (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)
    n_red, n_blue = rng.randint(0, 3), rng.randint(0, 3)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    grey = 0.35 + 0.3 * rng.random()
    image = (grey + 0.08 * torch.randn(1, IMAGE, IMAGE, generator=g)).clamp(0, 1).expand(3, -1, -1).clone()
    cells = rng.sample(range(64), n_red + n_blue)
    for j, cell in enumerate(cells):
        y, x = 2 * (cell // 8), 2 * (cell % 8)
        colour = torch.tensor([0.9, 0.1, 0.1] if j < n_red else [0.1, 0.2, 0.9])
        image[:, y:y + 2, x:x + 2] = colour[:, None, None]
    answer = "red" if n_red > n_blue else "blue" if n_blue > n_red else "equal"
    return {"image": image, "red": n_red, "blue": n_blue, "answer": answer, "uid": index}


def target_tokens(samples: Sequence[dict]) -> Tensor:
    """The teacher traces. -> (N, 7) long."""
    ans = {"red": RED, "blue": BLUE, "equal": EQUAL}
    return torch.tensor([[R, DIGIT0 + s["red"], B_, DIGIT0 + s["blue"], GT, ans[s["answer"]], EOS] for s in samples])


def score_tokens(tokens: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards and correctness of completions. ``answers`` (B,) holds the answer token ids. The answer is the token
    before the first <eos> (none: wrong); format = the exact 7-token pattern. Shapes: (B, T) -> rewards (B,), correct (B,)."""
    Bn, T = tokens.shape
    is_eos = tokens == EOS
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(answers, T))  # (B,)
    before = tokens.gather(1, (first - 1).clamp(min=0)[:, None]).squeeze(1)
    correct = has_eos & (first >= 1) & (before == answers)
    fmt = torch.zeros(Bn, dtype=torch.bool)
    if T >= T_MAX:
        t = tokens[:, :T_MAX]
        digit = lambda c: (c >= DIGIT0) & (c <= DIGIT0 + 3)  # noqa: E731
        fmt = ((t[:, 0] == R) & digit(t[:, 1]) & (t[:, 2] == B_) & digit(t[:, 3]) & (t[:, 4] == GT)
               & ((t[:, 5] == RED) | (t[:, 5] == BLUE) | (t[:, 5] == EQUAL)) & (t[:, 6] == EOS))
    return correct.float() + 0.1 * fmt.float(), correct


def answer_ids(samples: Sequence[dict]) -> Tensor:
    ans = {"red": RED, "blue": BLUE, "equal": EQUAL}
    return torch.tensor([ans[s["answer"]] for s in samples])


def score(batch: RolloutBatch) -> RolloutBatch:
    """The loop's ``score``: rewards (B,) and ``correct`` (B,) from the completions and the samples' answers."""
    rewards, correct = score_tokens(batch.completion_ids.cpu(), answer_ids(batch.samples))
    dev = batch.completion_ids.device
    return batch.replace(rewards=rewards.to(dev), correct=correct.to(dev), reward_components=rewards[:, None].to(dev),
                         reward_names=("accuracy+format",))


class TinyVLMNet(nn.Module):
    """CNN patch encoder + causal transformer decoder (module docstring). Shapes: images (B, 3, 16, 16),
    tokens (B, L) -> logits (B, L, V) for the positions after <bos>."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, d, 2, 2), nn.GELU(), nn.Conv2d(d, d, 2, 2))  # 16x16 -> 4x4 tokens
        self.pos = nn.Parameter(torch.randn(16 + 1 + T_MAX, d) * 0.02)
        self.embed = nn.Embedding(len(VOCAB), d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, len(VOCAB))

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        vis = self.patch(images * 2 - 1).flatten(2).transpose(1, 2)  # (B, 16, d)
        x = torch.cat([vis, self.embed(tokens)], 1)  # (B, 16 + L, d)
        x = x + self.pos[: x.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        h = self.decoder(x, mask=causal, is_causal=True)
        return self.head(self.norm(h[:, 16:]))  # (B, L, V)


class TinyVLMPolicy(Policy):
    """The tiny VLM as a Policy (module docstring). Prompts are ``render`` records.

    Args:
        d, layers, heads: decoder width, depth, heads.
        temperature: sampling temperature (log-probs are at temperature 1 when it is 1).
        seed: initialisation seed.
    """

    provides = ("prompt_uid",)

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = TinyVLMNet(d, layers, heads)
        self.temperature, self.reference, self.horizon = temperature, None, T_MAX
        self.generator: torch.Generator | None = None
        self.generate_calls = 0  # rollouts run (tests count them)

    def enable_reference(self) -> None:
        if self.reference is None:
            self.reference = copy.deepcopy(self.net).requires_grad_(False)

    @torch.no_grad()
    def generate(self, images: Tensor, greedy: bool = False) -> tuple[Tensor, Tensor]:
        """Sample T_MAX tokens per image, stopping rows at <eos>. -> tokens (B, T), mask (B, T) bool."""
        self.generate_calls += 1
        Bn = images.shape[0]
        tokens = torch.full((Bn, 1), BOS, dtype=torch.long)
        for _ in range(T_MAX):  # ok: autoregressive in t, vectorised over the batch
            logits = self.net(images, tokens)[:, -1] / self.temperature  # (B, V)
            logits[:, BOS] = float("-inf")
            nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
        out = tokens[:, 1:]  # (B, T)
        done_before = (out == EOS).long().cumsum(1) - (out == EOS).long()  # (B, T) eos strictly before t
        mask = done_before == 0
        return torch.where(mask, out, torch.full_like(out, EOS)), mask

    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        images = torch.stack([p["image"] for p in prompts]).repeat_interleave(n, 0)  # (B, 3, 16, 16)
        tokens, mask = self.generate(images, greedy)
        return RolloutBatch(completion_ids=tokens, completion_mask=mask,
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n), inputs={"pixel_values": images},
                            samples=[p for p in prompts for _ in range(n)],
                            prompt_uid=torch.tensor([p["uid"] for p in prompts]).repeat_interleave(n))

    def log_softmax(self, batch: RolloutBatch, reference: bool = False) -> Tensor:
        net = self.reference if reference else self.net
        tokens = torch.cat([torch.full_like(batch.completion_ids[:, :1], BOS), batch.completion_ids[:, :-1]], 1)
        return (net(batch.inputs["pixel_values"], tokens) / self.temperature).log_softmax(-1)  # (B, T, V) V = 12

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        logp = self.log_softmax(batch, reference)
        m = batch.completion_mask
        lp = logp.gather(2, batch.completion_ids[..., None]).squeeze(2)  # (B, T)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
        return PolicyOutput(lp * m, entropy * m)


def sft(policy: TinyVLMPolicy, samples: Sequence[dict], steps: int, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0) -> list[float]:
    """Supervised fine-tuning on the teacher traces of clean images (cross-entropy of the 7 target tokens).
    Returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(policy.net.parameters(), lr=lr)
    images = torch.stack([s["image"] for s in samples])
    targets = target_tokens(samples)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(samples), (batch_size,), generator=g)
        batch = RolloutBatch(completion_ids=targets[idx], completion_mask=torch.ones(batch_size, T_MAX, dtype=torch.bool),
                             group_ids=torch.arange(batch_size), inputs={"pixel_values": images[idx]})
        loss = -policy(batch).logprobs.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def accuracy(policy: TinyVLMPolicy, images: Tensor, answers: Tensor, batch_size: int = 512) -> Tensor:
    """Greedy accuracy on images (N, 3, 16, 16) with answer token ids (N,). -> () float."""
    correct = []
    for s in range(0, images.shape[0], batch_size):  # ok: evaluation chunks
        tokens, _ = policy.generate(images[s:s + batch_size], greedy=True)
        correct.append(score_tokens(tokens, answers[s:s + batch_size])[1])
    return torch.cat(correct).float().mean()


__all__ = ["TinyVLMNet", "TinyVLMPolicy", "VOCAB", "accuracy", "answer_ids", "render", "score", "score_tokens", "sft",
           "target_tokens"]
