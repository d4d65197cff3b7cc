"""Stateful methods under data parallelism (issue 15), with real ``advlab fit`` runs on 2 CPU ranks (gloo):

- DUMP's curriculum (``CurriculumData`` + ``DUMP``) and SPO's stream (``PrioritisedData`` + ``SPOTracker``) draw the
  global batch of 2 x prompts_per_step and train each rank on its slice: the ranks' slices, in rank order, are exactly
  one process's draw from the same state (SPO's prompts disjoint); the curriculum / tracker observes every rank's
  rows, so its state is equal on both ranks after every step and equals a plain reference updated with the global
  batch; SPO resumed from a step-1 checkpoint continues exactly on both ranks;
- kill-and-resume: the 2-rank GRPO run with DUMP's curriculum is run again, its rank-1 process SIGKILLed after a
  checkpoint (the run dies) and resumed: later prompts, completions, losses and rewards, the final weights and every
  other checkpointed tensor (both ranks' RNG states and own module state included) equal the uninterrupted run
  exactly;
- the EMA teacher (SDPO) and the critic (T-PPO's value head) hold the same weights on both ranks after every step;
- each rank's own buffers and extra state (replay buffers' rows) are saved beside rank 0's and come back to that rank
  (``common/rank_state.py``, two plain gloo processes).

Each rank's state after every step comes from ``ddp_state_support.StateRecorder`` (Lightning's checkpoint holds
rank 0's module state only). Tiny models; 6 two-rank ``advlab fit`` runs in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from ddp_state_support import ddp_args, ddp_env, instantiate, recorded_states, records
from helpers import DIGITS
from resume import ROOT, TINY, assert_checkpoints_equal, cli, events, step_of

pytestmark = pytest.mark.slow


def fit(tmp: Path, name: str, config: str, *args: str, steps: int, ckpt: Path | None = None,
        command: list[str] | None = None):
    """A 2-rank ``advlab fit`` of ``config`` (tiny model; or of ``command``) to ``steps``; returns its records and
    state directory."""
    cwd = tmp / name
    cwd.mkdir(exist_ok=True)
    record, states = tmp / f"{name}.jsonl", tmp / f"{name}_states"
    cmd = [*(command or cli(config, *TINY, *args)), *ddp_args(record, states), "--trainer.max_steps", str(steps),
           *(["--ckpt_path", str(ckpt)] if ckpt else [])]
    done = subprocess.run(cmd, cwd=cwd, env=ddp_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return records(record), states


def checkpoint(run_dir: Path, step: int) -> Path:
    return next(p for p in (run_dir / "runs/lightning_logs/version_0/checkpoints").glob("*.ckpt") if f"step={step}" in p.name)


def recipe_data(config: str, **overrides):
    """The recipe's data module, one process, with ``overrides`` of its init_args (tasks built from the YAML)."""
    spec = yaml.safe_load((ROOT / config).read_text())["data"]
    spec["init_args"].update(overrides)
    data = instantiate(spec)
    data.setup("fit")
    return data


def assert_same_state(a: dict, b: dict, prefix: str) -> None:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys
    for k in keys:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def assert_resumed_continues(straight: dict, states: Path, again: dict, again_states: Path, steps: int) -> None:
    """Resumed at step 1: every rank's later prompts, completions and rewards, and its final state, are the
    straight run's."""
    for r in (0, 1):
        assert again[r] == straight[r][1:], r
    for r, (a, b) in enumerate(zip(recorded_states(states, steps), recorded_states(again_states, steps))):
        assert sorted(a) == sorted(b)
        for k in a:
            if torch.is_tensor(a[k]):
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"rank {r}: {k}")


