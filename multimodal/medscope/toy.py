"""The fast MedScope reproduction's policy (shared/methods/domains.md §5 (e)): a small causal transformer over frame
features and action tokens, acting in a vectorised copy of the tool environment.

Episode (at most ``max_calls + 1`` turns): the context starts with ``<bos>`` and the 16 coarse frames (projected
features); every turn is 3 action slots and 8 observation slots:

    action        CROP a b  |  FRAME t  |  ANS colour        (a, b, t: time bins of 4 frames, 32 bins; b >= a)
    observation   crop: the 8 uniformly spaced frames of [4a, 4b+3];  frame: frames 4t+1..4t+3;  a call beyond
                  the cap: one <refused> token (the call is not answered, the episode goes on); ANS ends the episode

Sampling is grammar-constrained (the op slot over {CROP, FRAME, ANS}, then bins or colours, ``b >= a``), and
``forward`` applies the same constraint, so sampler and learner agree. Unused slots (FRAME's and ANS's third slot,
missing frames, slots after the answer) are off ``completion_mask``; observation slots are on it and on
``env_mask`` (context, never actions: ``loss_mask`` excludes them and ``forward`` returns 0 there).

Shapes: context 1 + 16 prefix positions, completion T = turns · 11; frame features (B, 128, 12) in
``inputs["video"]``, observation frame indices (B, T) in ``inputs["obs_frames"]`` (−1 off observations).
Each row's ``samples[i]["episode"]`` records what the episode did (windows in seconds, calls, frames read,
prediction, format), which ``multimodal.medscope.env.MedScopeReward`` and ``MedScopeStats`` read.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.policies.base import Policy, PolicyOutput
from multimodal.medscope import video as V
from multimodal.medscope.env import WEIGHTS, MedScopeReward

CROP, FRAME, ANS = 0, 1, 2
BINS = 32
FRAMES_PER_BIN = V.NUM_FRAMES // BINS
BIN0 = 3  # bin k is token BIN0 + k
COL0 = BIN0 + BINS  # colour c is token COL0 + c
BOS, OBS, REFUSED, PAD = COL0 + V.NUM_COLOURS, COL0 + V.NUM_COLOURS + 1, COL0 + V.NUM_COLOURS + 2, COL0 + V.NUM_COLOURS + 3
VOCAB = PAD + 1
SLOTS = 3 + V.CROP_FRAMES  # action + observation slots of one turn
PREFIX = 1 + V.COARSE_FRAMES


def tasks(n: int, seed: int) -> list[dict]:
    """``n`` questions: {"video_seed", "answer", "evidence_start", "evidence_end", "uid"} (a pure function of seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        vs = rng.randrange(2**31)
        v = V.make_video(vs)
        out.append({"video_seed": vs, "answer": v["answer"], "evidence_start": v["start"], "evidence_end": v["end"],
                    "uid": i})
    return out


@functools.lru_cache(maxsize=8192)
def _features(video_seed: int) -> Tensor:
    return V.make_video(video_seed)["features"]


def videos(samples: Sequence[dict]) -> Tensor:
    """The samples' frame features (cached by video seed; stacked copies). -> (N, 128, 12)."""
    return torch.stack([_features(int(s["video_seed"])) for s in samples])


class FrameTransformer(nn.Module):
    """3-layer causal transformer (d = 96) over [<bos>, coarse frames, completion slots] (module docstring)."""

    def __init__(self, d: int = 96, layers: int = 3, heads: int = 4, max_turns: int = 4):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.frame = nn.Linear(V.FEATURE_DIM, d)
        self.pos = nn.Embedding(PREFIX + max_turns * SLOTS, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, coarse: Tensor, tokens: Tensor, frames: Tensor, is_frame: Tensor, valid: Tensor) -> Tensor:
        """coarse (B, 16, 12), tokens (B, T) long, frames (B, T, 12) features at observation slots, is_frame (B, T)
        bool, valid (B, T) bool (padding slots are hidden from attention) -> logits (B, T, V) at the positions that
        predict completion slots 0..T-1."""
        B, T = tokens.shape
        emb = torch.where(is_frame[..., None], self.frame(frames) + self.tok.weight[OBS], self.tok(tokens))  # (B, T, d)
        x = torch.cat([self.tok.weight[BOS].expand(B, 1, -1), self.frame(coarse), emb], 1)  # (B, 17 + T, d)
        L = x.shape[1]
        x = x + self.pos.weight[:L]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)  # True = blocked
        keep = torch.cat([torch.ones(B, PREFIX, dtype=torch.bool, device=x.device), valid], 1)  # (B, L)
        blocked = causal[None] | ~keep[:, None, :]  # (B, L, L)
        blocked = blocked & ~torch.eye(L, dtype=torch.bool, device=x.device)[None]  # a row always sees itself
        mask = torch.zeros(B, L, L, device=x.device).masked_fill(blocked, float("-inf"))
        mask = mask.repeat_interleave(self.body.layers[0].self_attn.num_heads, 0)  # (B·H, L, L)
        h = self.norm(self.body(x, mask=mask))
        return self.head(h[:, PREFIX - 1: PREFIX - 1 + T])  # (B, T, V)


