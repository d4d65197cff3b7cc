"""The README's promises: its first two commands are `make demo` and `make test`, the Makefile has them (and
`.ci/run` calls `make test`), and every `advlab` command it shows parses against the real CLI."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_first_two_commands_are_make_demo_and_make_test():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_every_advlab_command_in_the_readme_parses():
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("advlab "):
                commands.append(line)
    assert commands, "the README shows no advlab command"
    for line in commands:
        args = ["configs/text_reasoning/grpo_arithmetic.yaml" if a == "..." else a for a in shlex.split(line)[1:]]
        if "--config" not in args:
            continue
        if "--ckpt_path" in args:  # needs a checkpoint; parsing the rest is what the README promises here
            i = args.index("--ckpt_path")
            del args[i : i + 2]
        if "--print_config" not in args:
            args.append("--print_config")
        proc = subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"


def python_blocks_after(heading: str) -> str:
    """The first ```python block after the paragraph that starts with ``heading``."""
    start = README.index(heading)
    return re.search(r"```python\n(.*?)```", README[start:], re.S).group(1)


def test_the_adding_a_method_example_runs():
    exec(compile(python_blocks_after("**Adding a method**"), "README: adding a method", "exec"), {})


def test_the_adding_a_domain_example_runs():
    torch_seed = "import torch; torch.manual_seed(0)\n"
    exec(compile(torch_seed + python_blocks_after("**Adding a domain**"), "README: adding a domain", "exec"), {})
