"""MultiTurnAgentPolicy: a causal LM acting in a text environment for several turns, as one Policy.

Both storage layouts of shared/methods/agentic.md §1, chosen by ``EpisodeLimits.layout``:

- **Layout B** (``"episode"``; ARPO, MAPO, Search-R1: Jin et al. 2025, arXiv 2503.09516, whose loss masks the
  retrieved tokens out of the policy-gradient objective, as ``env_mask`` does here): one sequence per episode. The
  prompt is the chat-templated first observation; the completion is the concatenation, turn after turn, of the token
  ids the model sampled and the token ids of the environment's answer (``[a_0, o_0, a_1, o_1, ..., a_k]``).
- **Layout A** (``"turn"``; verl-agent, GiGPO, HGPO, UI-S1, iStar): one row per turn, whose prompt is the exact token
  context the turn was sampled from and whose completion is the turn's action (:func:`turn_rows`; the same
  generation, so the same tokens and log-probs as layout B).

The training sequence is *defined* by the sampled and the environment's ids, never re-tokenised from text, so what
is trained on is what was sampled. Environment tokens are context, not actions: ``env_mask`` marks them,
``batch.loss_mask`` (what the loop's normaliser and loss use) excludes them, and ``forward`` returns 0 there. With
``observation_role`` set, observations are rendered as chat messages by the template (the assistant turn's close,
the message, the next generation prompt), and before every turn the message history is re-rendered through the
template and compared with the sampled context: a difference (a template that drops ``<think>`` from the history,
tokens that merge across a turn boundary) is recorded per turn in ``turn_drift`` and logged by EpisodeStats; it is
never corrected and never fatal.

Rollout is vectorised over episodes: at every turn, one ``generate`` call (HF or vLLM: token ids in, token ids out)
continues every live episode (each context is the episode's prompt + completion so far, left-aligned); the
environments then step on the decoded actions (host-side Python, one object per episode, reset by (task id,
episode seed) so an evaluation panel is reproducible: :func:`panel_hash`), and their observations are tokenised and
appended. Turns end at EOS, at a stop string (``</tool>``) or at the turn's token budget; episodes end by a typed
reason (``common.rollout.env.END_REASONS``: done, stopped, max_turns, overflow, timeout, env_error, parse_error; an
environment that raises or hangs ends its episode with one log line, never the run), each with its configured
return (``EpisodeLimits.end_rewards``). Per turn the agent records the reward, the hash of the history-free state
the turn acted on (``Environment.state_text``: GiGPO's anchor states) and whether the action parsed, in the declared
(B, K) columns ``turn_rewards``, ``turn_keys``, ``turn_valid``, ``turn_mask`` (:func:`turn_table` flattens them);
each row's return is written into its sample dict (``episode_return``), where the reward protocol reads it, so the
outcome reward is an ordinary reward function (``common.rollout.env.EpisodeReturn``).

The loop is unchanged: ``forward`` is the wrapped CausalLMPolicy's (its shared-prompt cache included) on the whole
sequence, so the log-probs at the assistant tokens are those of one plain forward over prompt + completion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.policies.base import Policy, PolicyOutput
from common.policies.causal_lm import CausalLMPolicy
from common.rollout.env import END_REASONS, Clock, Environment, EpisodeLimits, as_step, run_step, stable_hash

log = logging.getLogger(__name__)
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

    provides = (*CausalLMPolicy.provides, "episode_ids", "turn_ids", "token_turn", "env_mask", "end_reason", "num_turns",
                "turn_rewards", "turn_keys", "turn_mask", "turn_valid")  # turn_drift too with limits.observation_role

    def __init__(self, lm: CausalLMPolicy, environment: Environment, limits: EpisodeLimits | None = None):
        super().__init__()
        if not isinstance(lm, CausalLMPolicy):
            raise ValueError(f"lm must be a CausalLMPolicy, got {type(lm).__name__}")
        if not isinstance(environment, Environment):
            raise ValueError(f"environment must be a common.rollout.env.Environment, got {type(environment).__name__}")
        self.lm, self.environment = lm, environment
        self.limits = limits if limits is not None else EpisodeLimits()
        self.last_panel_hash: str | None = None  # the hash of the last rollout's (task id, seed, first observation)s
        if self.limits.observation_role is not None:
            self._chat_markers()  # a template that cannot append an observation message fails here, not mid-run

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
        """``n`` episodes per task, episode ``p·n + j`` is episode j of task p (group id p). Layout "episode": row
        e is episode e; layout "turn": one row per turn, sorted by (episode, turn)."""
        if n <= 0:
            raise ValueError(f"n must be a positive integer, got {n}")
        lim, lm, tok, dev = self.limits, self.lm, self.lm.tokenizer, self.lm.device
        clock = lim.clock if lim.clock is not None else Clock()
        tasks = [dict(p) for p in prompts for _ in range(n)]  # (E,)
        E = len(tasks)
        # (task id, episode seed): greedy (evaluation) panels use seed index j, sampled ones draw a base from torch's
        # RNG (reproducible under seed_everything and across a resume, which restores it)
        base = 0 if greedy else int(torch.randint(0, 2**31 - 1, ()))
        task_ids = [str(t.get("task_id", t.get("id", stable_hash(str(t.get("prompt", "")))))) for t in tasks]
        seeds = [stable_hash(f"{tid}|{e % n}|{base}") for e, tid in enumerate(task_ids)]
        envs = [self.environment.spawn() for _ in range(E)]
        returns, reasons, turns = [0.0] * E, [None] * E, [0] * E
        t_rewards, t_keys, t_valid, t_drift = ([[] for _ in range(E)] for _ in range(4))  # per episode, per turn
        key_now, parse_errors = [-1] * E, [0] * E  # the state key of each episode's current observation
        first = []
        for e, (env, task) in enumerate(zip(envs, tasks)):  # ok: environments are host-side Python, one per episode
            env.clock = clock
            env.seed(seeds[e])
            out = run_step(env.reset, task, lim.step_timeout_s, f"reset of task {task_ids[e][:40]!r} "
                           f"({str(task.get('prompt', ''))[:80]!r})", clock)
            if out.reason is not None:
                reasons[e] = out.reason
            else:
                key_now[e] = self._state_key(env, str(out.value))
            first.append(str(out.value) if out.reason is None else str(task.get("prompt", "")))
        self.last_panel_hash = panel_hash(task_ids, seeds, first)
        if greedy:  # printed by Lightning's rank-zero logger (shown at INFO in a run), our logger otherwise
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"evaluation panel {self.last_panel_hash}: {E} episodes of {len(prompts)} tasks reset by "
                           "(task id, seed)")
        prompt_ids, prompt_mask = lm.encode([{"prompt": o} for o in first])  # (E, P)
        chat = self._chat_markers() if lim.observation_role is not None else None
        history = [self._first_messages(o) for o in first] if chat is not None else None
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
            if chat is not None and t > 0:  # re-render each history through the template: does it give the context?
                for e in idx.tolist():  # ok: host-side text check, one per live episode and turn
                    t_drift[e].append(self._drifted(history[e], prompt_ids[e][prompt_mask[e]], comp[e][cmask[e]]))
            elif chat is not None:
                for e in idx.tolist():  # ok: host-side; the first prompt is the template's rendering by definition
                    t_drift[e].append(False)
            budget = lim.max_total_tokens - cmask[idx].sum(1)  # (N,) tokens left in each sequence
            sampling = dataclasses.replace(lm.sampling, stop_strings=stops,
                                           max_new_tokens=min(lm.sampling.max_new_tokens, int(budget.max())))
            ctx_mask, ctx_ids = pack(torch.cat([prompt_mask[idx], cmask[idx]], 1),
                                     torch.cat([prompt_ids[idx], comp[idx]], 1), left=True)  # (N, P + W)
            start = int(ctx_mask.any(0).long().argmax())  # drop columns that are padding in every row
            gen = lm.backend.generate(lm.model, tok, ctx_ids[:, start:], ctx_mask[:, start:], 1, sampling, greedy=greedy)
            a_ids, a_mask = gen.completion_ids.to(dev), gen.completion_mask.to(dev)  # (N, A)
            A = a_ids.shape[1]
            in_budget = torch.arange(A, device=dev)[None, :] < budget[:, None]  # (N, A)
            cut = (a_mask & ~in_budget).any(1)  # (N,) the action ran past the sequence's budget
            a_mask = a_mask & in_budget
            ended_eos = (torch.isin(a_ids, eos_ids) & a_mask).any(1)  # (N,)
            actions = tok.batch_decode(a_ids.masked_fill(~a_mask, tok.pad_token_id), skip_special_tokens=True)
            room = (budget - a_mask.sum(1)).tolist()  # (N,) tokens left for the observation
            observations = [("", "", "")] * idx.numel()  # (head, body, tail) of each observation
            cont = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)  # (N,) the episode goes on
            for j, (e, action) in enumerate(zip(idx.tolist(), actions)):  # ok: host-side environment steps
                turns[e] += 1
                t_rewards[e].append(0.0), t_keys[e].append(key_now[e]), t_valid[e].append(True)
                if bool(cut[j]):
                    reasons[e] = "overflow"
                    continue
                out = run_step(lambda a, env=envs[e]: as_step(env.step(a)), action, lim.step_timeout_s,
                               f"step {t} of task {task_ids[e][:40]!r} (action {action[:80]!r})", clock)
                if out.reason is not None:
                    reasons[e] = out.reason
                    continue
                returns[e] += out.value.reward
                t_rewards[e][-1], t_valid[e][-1] = out.value.reward, out.value.valid
                parse_errors[e] += not out.value.valid
                if out.value.done:
                    reasons[e] = "done"
                elif lim.max_parse_errors is not None and parse_errors[e] >= lim.max_parse_errors:
                    reasons[e] = "parse_error"
                    log.info("episode of task %r ends after %d actions that did not parse", task_ids[e][:40], parse_errors[e])
                elif bool(ended_eos[j]) and chat is None:
                    reasons[e] = "stopped"
                elif t == lim.max_turns - 1:  # no turn left to read an observation
                    reasons[e] = "max_turns"
                else:
                    text = out.value.observation[: lim.max_observation_tokens * _OBSERVATION_CHARS_PER_TOKEN]
                    key_now[e] = self._state_key(envs[e], out.value.observation)
                    if chat is None:
                        observations[j] = (lim.observation_prefix, text, lim.observation_suffix)
                    else:  # close the assistant turn (unless its EOS did), the message, the next generation prompt
                        close, eos_text, head, tail = chat
                        observations[j] = ((close[len(eos_text):] if bool(ended_eos[j]) else close) + head, text, tail)
                        history[e] += [{"role": "assistant", "content": action},
                                       {"role": lim.observation_role, "content": text}]
                    cont[j] = True
            o_ids, o_mask = self._tokenize(observations)  # (N, O)
            fits = o_mask.sum(1) <= torch.tensor(room, device=dev)  # (N,)
            for j in (cont & ~fits).nonzero().squeeze(1).tolist():  # ok: host-side bookkeeping
                reasons[int(idx[j])] = "overflow"
            o_mask = o_mask & (cont & fits)[:, None]
            live[idx] = cont & fits
            # append [action, observation] to every live row and right-align: one gather over (N, W + A + O)
            O = o_ids.shape[1]
            a_lp = (gen.behaviour_logprobs.to(dev, blp.dtype) if gen.behaviour_logprobs is not None
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
        for e, why in enumerate(reasons):  # ok: host-side; a configured end reward replaces the return
            value = lim.end_reward(why)
            if value is not None:
                if t_rewards[e]:  # carried on the last turn: the turn rewards still sum to the return
                    t_rewards[e][-1] += value - sum(t_rewards[e])
                returns[e] = value
        comp = comp.masked_fill(~cmask, tok.pad_token_id)
        envm, turn = envm & cmask, turn.masked_fill(~cmask | envm, -1)
        samples = [{**task, "episode_return": r, "task_id": tid, "env_seed": sd}
                   for task, r, tid, sd in zip(tasks, returns, task_ids, seeds)]
        truncated = torch.tensor([why in ("max_turns", "overflow") for why in reasons], dtype=torch.bool, device=dev)
        K = max(1, max(turns, default=0))
        padded = lambda rows, fill, dtype: torch.tensor([r + [fill] * (K - len(r)) for r in rows], dtype=dtype,  # noqa: E731
                                                        device=dev).reshape(E, K)
        batch = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=comp, completion_mask=cmask,
            group_ids=torch.arange(len(prompts), device=dev).repeat_interleave(n),
            behaviour_logprobs=blp.masked_fill(~cmask | envm, 0.0) if lm.sampling.logprobs else None,
            truncated=truncated, episode_ids=torch.arange(E, device=dev),
            turn_ids=torch.zeros(E, dtype=torch.long, device=dev),
            token_turn=turn, env_mask=envm, samples=samples,
            end_reason=torch.tensor([END_REASONS.index(why) for why in reasons], dtype=torch.long, device=dev),
            num_turns=torch.tensor(turns, dtype=torch.long, device=dev),
            turn_rewards=padded(t_rewards, 0.0, torch.float32), turn_keys=padded(t_keys, -1, torch.long),
            turn_mask=padded([[True] * k for k in turns], False, torch.bool),
            turn_valid=padded(t_valid, False, torch.bool),
            turn_drift=padded(t_drift, False, torch.bool) if chat is not None else None,
            completions=tok.batch_decode(comp, skip_special_tokens=True),
        )
        return batch if lim.layout == "episode" else turn_rows(batch, tok)

    @staticmethod
    def _state_key(env: Environment, observation: str) -> int:
        """The GiGPO anchor key of the state the environment is in: a stable hash of its history-free state text."""
        try:
            return stable_hash(str(env.state_text(observation)))
        except Exception as err:  # noqa: BLE001 - a key is bookkeeping; it never ends an episode
            log.warning("environment %s.state_text raised %r; the turn has no state key", type(env).__name__, err)
            return -1

    # ------------------------------------------------------------------ chat-rendered observations
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        lm = self.lm
        return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                chat_template=lm.chat_template, **lm.chat_template_kwargs)

    def _first_messages(self, observation: str) -> list[dict]:
        """The messages of the first prompt, as ``CausalLMPolicy.prompt_texts`` builds them."""
        lm = self.lm
        out = [{"role": "system", "content": lm.system_prompt}] if lm.system_prompt else []
        return out + [{"role": "user", "content": observation + lm.instruction}]

    def _chat_markers(self) -> tuple[str, str, str, str]:
        """How the chat template appends an observation message after an assistant turn: (close, eos_text, head,
        tail): ``close`` ends the assistant turn (its leading ``eos_text`` is omitted after an action that ended
        with EOS), ``head``/``tail`` wrap the message's content up to the next generation prompt. Read off the
        template by rendering a two-turn conversation with sentinel contents; a template that does not render
        the contents verbatim, in order, is refused naming the option."""
        A, M = "\x00ASSISTANT\x00", "\x00MESSAGE\x00"
        first = self._first_messages("\x00FIRST\x00")
        before = self._render(first + [{"role": "assistant", "content": A}], False)
        after = self._render(first + [{"role": "assistant", "content": A},
                                      {"role": self.limits.observation_role, "content": M}], True)
        if A not in before or not after.startswith(before[: before.index(A) + len(A)]) or after.count(M) != 1:
            raise ValueError(f"observation_role={self.limits.observation_role!r}: the chat template does not render an "
                             "assistant turn followed by this role's message verbatim and in order; use "
                             "observation_prefix / observation_suffix instead")
        start = before.index(A) + len(A)
        delta = after[start:]
        close_and_head, tail = delta.split(M)
        close = before[start:] if close_and_head.startswith(before[start:]) else ""
        head = close_and_head[len(close):]
        tok = self.lm.tokenizer
        eos_text = tok.eos_token if tok.eos_token and close.startswith(tok.eos_token) else ""
        return close, eos_text, head, tail

    def _drifted(self, messages: list[dict], prompt: Tensor, completion: Tensor) -> bool:
        """Re-tokenisation drift before a turn: the template's rendering of the history, tokenised, differs from the
        token context the model is sampled from (prompt + completion so far). Reported, never corrected: the
        sampled context is the training sequence."""
        try:
            ids = self.lm.tokenizer(self._render(messages, True), add_special_tokens=False)["input_ids"]
        except Exception as err:  # noqa: BLE001 - a template that cannot re-render the history is drift too
            log.warning("re-rendering the history through the chat template raised %r (counted as drift)", err)
            return True
        return ids != torch.cat([prompt, completion]).tolist()

    def _tokenize(self, parts: list[tuple[str, str, str]]) -> tuple[Tensor, Tensor]:
        """Observations as (head, body, tail) texts -> right-padded ids (N, O) and mask (N, O): the three parts
        tokenised apart (markers whole), the body cut to max_observation_tokens."""
        tok, cap = self.lm.tokenizer, self.limits.max_observation_tokens
        ids = []
        for head, body, tail in parts:  # ok: host-side, short observation lists
            enc = lambda text: tok(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
            ids.append(enc(head) + enc(body)[:cap] + enc(tail) if (head or body or tail) else [])
        O = max((len(x) for x in ids), default=0)
        out = torch.full((len(ids), O), tok.pad_token_id, dtype=torch.long)
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


def panel_hash(task_ids: Sequence[str], seeds: Sequence[int], first_observations: Sequence[str]) -> str:
    """A 16-hex-digit sha256 of an evaluation panel: every episode's (task id, seed, first observation), in order. Two
    runs that reset the same panel to the same states print the same hash."""
    h = hashlib.sha256()
    for tid, seed, obs in zip(task_ids, seeds, first_observations):  # ok: host-side, once per rollout
        h.update(f"{tid}\x1f{seed}\x1f{obs}\x1e".encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def turn_rows(batch: RolloutBatch, tokenizer) -> RolloutBatch:
    """Layout B (one row per episode) -> layout A (one row per turn; agentic.md §1), the same tokens: row u holds
    turn t of episode e, its prompt is the exact context turn t was sampled from (e's prompt and completion before
    the turn's first token, left-padded), its completion the turn's action tokens (right-padded). Rows are sorted
    by (episode, turn); ``turn_ids`` = t, the per-turn columns are (U, 1), the episode's fields are repeated. An
    episode without a turn (its reset failed) keeps one empty row (no tokens, ``turn_mask`` False), so its end
    reason and outcome still count, as in layout B. Shapes: (E, P), (E, W) -> (U, P'), (U, A)."""
    e_u, k_u = batch.turn_mask.nonzero(as_tuple=True)  # (U,), (U,) row-major: sorted by (episode, turn)
    empty = (~batch.turn_mask.any(1)).nonzero().squeeze(1)  # (E0,) episodes without a turn
    e_u, k_u = torch.cat([e_u, empty]), torch.cat([k_u, torch.zeros_like(empty)])
    order = torch.argsort(e_u * batch.turn_mask.shape[1] + k_u, stable=True)
    e_u, k_u = e_u[order], k_u[order]
    t_u = k_u + batch.turn_ids[e_u]
    U, W = e_u.numel(), batch.completion_ids.shape[1]
    pos = torch.arange(W, device=e_u.device)
    mine = batch.token_turn[e_u] == t_u[:, None]  # (U, W) the turn's action tokens
    start = torch.where(mine.any(1), mine.long().argmax(1), torch.full_like(t_u, W))  # (U,) first token of the turn
    ctx_mask, ctx_ids = pack(torch.cat([batch.prompt_mask[e_u], batch.completion_mask[e_u] & (pos < start[:, None])], 1),
                             torch.cat([batch.prompt_ids[e_u], batch.completion_ids[e_u]], 1), left=True)  # (U, P + W)
    lead = int(ctx_mask.any(0).long().argmax()) if U else 0  # columns that are padding in every row
    ctx_ids = ctx_ids.masked_fill(~ctx_mask, tokenizer.pad_token_id)[:, lead:]
    ctx_mask = ctx_mask[:, lead:]
    fields = [batch.completion_ids[e_u]] + ([batch.behaviour_logprobs[e_u]] if batch.behaviour_logprobs is not None else [])
    a_mask, *moved = pack(mine, *fields)  # (U, W) the action moved to the left end
    A = int(a_mask.sum(1).max()) if U else 0
    a_mask, moved = a_mask[:, :A], [x[:, :A] for x in moved]
    a_ids = moved[0].masked_fill(~a_mask, tokenizer.pad_token_id)
    last = t_u == batch.num_turns[e_u] - 1  # (U,) the episode's last turn
    col = (t_u - batch.turn_ids[e_u])[:, None]  # (U, 1) the turn's column in its episode row

    def column(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[e_u].gather(1, col)  # (U, 1)

    return RolloutBatch(
        prompt_ids=ctx_ids, prompt_mask=ctx_mask, completion_ids=a_ids, completion_mask=a_mask,
        group_ids=batch.group_ids[e_u],
        behaviour_logprobs=moved[1].masked_fill(~a_mask, 0.0) if len(moved) > 1 else None,
        truncated=batch.truncated[e_u] & last, episode_ids=batch.episode_ids[e_u], turn_ids=t_u,
        token_turn=torch.where(a_mask, t_u[:, None], torch.full_like(a_ids, -1)),
        env_mask=torch.zeros_like(a_mask), end_reason=batch.end_reason[e_u], num_turns=batch.num_turns[e_u],
        turn_rewards=column(batch.turn_rewards), turn_keys=column(batch.turn_keys), turn_mask=column(batch.turn_mask),
        turn_valid=column(batch.turn_valid), turn_drift=column(batch.turn_drift),
        samples=[dict(batch.samples[e]) for e in e_u.tolist()],
        completions=tokenizer.batch_decode(a_ids, skip_special_tokens=True),
    )


def turn_table(batch: RolloutBatch) -> dict[str, Tensor]:
    """The turn table of agentic.md §1.3 from either layout, flat (U,) tensors sorted by (episode, turn):
    ``tu_episode``, ``tu_t``, ``tu_row`` (the row holding the turn's tokens), ``tu_group``, ``tu_reward``,
    ``tu_state_key``, ``tu_valid``, ``tu_done`` (the episode's last turn). Vectorised (no loop over turns)."""
    batch.require("turn_table", "episode_ids", "turn_ids", "turn_mask", "turn_rewards", "turn_keys", "turn_valid", "num_turns")
    row, k = batch.turn_mask.nonzero(as_tuple=True)  # (U,), (U,)
    episode, t = batch.episode_ids[row], batch.turn_ids[row] + k
    order = torch.argsort(episode * (int(t.max()) + 1 if t.numel() else 1) + t, stable=True)  # (U,)
    row, k, episode, t = row[order], k[order], episode[order], t[order]
    return {"tu_episode": episode, "tu_t": t, "tu_row": row, "tu_group": batch.group_ids[row],
            "tu_reward": batch.turn_rewards[row, k], "tu_state_key": batch.turn_keys[row, k],
            "tu_valid": batch.turn_valid[row, k], "tu_done": t == batch.num_turns[row] - 1}


__all__ = ["MultiTurnAgentPolicy", "pack", "panel_hash", "turn_rows", "turn_table"]