def allowed(tokens: Tensor, slot: Tensor) -> Tensor:
    """The grammar: which tokens may fill each completion slot given the turn's earlier slots.
    tokens (B, T) long, slot (T,) the slot's index within its turn -> (B, T, V) bool (only action slots 0-2 matter)."""
    B, T = tokens.shape
    v = torch.arange(VOCAB, device=tokens.device)
    is_op = (v <= ANS)[None, None]  # (1, 1, V)
    is_bin = ((v >= BIN0) & (v < COL0))[None, None]
    is_col = ((v >= COL0) & (v < COL0 + V.NUM_COLOURS))[None, None]
    turn_start = torch.arange(T, device=tokens.device) - slot  # (T,)
    op = tokens.gather(1, turn_start[None].expand(B, -1))  # (B, T) the turn's op
    arg1 = tokens.gather(1, (turn_start + 1).clamp(max=T - 1)[None].expand(B, -1))  # (B, T) the turn's first argument
    s = slot[None, :, None]
    slot1 = torch.where((op == ANS)[..., None], is_col, is_bin)
    slot2 = torch.where((op == CROP)[..., None], is_bin & (v[None, None] >= arg1[..., None]), v[None, None] == PAD)
    out = torch.where(s == 0, is_op.expand(B, T, -1), torch.where(s == 1, slot1, slot2))
    return out | (s == 3)  # observation slots: unconstrained (never actions)