# ------------------------------------------------------------------ DUMP on 2 ranks, killed and resumed
def rank_one(launcher: int) -> int | None:
    """The pid of rank 1: the child of Lightning's launcher (rank 0) whose environment has LOCAL_RANK=1."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
    return None


def test_dump_on_two_ranks_is_one_global_curriculum_and_a_killed_rank_resumes_exactly(tmp_path):
    """GRPO with DUMP's curriculum (configs/text_reasoning/dump.yaml: GRPO advantages, the curriculum as selector)
    on 2 ranks, 2 prompts x G = 2 a rank, a checkpoint after every step, 5 steps.

    (a) the ranks' slots, in rank order, are one process's draw of 2 x 2 slots from the same curriculum state;
    (b) the curriculum observed the global batch: equal on both ranks after every step, and equal to a plain DUMP fed
        the global batch's GRPO advantages;
    (c) kill-and-resume: a second run's rank-1 process is SIGKILLed once a checkpoint at step >= 2 is on disk (rank 0
        then fails at its next collective: the run is gone) and the run is resumed from last.ckpt. It equals the
        uninterrupted run exactly: later prompts, completions, rewards and losses, the final weights, AdamW moments,
        both ranks' RNG states and both ranks' module state (rank 1's canaries, which differ from rank 0's, come
        back from ``advlab_module_state_ranks``) - the same operations on the same inputs in the same order (gloo's
        sum of two ranks is commutative, so even the gradient average is bit-equal)."""
    from common.advantages.group import grpo
    from common.sampling.curriculum import DUMP

    config, steps, S, G = "configs/text_reasoning/dump.yaml", 5, 2, 2
    args = ["--model.init_args.group_size", str(G), "--data.init_args.prompts_per_step", str(S)]

    def command(name: str, max_steps: int, *extra: str) -> list[str]:
        return cli(config, *TINY, *args, *ddp_args(tmp_path / f"{name}.jsonl", tmp_path / f"{name}_states"),
                   "--trainer.max_steps", str(max_steps), *extra)

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    ref_run = subprocess.Popen(command("straight", steps), cwd=straight, env=ddp_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command("broken", 1000), cwd=broken, env=ddp_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = broken / "runs/lightning_logs/version_0/checkpoints/last.ckpt"
    deadline = time.time() + 300
    while (step_of(last) or 0) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    victim = rank_one(proc.pid)
    assert victim is not None and proc.poll() is None, "no rank 1 to kill"
    os.kill(victim, signal.SIGKILL)
    try:
        proc.communicate(timeout=120)  # rank 0 fails at its next collective with rank 1 gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "the run went on without rank 1"
    killed_at = step_of(last)
    assert killed_at is not None and 2 <= killed_at < steps, killed_at
    resumed = subprocess.run(command("resumed", steps, "--ckpt_path", str(last)), cwd=broken, env=ddp_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = ref_run.communicate(timeout=300)
    assert ref_run.returncode == 0, err[-3000:]
    seen, states = records(tmp_path / "straight.jsonl"), tmp_path / "straight_states"
    assert [len(seen[r]) for r in (0, 1)] == [steps, steps]

    # (a), (b) on the uninterrupted run
    data = recipe_data(config, train_size=24, val_size=4, prompts_per_step=2 * S)  # one process, the global batch
    yml = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]["selector"]["init_args"]
    ref = DUMP(**yml)  # a plain curriculum fed the global batch
    available = torch.tensor([len(p) > 0 for p in data.pools])
    for k in range(steps):
        want = data.draw(k, ref.probs(available))
        got = [seen[r][k] for r in (0, 1)]
        assert [p for r in (0, 1) for p in got[r]["prompts"][::G]] == [s["prompt"] for s in want], k
        assert [d for r in (0, 1) for d in got[r]["distributions"][::G]] == [s["distribution"] for s in want], k
        rewards = torch.tensor([x for r in (0, 1) for x in got[r]["rewards"]])  # (2 S G,) rank order
        adv = grpo(rewards, torch.arange(2 * S).repeat_interleave(G), scale="group", eps=1e-6)  # groups on one rank
        ref.observe(adv.abs(), torch.tensor([d for r in (0, 1) for d in got[r]["distributions"]]))
        mine = recorded_states(states, k + 1)
        assert_same_state(mine[0], mine[1], "selector.")
        assert int(mine[0]["selector.counts"].sum()) == (k + 1) * 2 * S * G
        torch.testing.assert_close(mine[0]["selector.counts"], ref.counts, rtol=0, atol=0)
        # the run's |A| are GRPO's on the same float32 rewards: the same operations, so equal to float32 rounding
        torch.testing.assert_close(mine[0]["selector.windows"], ref.windows, rtol=1e-6, atol=1e-6)
    assert int((ref.counts > 0).sum()) >= 3  # the draws spread over several distributions

    # (c) the killed and resumed run equals the uninterrupted one
    again = records(tmp_path / "resumed.jsonl")
    for r in (0, 1):
        assert again[r] == seen[r][killed_at:], r
        want, got = recorded_states(states, steps)[r], recorded_states(tmp_path / "resumed_states", steps)[r]
        assert sorted(want) == sorted(got)
        for k in want:
            if torch.is_tensor(want[k]):
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"rank {r}: {k}")
            else:
                assert got[k] == want[k], (r, k)
    a = torch.load(straight / "runs/lightning_logs/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(broken / "runs/lightning_logs/version_1/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == steps
    assert_checkpoints_equal(a, b)
    assert a["advlab_module_state_ranks"][1], "rank 1's own state (its canaries) is in the checkpoint"
    for tag in ("train/loss", "train/reward"):
        seen_a = events(straight / "runs/lightning_logs/version_0", tag)
        seen_b = events(broken / "runs/lightning_logs/version_1", tag)
        assert sorted(seen_b) == list(range(killed_at, steps)), (tag, seen_b)
        assert [seen_b[s] for s in sorted(seen_b)] == [seen_a[s] for s in sorted(seen_b)], tag
    assert len(set(seen_a.values())) > 1  # the losses are not all equal: the weights moved


# ------------------------------------------------------------------ SPO: PrioritisedData + SPOTracker + SPOStream
def test_spo_stream_on_two_ranks_is_one_global_tracker(tmp_path):
    from common.advantages.tracker import SPOTracker
    from common.sampling.priority import spo_priority

    config, steps, S = "configs/text_reasoning/spo_stream.yaml", 3, 3
    args = ["--data.init_args.prompts_per_step", str(S)]
    seen, states = fit(tmp_path, "straight", config, *args, steps=steps)

    data = recipe_data(config, train_size=24, val_size=4, prompts_per_step=2 * S)  # one process, the global batch
    yml = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]["advantage"]["init_args"]
    ref = SPOTracker(**yml)
    for k in range(steps):
        if k:  # the tracker's state before step k (its KL feed needs the model: taken from the run)
            ref.load_state_dict({n[len("advantage."):]: v for n, v in recorded_states(states, k)[0].items()
                                 if n.startswith("advantage.")})
        got = [seen[r][k] for r in (0, 1)]
        # (a) disjoint prompts (drawn without replacement); in rank order, one process's draw of 2 x S prompts
        assert not set(got[0]["uids"]) & set(got[1]["uids"]), k
        probs = spo_priority(ref.alpha[:24], ref.beta[:24], gamma=data.gamma, eps_explore=data.eps_explore)  # (N,)
        want = data.draw(k, probs)
        assert got[0]["uids"] + got[1]["uids"] == [s["uid"] for s in want], k
        # (b) the tracker observed both ranks' rows: equal on both ranks and equal to the reference's update
        ref.observe(torch.tensor(got[0]["uids"] + got[1]["uids"]),
                    torch.tensor(got[0]["rewards"] + got[1]["rewards"], dtype=torch.float32))
        mine = recorded_states(states, k + 1)
        assert_same_state(mine[0], mine[1], "advantage.")
        assert int(mine[0]["advantage.visits"].sum()) == (k + 1) * 2 * S
        for name in ("alpha", "beta", "visits", "kl_at_visit"):  # float64 state, the same operations: exact
            torch.testing.assert_close(mine[0][f"advantage.{name}"], getattr(ref, name), rtol=0, atol=0, msg=name)
    assert float(mine[0]["advantage.kl_total"]) > 0  # the KL drift (global token mean) moved, equally on both ranks

    again, again_states = fit(tmp_path, "resumed", config, *args, steps=steps, ckpt=checkpoint(tmp_path / "straight", 1))
    assert_resumed_continues(seen, states, again, again_states, steps)


# ------------------------------------------------------------------ EMA teacher and critic: checked, not assumed
def test_ema_teacher_and_critic_are_one_state_on_both_ranks(tmp_path):
    """SDPO's EMA teacher θ̄ (frozen parameters, θ̄ ← (1 − η)θ̄ + ηθ after each update) and T-PPO's value head
    (trained by the DDP-averaged gradient of a value loss over the global token count) hold the same weights on both
    ranks after every step, and both moved. One 2-rank run carries both: T-PPO's recipe (EGAE on the critic's values)
    with SDPO's loss and its self-distillation part beside T-PPO's; 2 steps."""
    methods = ('[{"class_path": "common.methods.tppo.TruncatedPPO", "init_args": {"value_lr": 1.0e-2, "max_windows": 1}}, '
               '{"class_path": "text_reasoning.self_distill.SelfDistillation", '
               '"init_args": {"success_threshold": -100, "ema_rate": 0.5}}]')  # every row a teacher row
    run = cli("configs/text_reasoning/tppo.yaml", *TINY,
              "--model.init_args.policy.init_args.alphabet", DIGITS,  # some responses end (the critic fits those)
              "--model.init_args.loss", '{"class_path": "common.losses.self_distill.SDPOLoss", "init_args": {"top_k": 8}}',
              "--model.init_args.methods", methods, "--model.init_args.group_size", "2", "--data.init_args.prompts_per_step", "2")
    fit(tmp_path, "run", "", steps=2, command=run)
    states = tmp_path / "run_states"
    first, second = (recorded_states(states, k) for k in (1, 2))
    for prefix in ("methods.1.teacher.", "methods.0.critic."):
        for mine in (first, second):
            assert_same_state(mine[0], mine[1], prefix)
        assert any(not torch.equal(first[0][k], second[0][k]) for k in first[0] if k.startswith(prefix)), prefix
    for mine in (first, second):
        assert mine[0]["policy_weight_sum"] == mine[1]["policy_weight_sum"]


# ------------------------------------------------------------------ per-rank state in the checkpoint (common/rank_state.py)
def test_each_rank_gets_its_own_buffers_and_extra_state_back(tmp_path):
    """Two plain gloo processes: a per-rank counter buffer and per-rank rows (extra state) are saved beside rank 0's,
    only where they differ from rank 0's, and each rank loads its own back over rank 0's state dict; a module that
    zero-fills missing buffers on a partial load (as the canaries do) keeps its other buffers."""
    import sys

    port = str(__import__("ddp_state_support").free_port())
    support = ROOT / "tests/support/rank_state_support.py"
    procs = [subprocess.Popen([sys.executable, str(support), str(tmp_path)], stderr=subprocess.PIPE, text=True,
                              env=ddp_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_PORT=port)) for r in (0, 1)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        state = got["state"]
        assert int(state["buffer.seen"]) == 10 + r and int(state["shared.seen"]) == 7
        rows = state["buffer._extra_state"]["rows"]
        assert [row["prompt"] for row in rows] == [f"rank {r} row {i}" for i in range(3)]
        assert all(torch.equal(row["ids"], torch.arange(i + r)) for i, row in enumerate(rows))
    stored = got["stored"]
    assert stored[0] == {} and sorted(stored[1]) == ["buffer._extra_state", "buffer.seen"]  # only what differs


# ------------------------------------------------------------------ the draws by rank, in one process
@pytest.mark.parametrize("config", ["configs/text_reasoning/dump.yaml", "configs/text_reasoning/spo_stream.yaml"])
def test_rank_slices_of_a_drawn_batch_are_one_process_draw_of_the_global_batch(config):
    """Rank r of 3 (its rank and world size set as the Trainer would give them) draws slice r of the global batch:
    in rank order the slices are one process's draw of 3 x S prompts, for any state (probabilities) and batch number.
    SPO's prompts (without replacement) are disjoint; a global batch larger than the training set is refused."""
    S = 2
    one = recipe_data(config, train_size=24, val_size=4, prompts_per_step=3 * S)
    ranks = [recipe_data(config, train_size=24, val_size=4, prompts_per_step=S) for _ in range(3)]
    for r, data in enumerate(ranks):
        data.rank_and_world = lambda r=r: (r, 3)
    n = len(one.pools) if hasattr(one, "pools") else len(one.train_set)
    probs = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    for number in (0, 5):
        want = one.draw(number, probs)
        got = [data.draw(number, probs) for data in ranks]
        assert sum(got, []) == want
        if hasattr(one, "gamma"):  # SPO
            assert len({s["uid"] for s in want}) == 3 * S
    if hasattr(one, "gamma"):
        big = recipe_data(config, train_size=24, val_size=4, prompts_per_step=9)
        big.rank_and_world = lambda: (0, 3)
        with pytest.raises(ValueError, match=r"prompts_per_step x ranks = 9 x 3 must be at most the 24 training prompts"):
            big.draw(0, probs)
