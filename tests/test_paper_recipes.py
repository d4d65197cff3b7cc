"""The paper-scale twins configs/<domain>/paper/*.yaml (issue 17, deliverable 6): each one resolves with
``advlab fit --print_config`` (one process for all, as tests/test_cli.py does for the CPU recipes), names its
paper, has a CPU twin of the same name one folder up, asks for a GPU, and comments every value it changes.
Their model paths (``/models/...``) do not exist here: --print_config must not load them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(ROOT.glob("configs/*/paper/*.yaml"))


def test_every_recipe_of_the_six_domains_has_a_paper_twin():
    domains = ("text_reasoning", "agentic", "diffusion", "retrieval", "speculative", "multimodal")
    recipes = [p for d in domains for p in sorted((ROOT / "configs" / d).glob("*.yaml"))]
    missing = [p.relative_to(ROOT).as_posix() for p in recipes if not (p.parent / "paper" / p.name).exists()]
    assert not missing, f"recipes without a paper twin: {missing}"
    assert len(PAPER) >= len(recipes) > 50


def test_every_paper_twin_resolves_with_print_config(capsys, monkeypatch):
    """One process: parsing imports each class_path and type-checks every init_arg; nothing is instantiated, so
    a model directory that is not on this machine does not matter. ``advlab``'s own parser (common.cli.main, the
    AdvlabCLI parser and its --print_config action) is built once and reused for every twin: building it is ~40% of
    a call and the same for every config (the suite's time budget)."""
    import common.cli
    from common.cli import main

    cached: dict = {}

    class OneParser(common.cli.AdvlabCLI):
        def setup_parser(self, *args, **kwargs) -> None:
            if not cached:
                super().setup_parser(*args, **kwargs)
                cached.update(parser=self.parser, methods=self._subcommand_method_arguments,
                              parsers=self._subcommand_parsers)
            self.parser = cached["parser"]
            self._subcommand_method_arguments, self._subcommand_parsers = cached["methods"], cached["parsers"]

    monkeypatch.setattr(common.cli, "AdvlabCLI", OneParser)

    for config in PAPER:
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--print_config"])
        out = capsys.readouterr().out
        assert done.value.code in (0, None), f"{config} does not parse"
        resolved = yaml.safe_load(out)
        assert resolved["trainer"]["accelerator"] == "gpu", config
        cpu = yaml.safe_load((config.parent.parent / config.name).read_text())
        # the twin runs the same components: the module, the data module, the loss and the estimator
        for key in ("class_path",):
            assert resolved["model"][key] == cpu["model"][key], config
        for part in ("loss", "advantage"):
            if part in cpu["model"].get("init_args", {}):
                assert resolved["model"]["init_args"][part]["class_path"] == cpu["model"]["init_args"][part]["class_path"], (config, part)


CHECKED = (("trainer", "max_steps"), ("trainer", "precision"), ("trainer", "devices"), ("model", "init_args", "lr"),
           ("model", "init_args", "group_size"), ("model", "init_args", "sampling", "max_new_tokens"),
           ("model", "init_args", "sampling", "temperature"), ("data", "init_args", "prompts_per_step"),
           ("model", "init_args", "loss", "init_args", "beta"), ("model", "init_args", "loss", "init_args", "eps_high"))


def test_a_paper_twin_names_its_paper_and_comments_what_it_changes():
    """Every hyperparameter the twin changes from its CPU recipe (lr, G, lengths, prompts a step, steps, precision,
    devices, temperature, KL, clip) carries a comment naming its source or saying "not stated"."""
    for config in PAPER:
        text = config.read_text()
        assert "# Paper: " in text, config
        twin, cpu = yaml.safe_load(text), yaml.safe_load((config.parent.parent / config.name).read_text())
        lines = _lines_by_path(text)
        for path in CHECKED:
            if _get(twin, path) is not None and _get(twin, path) != _get(cpu, path):
                assert "#" in lines[path], f"{config.relative_to(ROOT)}: {'.'.join(path)} changed with no source comment"


def test_the_medscope_twins_chain_sft_to_rl_and_differ_in_the_advantage_only():
    """MedScope (issue 22): the RL twins start from what the SFT twin writes, and the plain-GRPO twin is the GA-GRPO
    twin with GRPO advantages (as their CPU recipes; tests/multimodal/medscope/test_recipes.py)."""
    sft, grpo, ga = (yaml.safe_load((ROOT / f"configs/multimodal/paper/{n}.yaml").read_text())
                     for n in ("medscope_sft", "medscope_grpo", "ga_grpo"))
    out = sft["model"]["init_args"]["output_dir"]
    assert out != "runs/medscope-vlm-sft"  # not the CPU warm start
    for rl in (grpo, ga):
        assert rl["model"]["init_args"]["policy"]["init_args"]["path"] == out
    assert grpo["model"]["init_args"].pop("advantage")["class_path"] == "common.advantages.group.GRPO"
    assert ga["model"]["init_args"].pop("advantage")["class_path"] == "multimodal.medscope.advantage.GAGRPO"
    assert grpo == ga


def test_a_model_path_that_is_not_here_fails_only_when_the_model_is_built(tmp_path):
    """The twins load their model from a local path; on a machine without it, fit fails at once naming the path
    (common.models.Pretrained), while --print_config (above) still resolves."""
    from common.models import Pretrained

    with pytest.raises(FileNotFoundError, match="/models/Qwen2.5-32B"):
        Pretrained("/models/Qwen2.5-32B")


def _get(node, path):
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _lines_by_path(text: str) -> dict[tuple, str]:
    """The line of each block-mapping key, by its path of keys (list items are skipped, with what is inside them)."""
    out, stack = {}, []  # stack of (indent, key)
    for line in text.splitlines():
        body = line.strip()
        if not body or body.startswith("#") or ":" not in body:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if body.startswith("- "):
            stack.append((indent, None))  # a list item: nothing below it is looked up
            continue
        key = body.split(":", 1)[0]
        if any(k is None for _, k in stack):
            continue
        out[tuple(k for _, k in stack) + (key,)] = line
        stack.append((indent, key))
    return out