class FramePolicy(Policy):
    """The small transformer as a Policy over the vectorised tool environment (module docstring).

    Args:
        d, layers, heads: transformer size.
        max_calls: tool calls answered per episode (turns = max_calls + 1).
        temperature: sampling temperature.
        seed: initialisation and the sampling generator's seed.
    """

    provides = ("env_mask", "correct")

    def __init__(self, d: int = 96, layers: int = 3, heads: int = 4, max_calls: int = 3, temperature: float = 1.0,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.max_calls, self.turns, self.temperature = max_calls, max_calls + 1, temperature
        self.net = FrameTransformer(d, layers, heads, self.turns)
        self.ref: FrameTransformer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.horizon = self.turns * 3
        slot = torch.arange(self.turns * SLOTS) % SLOTS
        self.register_buffer("slot", torch.where(slot < 3, slot, torch.full_like(slot, 3)), persistent=False)

    def enable_reference(self) -> None:
        self.ref = copy.deepcopy(self.net).requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    # ------------------------------------------------------------------ episodes
    def run(self, prompts: Sequence[dict], n: int, greedy: bool = False, forced: Tensor | None = None) -> RolloutBatch:
        """Episodes of ``prompts`` (n per prompt, group id = prompt), sampled, or with ``forced`` actions
        (N, turns, 3) tokens (expert trajectories for SFT; the environment answers them the same way)."""
        samples = [dict(p) for p in prompts for _ in range(n)]
        N, K, T = len(samples), self.turns, self.turns * SLOTS
        vid = videos(prompts).repeat_interleave(n, 0)  # (N, 128, 12)
        coarse = V.coarse_view(vid)  # (N, 16, 12)
        gt = torch.tensor([[s["evidence_start"], s["evidence_end"]] for s in samples], dtype=torch.float32)  # (N, 2)
        tokens = torch.full((N, T), PAD, dtype=torch.long)
        valid = torch.zeros(N, T, dtype=torch.bool)
        envm = torch.zeros(N, T, dtype=torch.bool)
        obs = torch.full((N, T), -1, dtype=torch.long)
        live = torch.ones(N, dtype=torch.bool)
        calls = torch.zeros(N, dtype=torch.long)
        windows = torch.full((N, K, 2), float("nan"))  # answered tool windows in seconds
        pred = torch.full((N,), -1, dtype=torch.long)
        frames_read = torch.zeros(N, dtype=torch.long)
        ar = torch.arange(N)
        for k in range(K):
            base = k * SLOTS
            for j in range(3):
                pos = base + j
                if forced is not None:
                    choice = forced[:, k, j].clone()
                else:  # only the live rows, only the columns up to this slot (causal: the rest is unseen)
                    idx = live.nonzero().squeeze(1)
                    choice = torch.full((N,), PAD, dtype=torch.long)
                    if idx.numel():
                        c = pos + 1
                        o = obs[idx, :c]
                        with torch.no_grad():
                            logits = self.net(coarse[idx], tokens[idx, :c], vid[idx].gather(1, o.clamp(min=0)[..., None].expand(-1, -1, V.FEATURE_DIM)),
                                              o >= 0, valid[idx, :c])[:, pos]  # (n, V)
                        ok = allowed(tokens[idx, :c], self.slot[:c])[:, pos]  # (n, V)
                        logits = (logits / max(self.temperature, 1e-6)).masked_fill(~ok, float("-inf"))
                        choice[idx] = (logits.argmax(-1) if greedy else
                                       torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(1))
                if j == 2:  # FRAME's and ANS's third slot is PAD, not an action
                    is_crop = tokens[:, base] == CROP
                    choice = torch.where(is_crop, choice, torch.full_like(choice, PAD))
                    act = live & is_crop
                else:
                    act = live
                tokens[:, pos] = torch.where(act, choice, tokens[:, pos])
                valid[:, pos] = act
            op, a1, a2 = tokens[:, base], tokens[:, base + 1], tokens[:, base + 2]
            answer = live & (op == ANS)
            pred = torch.where(answer, a1 - COL0, pred)
            tool = live & (op != ANS)
            calls = calls + tool.long()
            refused = tool & (calls > self.max_calls)
            served = tool & ~refused
            crop = served & (op == CROP)
            frm = served & (op == FRAME)
            a, b = (a1 - BIN0).clamp(0, BINS - 1), (a2 - BIN0).clamp(0, BINS - 1)
            lo, hi = (a * FRAMES_PER_BIN).float(), (b * FRAMES_PER_BIN + FRAMES_PER_BIN - 1).float()
            i8 = torch.arange(V.CROP_FRAMES, dtype=torch.float32)
            crop_f = (lo[:, None] + (hi - lo)[:, None] * i8 / (V.CROP_FRAMES - 1)).round().long()  # (N, 8)
            centre = a * FRAMES_PER_BIN + FRAMES_PER_BIN // 2  # (N,) get_frame's timestamp
            near = (centre[:, None] + torch.tensor([-1, 0, 1])).clamp(0, V.NUM_FRAMES - 1)  # (N, 3)
            frame_f = torch.cat([near, torch.full((N, V.CROP_FRAMES - 3), -1)], 1)  # (N, 8)
            f = torch.where(crop[:, None], crop_f, torch.where(frm[:, None], frame_f, torch.full_like(crop_f, -1)))
            sl = slice(base + 3, base + SLOTS)
            obs[:, sl] = f
            tokens[:, sl] = torch.where(f >= 0, torch.full_like(f, OBS), tokens[:, sl])
            tokens[:, base + 3] = torch.where(refused, torch.full_like(a, REFUSED), tokens[:, base + 3])
            valid[:, sl] = (f >= 0)
            valid[:, base + 3] |= refused
            envm[:, sl] = valid[:, sl]
            frames_read = frames_read + (f >= 0).sum(1)
            w = torch.stack([torch.where(crop, lo, centre.float()), torch.where(crop, hi, centre.float())], 1)  # (N, 2)
            windows[:, k] = torch.where(served[:, None], w, windows[:, k])
            live = live & ~answer
            if not bool(live.any()):
                break
        iou = V.tiou(windows[..., 0], windows[..., 1], gt[:, None, 0], gt[:, None, 1])  # (N, K), NaN windows -> 0
        iou = torch.nan_to_num(iou, nan=0.0).masked_fill(windows[..., 0].isnan(), 0.0)
        answer_idx = torch.tensor([V.COLOURS.index(s["answer"]) for s in samples])
        correct = pred == answer_idx
        fmt = pred >= 0  # answered within the turns, every call parsed by construction
        for i, s in enumerate(samples):  # ok: host-side records of N episodes
            w = windows[i][~windows[i, :, 0].isnan()].tolist()
            s["episode"] = {"windows": [tuple(x) for x in w], "tool_calls": int(calls[i]), "frames_read": int(frames_read[i]),
                            "prediction": V.COLOURS[int(pred[i])] if pred[i] >= 0 else None, "format": bool(fmt[i]),
                            "best_tiou": float(iou[i].max())}
        width = int(valid.any(0).nonzero().max()) + 1 if bool(valid.any()) else 1  # drop slots unused by every row
        tokens, valid, envm, obs = tokens[:, :width], valid[:, :width], envm[:, :width], obs[:, :width]
        return RolloutBatch(completion_ids=tokens, completion_mask=valid, env_mask=envm & valid,
                            group_ids=torch.arange(len(prompts)).repeat_interleave(n), correct=correct,
                            inputs={"video": vid, "obs_frames": obs}, samples=samples)

    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        return self.run(prompts, n, greedy=greedy)

    def log_softmax(self, batch: RolloutBatch, reference: bool = False) -> Tensor:
        net = self.ref if reference and self.ref is not None else self.net
        vid, obs = batch.inputs["video"], batch.inputs["obs_frames"]
        frames = vid.gather(1, obs.clamp(min=0)[..., None].expand(-1, -1, V.FEATURE_DIM))  # (B, T, 12)
        logits = net(V.coarse_view(vid), batch.completion_ids, frames, obs >= 0, batch.completion_mask)  # (B, T, V)
        ok = allowed(batch.completion_ids, self.slot[: batch.completion_ids.shape[1]])
        return (logits / max(self.temperature, 1e-6)).masked_fill(~ok, float("-inf")).log_softmax(-1)

    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """log π of the action slots and the entropy of their (constrained) distribution, 0 off the actions (the
        observation slots are context). -> (B, T), (B, T)."""
        lsm = self.log_softmax(batch, reference)  # (B, T, V)
        act = batch.loss_mask  # (B, T)
        lp = lsm.gather(-1, batch.completion_ids.clamp(max=VOCAB - 1)[..., None]).squeeze(-1)
        p = lsm.exp()
        ent = -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1)
        return PolicyOutput(torch.where(act, lp, torch.zeros_like(lp)), torch.where(act, ent, torch.zeros_like(ent)))


