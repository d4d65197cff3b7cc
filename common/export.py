"""``advlab export``: a checkpoint's causal LM as a Hugging Face model folder that transformers and vLLM load.

    advlab export --config configs/text_reasoning/grpo_arithmetic.yaml \\
        --ckpt_path runs/lightning_logs/version_0/checkpoints/last.ckpt --output exported/grpo-arithmetic

The recipe builds the module (as ``fit`` would), the checkpoint's ``state_dict`` is loaded into it (``weights_only``,
strict: a checkpoint of another recipe is refused, naming the first keys that differ), and the policy's language model
is written to ``--output``:

- ``model.safetensors`` (sharded as transformers shards): the full weights under their Hugging Face names, LoRA
  adapters merged (W + (α/r)·B·A per adapted layer, :func:`common.rollout.vllm.export_weights`, the same merge the
  vLLM weight sync uses), optionally cast to ``--dtype``;
- ``config.json``, the tokenizer files (with its chat template), and ``generation_config.json`` carrying the
  recipe's sampling settings (temperature, top-p, top-k, max_new_tokens, EOS/pad ids), so that
  ``model.generate(...)`` and vLLM's default sampling draw from the distribution the policy was trained at;
- ``advlab_export.json``: where it came from (checkpoint, recipe's system prompt and instruction, which the model
  folder cannot hold: prompts must be built the same way, chat template + instruction, to match training).

The folder is written to a temporary sibling and renamed, so an interrupted export never leaves half a model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_model(module):
    """The module's ``CausalLMPolicy`` (directly, or the one a multi-turn agent policy acts with)."""
    from common.policies.causal_lm import CausalLMPolicy

    policy = getattr(module, "policy", module)
    for candidate in (policy, getattr(policy, "lm", None)):
        if isinstance(candidate, CausalLMPolicy):
            return candidate
    raise ValueError(f"export: the model's policy is a {type(policy).__name__}, not a causal LM "
                     "(common.policies.causal_lm.CausalLMPolicy); only causal LM policies export to a Hugging Face folder")


def export_pretrained(module, output: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False,
                      provenance: dict | None = None) -> Path:
    """Write ``module``'s causal LM (a ``PolicyOptimizationModule`` or a ``CausalLMPolicy``) to ``output`` as a
    Hugging Face model folder (see the module docstring). Returns the folder."""
    from common.rollout.vllm import export_weights

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"export: --dtype must be one of {sorted(_DTYPES)} (or unset: as trained), got {dtype!r}")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"export: --output {str(output)!r} exists and is not an empty folder; "
                              "give a new folder or --overwrite true")
    lm = language_model(module)
    model = lm.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        weights = {name: t.to("cpu") for name, t in export_weights(model)}  # LoRA merged, adapters left out
        if dtype is not None:
            weights = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    tied = getattr(base.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in weights:
        del weights["lm_head.weight"]  # the input embedding is the head; transformers re-ties on load
    config = copy.deepcopy(base.config)
    config.dtype = dtype or str(next(iter(weights.values())).dtype).removeprefix("torch.")
    generation = copy.deepcopy(base.generation_config)
    tok = lm.tokenizer
    s = lm.sampling
    generation.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      max_new_tokens=s.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    generation._from_model_config = False  # these settings are the export's own, not derived from config.json
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        from safetensors.torch import save_file

        # one safetensors file, the layout transformers and vLLM read (shard by hand for models beyond a few GB)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"lora_merged": lm.lora is not None, "system_prompt": lm.system_prompt, "instruction": lm.instruction,
                "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                             "max_new_tokens": s.max_new_tokens, "stop_strings": list(s.stop_strings)},
                **(provenance or {})}
        (tmp / "advlab_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint_weights(module, ckpt_path: str | os.PathLike) -> None:
    """Load a Lightning checkpoint's ``state_dict`` into ``module`` (weights only, strict), naming what differs."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"export: --ckpt_path {str(ckpt_path)!r} is not a file (resolved: {path.resolve()})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which argument
        raise ValueError(f"export: --ckpt_path {str(ckpt_path)!r} is not a readable Lightning checkpoint: {str(e)[:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"export: --ckpt_path {str(ckpt_path)!r} has no 'state_dict' (not a Lightning checkpoint)")
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"export: --ckpt_path {str(ckpt_path)!r} does not match --config's model: missing "
                         f"{result.missing_keys[:3]} ({len(result.missing_keys)}), unexpected {result.unexpected_keys[:3]} "
                         f"({len(result.unexpected_keys)}); export with the recipe and overrides it was trained with")


def main(args: list[str] | None = None) -> None:
    """``advlab export --config X [overrides] --ckpt_path Y --output DIR [--dtype bfloat16] [--overwrite true]``."""
    import lightning as L

    from common.cli import AdvlabCLI

    class ExportCLI(AdvlabCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="the Lightning checkpoint to export (None: the recipe's initial weights)")
            parser.add_argument("--output", type=str | None, default=None, help="the Hugging Face model folder to write")
            parser.add_argument("--dtype", type=str | None, default=None, help="float32, bfloat16 or float16 (default: as trained)")
            parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing --output folder")

        def before_instantiate_classes(self) -> None:  # bad arguments fail here, before a model is loaded
            c = self.config
            if not c.get("output"):
                sys.exit("advlab export: --output is required: the folder to write the Hugging Face model to")
            if c.get("ckpt_path") and not Path(c["ckpt_path"]).is_file():
                sys.exit(f"advlab export: --ckpt_path {c['ckpt_path']!r} is not a file (resolved: {Path(c['ckpt_path']).resolve()})")
            if c.get("dtype") is not None and c["dtype"] not in _DTYPES:
                sys.exit(f"advlab export: --dtype must be one of {sorted(_DTYPES)}, got {c['dtype']!r}")
            out = Path(c["output"])
            if out.exists() and (not out.is_dir() or any(out.iterdir())) and not c.get("overwrite"):
                sys.exit(f"advlab export: --output {c['output']!r} exists and is not an empty folder; give a new folder or --overwrite true")
            super().before_instantiate_classes()

        def instantiate_classes(self) -> None:  # the model only: no trainer, no logger directory
            self.config_init = self.parser.instantiate_classes(self.config)
            self.model = self.config_init["model"]

    cli = ExportCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=args, save_config_callback=None,
                    parser_kwargs={"description": "advlab export: the recipe's module with the checkpoint's weights, "
                                   "written as a Hugging Face model folder (safetensors, tokenizer, generation config)"})
    c = cli.config
    try:
        if c.get("ckpt_path"):
            load_checkpoint_weights(cli.model, c["ckpt_path"])
        out = export_pretrained(cli.model, c["output"], dtype=c.get("dtype"), overwrite=bool(c.get("overwrite")),
                                provenance={"checkpoint": str(Path(c["ckpt_path"]).resolve()) if c.get("ckpt_path") else None,
                                            "config": [str(p) for p in (c.get("config") or [])]})
    except (OSError, ValueError) as e:
        sys.exit(f"advlab {e}")
    print(f"advlab export: wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}); vLLM: LLM(model={str(out)!r}))")


if __name__ == "__main__":
    main()
