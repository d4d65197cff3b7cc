"""``advlab list``: every component a recipe can name is listed, checked against the files and the recipes.

The listing (common/components.py) follows constructor type hints from ``model``/``data``; these tests check it
from the other side: the classes defined in the component packages' files, and every ``class_path`` in configs/."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("common", "text_reasoning", "retrieval", "speculative", "diffusion")

# package folder -> the base class its components subclass (the folders a recipe names components from)
FOLDERS = {
    "common/losses": "common.losses.base.PolicyLoss",
    "common/advantages": "common.advantages.base.AdvantageEstimator",
    "common/rewards": "common.rewards.base.RewardFunction",
    "common/methods": "common.methods.base.Method",
    "common/sampling": "common.sampling.base.Selector",
    "common/policies": "common.policies.base.Policy",
    "text_reasoning": "text_reasoning.data.TaskSource",
    "text_reasoning/envs": "common.rollout.env.Environment",
}


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def listed() -> set[str]:
    """The class paths ``advlab list`` prints (a real process, as a user runs it)."""
    proc = subprocess.run([sys.executable, "-m", "common.cli", "list"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not importable" not in proc.stderr, proc.stderr[-3000:]  # every module of the project imports
    paths = {ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert len(paths) > 80, proc.stdout[:2000]
    return paths


def _classes_in(folder: str) -> list[type]:
    """Public classes defined in the .py files of ``folder`` (not its subfolders), found from the files."""
    out = []
    for file in sorted((ROOT / folder).glob("*.py")):
        module = importlib.import_module(".".join((Path(folder) / file.stem).parts).removesuffix(".__init__"))
        out += [c for n, c in vars(module).items() if inspect.isclass(c) and c.__module__ == module.__name__ and not n.startswith("_")]
    return out


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_component_class_in_the_folder_is_listed(folder, listed):
    from common.components import is_base, project_classes, project_modules

    base = _import(FOLDERS[folder])
    everything = project_classes(project_modules()[0])
    components = [c for c in _classes_in(folder) if issubclass(c, base) and not is_base(c, everything)]
    assert components, folder
    missing = [f"{c.__module__}.{c.__qualname__}" for c in components if f"{c.__module__}.{c.__qualname__}" not in listed]
    assert not missing, f"not in `advlab list`: {missing}"


def _class_paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield node["class_path"]
        for v in node.values():
            yield from _class_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _class_paths(v)


def test_every_class_path_of_every_recipe_resolves_and_is_listed(listed):
    seen = {}
    for config in sorted((ROOT / "configs").rglob("*.yaml")):
        for path in _class_paths(yaml.safe_load(config.read_text())):
            seen.setdefault(path, config.relative_to(ROOT).as_posix())
    assert len(seen) > 50
    for path, config in sorted(seen.items()):
        assert inspect.isclass(_import(path)), f"{config}: {path} is not a class"
        if path.split(".")[0] in PROJECT:
            assert path in listed, f"{config}: {path} is not in `advlab list`"


def test_every_lightning_module_and_data_module_is_listed(listed):
    """The two things `advlab fit` takes: every module and data module of the project (not a base) is listed."""
    import lightning as L

    from common.components import is_base, project_classes, project_modules

    everything = project_classes(project_modules()[0])
    for cls in everything:
        if issubclass(cls, (L.LightningModule, L.LightningDataModule)) and not is_base(cls, everything):
            assert f"{cls.__module__}.{cls.__qualname__}" in listed, cls


def test_list_one_kind_and_a_misspelled_kind(capsys):
    from common.components import main

    main(["losses"])
    out = capsys.readouterr().out
    assert out.startswith("loss  (common.losses.base.PolicyLoss)\n")
    rows = [ln.split()[0] for ln in out.splitlines()[1:] if ln.strip()]
    assert "common.losses.ppo_clip.ClippedPolicyLoss" in rows and "common.losses.drpo.DRPOLoss" in rows
    assert len(rows) >= 15 and all(issubclass(_import(r), _import("common.losses.base.PolicyLoss")) for r in rows)

    main(["advantages", "--format", "markdown"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| kind (recipe keys) | class_path | what it is |"
    assert any("`common.advantages.group.GRPO`" in row for row in table)

    with pytest.raises(SystemExit) as done:
        main(["rewardz"])
    message = str(done.value.code).splitlines()
    assert len(message) == 2 and message[0] == "advlab list: no kind 'rewardz'; did you mean rewards?", message


def test_progress_yields_unchanged_and_reports_i_of_n(monkeypatch):
    """The long scripts' progress lines (common/progress.py): items pass through untouched; ``label i/N, elapsed``
    on the stream; the last item is always reported; ``ADVLAB_PROGRESS=0`` silences it."""
    import io

    from common.progress import progress

    out = io.StringIO()
    assert list(progress(range(3), "repro: seeds", every_s=0.0, stream=out)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["repro: seeds 1/3", "repro: seeds 2/3", "repro: seeds 3/3"]
    assert "elapsed, ~" in lines[0] and lines[-1].endswith(" s elapsed")

    out = io.StringIO()
    assert list(progress(range(50), "fast", every_s=3600.0, stream=out)) == list(range(50))
    assert out.getvalue() == ""  # a loop faster than every_s prints nothing

    out = io.StringIO()
    assert list(progress((i for i in range(2)), "gen", every_s=0.0, stream=out)) == [0, 1]
    assert out.getvalue().splitlines()[0].startswith("gen 1, ") and out.getvalue().splitlines()[-1].startswith("gen 2 done, ")

    monkeypatch.setenv("ADVLAB_PROGRESS", "0")
    out = io.StringIO()
    assert list(progress(range(3), "quiet", every_s=0.0, stream=out)) == [0, 1, 2] and out.getvalue() == ""