def score(weights: dict[str, float], max_calls: int = 3):
    """The Loop's scoring function: components accuracy, grounding, format (MedScopeReward over the episodes'
    records), reward = Σ weight · component (weights: shared/methods/domains.md §5; a 0 weight keeps the component
    for logging)."""
    parts = [MedScopeReward(p, max_calls) for p in ("accuracy", "grounding", "format")]
    w = torch.tensor([float(weights.get(p.part, 0.0)) for p in parts])

    def fn(batch: RolloutBatch) -> RolloutBatch:
        comps = torch.stack([p([""] * batch.batch_size, batch.samples) for p in parts], 1)  # (B, 3)
        return batch.replace(rewards=comps @ w, reward_components=comps, reward_names=tuple(p.part for p in parts))

    return fn


FULL = dict(WEIGHTS)
NO_GROUNDING = {"accuracy": 0.5, "format": 0.2}


def expert_actions(samples: Sequence[dict], rng: random.Random, jitter: int = 1) -> Tensor:
    """Expert trajectories with jittered windows: ``CROP a b`` around the evidence bins, each end moved out by
    0..jitter bins and the window shifted by ±1 bin 2 times in 5 (jitter 1: mean tIoU ≈ 0.4), then ``ANS colour``. -> (N, turns=4, 3)."""
    out = torch.full((len(samples), 4, 3), PAD, dtype=torch.long)
    for i, s in enumerate(samples):  # ok: host-side, SFT data
        ga, gb = int(s["evidence_start"]) // FRAMES_PER_BIN, int(s["evidence_end"]) // FRAMES_PER_BIN
        shift = rng.choice((-1, 0, 0, 0, 1))  # shifted by one bin 2 times in 5
        a = min(max(ga - rng.randint(0, jitter) + shift, 0), BINS - 1)
        b = min(max(gb + rng.randint(0, jitter) + shift, a), BINS - 1)
        out[i, 0] = torch.tensor([CROP, BIN0 + a, BIN0 + b])
        out[i, 1] = torch.tensor([ANS, COL0 + V.COLOURS.index(s["answer"]), PAD])
    return out


