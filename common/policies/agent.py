"""MultiTurnAgentPolicy: a causal LM acting in a text environment for several turns, as one Policy.

Layout B of shared/methods/agentic.md §1 (ARPO, MAPO, Search-R1: Jin et al. 2025, arXiv 2503.09516, whose loss masks
the retrieved tokens out of the policy-gradient objective, as ``env_mask`` does here): one sequence per episode. The
prompt is the chat-templated first observation; the completion is the concatenation, turn after turn, of the token
ids the model sampled and the token ids of the environment's answer (``[a_0, o_0, a_1, o_1, ..., a_k]``). The
sequence is *defined* by these ids, never re-tokenised from text, so what is trained on is what was sampled.
Environment tokens are context, not actions: ``env_mask`` marks them, ``batch.loss_mask`` (what the loop's
normaliser and loss use) excludes them, and ``forward`` returns 0 there.

Rollout is vectorised over episodes: at every turn, one ``generate`` call continues every live episode (each
context is the episode's prompt + completion so far, left-aligned); the environments then step on the decoded
actions (host-side Python, one object per episode), and their observations are tokenised and appended. Turns end
at EOS, at a stop string (``</tool>``) or at the turn's token budget; episodes end by a typed reason
(``common.rollout.env.END_REASONS``, recorded in the declared fields ``end_reason`` and ``num_turns``); each row's
return is written into its sample dict (``episode_return``), where the reward protocol reads it, so the outcome
reward is an ordinary reward function (``common.rollout.env.EpisodeReturn``).

The loop is unchanged: ``forward`` is the wrapped CausalLMPolicy's (its shared-prompt cache included) on the whole
sequence, so the log-probs at the assistant tokens are those of one plain forward over prompt + completion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.policies.base import Policy, PolicyOutput
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.env import END_REASONS, Environment, EpisodeLimits, as_step, run_step

_OBSERVATION_CHARS_PER_TOKEN = 16  # an observation's text is cut before tokenising (max_observation_tokens x this)


def pack(mask: Tensor, *tensors: Tensor, left: bool = False) -> tuple[Tensor, ...]:
    """Move each row's valid entries (``mask``) to the right end (``left=True``: left-padded) or the left end
    (right-padded), keeping their order (a stable sort on the mask). Shapes: mask (N, W), tensors (N, W) ->
    the mask and the tensors, reordered along dim 1."""
    key = mask.long() if left else (~mask).long()  # entries with key 0 come first
    order = torch.argsort(key, dim=1, stable=True)  # (N, W)
    return (mask.gather(1, order), *(t.gather(1, order) for t in tensors))


class MultiTurnAgentPolicy(Policy):
    """A CausalLMPolicy (composition) that runs episodes of up to ``limits.max_turns`` turns in ``environment``.

    Args:
        lm: the causal LM policy (weights, tokenizer, chat template, sampling, backend).
        environment: the prototype environment; every episode acts in its own ``environment.spawn()``.
        limits: turn, token, time and failure-reward bounds of an episode (``EpisodeLimits``).

    The per-turn generation budget is ``lm.sampling.max_new_tokens``; the whole completion (assistant and
    environment tokens) holds at most ``limits.max_total_tokens`` (the horizon).
    """

    provides = (*CausalLMPolicy.provides, "episode_ids", "turn_ids", "token_turn", "env_mask", "end_reason", "num_turns")

    def __init__(self, lm: CausalLMPolicy, environment: Environment, limits: EpisodeLimits | None = None):
        super().__init__()
        if not isinstance(lm, CausalLMPolicy):
            raise ValueError(f"lm must be a CausalLMPolicy, got {type(lm).__name__}")
        if not isinstance(environment, Environment):
            raise ValueError(f"environment must be a common.rollout.env.Environment, got {type(environment).__name__}")
        self.lm, self.environment = lm, environment
        self.limits = limits if limits is not None else EpisodeLimits()

    @property
    def horizon(self) -> int:  # T_max: the completion's token budget (actions + observations)
        return self.limits.max_total_tokens

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    # ------------------------------------------------------------------ rollout
    def rollout(self, prompts: Sequence[dict], n: int, *, greedy: bool = False) -> RolloutBatch:
        """``n`` episodes per task, row ``p·n + j`` is episode j of task p (group id p)."""
        if n <= 0:
            raise ValueError(f"n must be a positive integer, got {n}")
        lim, lm, tok, dev = self.limits, self.lm, self.lm.tokenizer, self.lm.device
        tasks = [dict(p) for p in prompts for _ in range(n)]  # (E,)
        E = len(tasks)
        envs = [self.environment.spawn() for _ in range(E)]
        returns, reasons, turns = [0.0] * E, [None] * E, [0] * E
        first = []
        for e, (env, task) in enumerate(zip(envs, tasks)):  # ok: environments are host-side Python, one per episode
            out = run_step(env.reset, task, lim.step_timeout_s, f"reset of task {str(task.get('prompt', ''))[:80]!r}")
            if out.reason is not None:
                reasons[e], returns[e] = out.reason, lim.failure_reward
            first.append(str(out.value) if out.reason is None else str(task.get("prompt", "")))
        prompt_ids, prompt_mask = lm.encode([{"prompt": o} for o in first])  # (E, P)
        comp = torch.zeros(E, 0, dtype=torch.long, device=dev)  # (E, W) right-padded completion so far
        cmask = torch.zeros(E, 0, dtype=torch.bool, device=dev)  # (E, W) valid tokens
        envm = torch.zeros(E, 0, dtype=torch.bool, device=dev)  # (E, W) environment tokens
        turn = torch.zeros(E, 0, dtype=torch.long, device=dev)  # (E, W) turn of each action token, −1 elsewhere
        blp = torch.zeros(E, 0, dtype=torch.float32, device=dev)  # (E, W) sampler log-probs, 0 off the actions
        live = torch.tensor([r is None for r in reasons], dtype=torch.bool, device=dev)  # (E,)
        eos = lm.model.generation_config.eos_token_id
        eos = tok.eos_token_id if eos is None else eos
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=dev)
        stops = tuple(dict.fromkeys((*lm.sampling.stop_strings, *self.environment.stop_strings)))
        for t in range(lim.max_turns):
            full = live & (cmask.sum(1) >= lim.max_total_tokens)  # (E,) no room for another action
            for e in full.nonzero().squeeze(1).tolist():  # ok: host-side bookkeeping of end reasons
                reasons[e] = "overflow"
            live = live & ~full
            idx = live.nonzero().squeeze(1)  # (N,) live episodes
            if idx.numel() == 0:
                break
            budget = lim.max_total_tokens - cmask[idx].sum(1)  # (N,) tokens left in each sequence
            sampling = dataclasses.replace(lm.sampling, stop_strings=stops,
                                           max_new_tokens=min(lm.sampling.max_new_tokens, int(budget.max())))
            ctx_mask, ctx_ids = pack(torch.cat([prompt_mask[idx], cmask[idx]], 1),
                                     torch.cat([prompt_ids[idx], comp[idx]], 1), left=True)  # (N, P + W)
            start = int(ctx_mask.any(0).long().argmax())  # drop columns that are padding in every row
            gen = lm.backend.generate(lm.model, tok, ctx_ids[:, start:], ctx_mask[:, start:], 1, sampling, greedy=greedy)
            a_ids, a_mask = gen.completion_ids, gen.completion_mask  # (N, A)
            A = a_ids.shape[1]
            in_budget = torch.arange(A, device=dev)[None, :] < budget[:, None]  # (N, A)
            cut = (a_mask & ~in_budget).any(1)  # (N,) the action ran past the sequence's budget
            a_mask = a_mask & in_budget
            ended_eos = (torch.isin(a_ids, eos_ids) & a_mask).any(1)  # (N,)
            actions = tok.batch_decode(a_ids.masked_fill(~a_mask, tok.pad_token_id), skip_special_tokens=True)
            room = (budget - a_mask.sum(1)).tolist()  # (N,) tokens left for the observation
            observations = [""] * idx.numel()
            cont = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)  # (N,) the episode goes on
            for j, (e, action) in enumerate(zip(idx.tolist(), actions)):  # ok: host-side environment steps
                turns[e] += 1
                if bool(cut[j]):
                    reasons[e] = "overflow"
                    continue
                out = run_step(lambda a, env=envs[e]: as_step(env.step(a)), action, lim.step_timeout_s,
                               f"step {t} of task {str(tasks[e].get('prompt', ''))[:80]!r} (action {action[:80]!r})")
                if out.reason is not None:
                    reasons[e], returns[e] = out.reason, lim.failure_reward
                    continue
                returns[e] += out.value.reward
                if out.value.done:
                    reasons[e] = "done"
                elif bool(ended_eos[j]):
                    reasons[e] = "stopped"
                elif t == lim.max_turns - 1:  # no turn left to read an observation
                    reasons[e] = "max_turns"
                else:
                    text = out.value.observation[: lim.max_observation_tokens * _OBSERVATION_CHARS_PER_TOKEN]
                    observations[j] = lim.observation_prefix + text + lim.observation_suffix
                    cont[j] = True
            o_ids, o_mask = self._tokenize(observations)  # (N, O)
            fits = o_mask.sum(1) <= torch.tensor(room, device=dev)  # (N,)
            for j in (cont & ~fits).nonzero().squeeze(1).tolist():  # ok: host-side bookkeeping
                reasons[int(idx[j])] = "overflow"
            o_mask = o_mask & (cont & fits)[:, None]
            live[idx] = cont & fits
            # append [action, observation] to every live row and right-align: one gather over (N, W + A + O)
            O = o_ids.shape[1]
            a_lp = (gen.behaviour_logprobs.to(blp.dtype) if gen.behaviour_logprobs is not None
                    else torch.zeros(a_ids.shape, dtype=blp.dtype, device=dev))  # (N, A)
            rows = (torch.cat([cmask[idx], a_mask, o_mask], 1),
                    torch.cat([comp[idx], a_ids, o_ids], 1),
                    torch.cat([envm[idx], torch.zeros_like(a_mask), torch.ones_like(o_mask)], 1),
                    torch.cat([turn[idx], torch.full_like(a_ids, t), torch.full_like(o_ids, -1)], 1),
                    torch.cat([blp[idx], a_lp, torch.zeros(o_ids.shape, dtype=blp.dtype, device=dev)], 1))
            packed = pack(*rows)
            widened = [torch.nn.functional.pad(x, (0, A + O)) for x in (cmask, comp, envm, turn, blp)]
            for x, new in zip(widened, packed):
                x[idx] = new
            width = int(widened[0].sum(1).max()) if E else 0
            cmask, comp, envm, turn, blp = (x[:, :width] for x in widened)
        for e in live.nonzero().squeeze(1).tolist():  # ok: host-side bookkeeping
            reasons[e] = "max_turns"
        comp = comp.masked_fill(~cmask, tok.pad_token_id)
        envm, turn = envm & cmask, turn.masked_fill(~cmask | envm, -1)
        samples = [{**task, "episode_return": r} for task, r in zip(tasks, returns)]
        truncated = torch.tensor([why in ("max_turns", "overflow") for why in reasons], dtype=torch.bool, device=dev)
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=comp, completion_mask=cmask,
            group_ids=torch.arange(len(prompts), device=dev).repeat_interleave(n),
            behaviour_logprobs=blp.masked_fill(~cmask | envm, 0.0) if lm.sampling.logprobs else None,
            truncated=truncated, episode_ids=torch.arange(E, device=dev),
            turn_ids=torch.zeros(E, dtype=torch.long, device=dev),
            token_turn=turn, env_mask=envm, samples=samples,
            end_reason=torch.tensor([END_REASONS.index(why) for why in reasons], dtype=torch.long, device=dev),
            num_turns=torch.tensor(turns, dtype=torch.long, device=dev),
            completions=tok.batch_decode(comp, skip_special_tokens=True),
        )

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Observation texts -> right-padded ids (N, O) and mask (N, O), each cut to max_observation_tokens."""
        ids = self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids = [x[: self.limits.max_observation_tokens] for x in ids]
        O = max((len(x) for x in ids), default=0)
        out = torch.full((len(ids), O), self.lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), O, dtype=torch.bool)
        for i, x in enumerate(ids):  # ok: host-side, short observation lists
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = True
        return out.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ log-probs
    def forward(self, batch: RolloutBatch, *, epoch: int = 0, reference: bool = False, hidden: bool = False) -> PolicyOutput:
        """The causal LM's log-probs and entropies of the completion tokens, environment tokens in the context and
        0 in the output (they are not actions). Shapes: -> (B, T), (B, T); hidden (B, T, H) if asked for."""
        out = self.lm(batch, epoch=epoch, reference=reference, hidden=hidden)
        if batch.env_mask is None:
            return out
        return PolicyOutput(out.logprobs.masked_fill(batch.env_mask, 0.0), out.entropy.masked_fill(batch.env_mask, 0.0),
                            out.hidden)

    def enable_reference(self) -> None:
        self.lm.enable_reference()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.lm.trainable_parameters()

    def sync(self) -> None:
        self.lm.sync()

    def sampler_logprobs(self, batch: RolloutBatch) -> Tensor:
        lp = self.lm.sampler_logprobs(batch)
        return lp if batch.env_mask is None else lp.masked_fill(batch.env_mask, 0.0)

    def extra_repr(self) -> str:
        return f"environment={type(self.environment).__name__}, limits={self.limits}"


__all__ = ["MultiTurnAgentPolicy", "pack"]