def sft(policy: FramePolicy, samples: Sequence[dict], steps: int, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0, jitter: int = 1) -> float:
    """Supervised warm start on expert trajectories (teacher-forced NLL of the action slots). Returns the mean
    tIoU of the expert windows seen."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    ious = []
    for _ in range(steps):
        batch_samples = rng.sample(list(samples), min(batch_size, len(samples)))
        forced = expert_actions(batch_samples, rng, jitter)
        forced = torch.cat([forced, torch.full((len(batch_samples), policy.turns - 4, 3), PAD, dtype=torch.long)], 1) \
            if policy.turns > 4 else forced[:, : policy.turns]
        batch = policy.run(batch_samples, 1, forced=forced)
        ious += [s["episode"]["best_tiou"] for s in batch.samples]
        lp = policy(batch).logprobs  # (B, T)
        loss = -(lp.sum() / batch.loss_mask.sum().clamp(min=1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
    return sum(ious) / max(len(ious), 1)


@torch.no_grad()
def evaluate(policy: FramePolicy, samples: Sequence[dict], batch_size: int = 256) -> dict[str, float]:
    """Greedy episodes on ``samples``: answer accuracy, window mIoU, R@0.5, tool calls and frames read per episode."""
    recs = []
    for i in range(0, len(samples), batch_size):
        recs += [s["episode"] for s in policy.run(samples[i: i + batch_size], 1, greedy=True).samples]
    acc = [float(r["prediction"] == s["answer"]) for r, s in zip(recs, samples)]
    iou = [r["best_tiou"] for r in recs]
    n = max(len(recs), 1)
    return {"accuracy": sum(acc) / n, "miou": sum(iou) / n, "r_at_0.5": sum(x >= 0.5 for x in iou) / n,
            "tool_calls": sum(r["tool_calls"] for r in recs) / n, "frames_read": sum(r["frames_read"] for r in recs) / n}


__all__ = ["FramePolicy", "FrameTransformer", "allowed", "tasks", "score", "sft", "evaluate", "expert_actions",
           "FULL", "NO_GROUNDING"]
