"""Short ``advlab`` errors: one or two lines naming the key and what was expected, not jsonargparse's usage dump.

jsonargparse reports a bad value deep in a recipe as a 60-110-line usage listing followed by a tree of Union
branches (``Parser key "model": Does not validate against any of the Union subtypes ... - Problem with given
class_path ...: Parser key "loss": ...``). :class:`AdvlabParser` (the CLI's ``parser_class``) walks that tree down
to the one failing leaf and prints, for example::

    advlab: model.init_args.loss.init_args.eps_lo: not a parameter of common.losses.ppo_clip.ClippedPolicyLoss; did you mean eps_low?
      accepted: eps_low, eps_high, dual_clip, ratio_level, aggregation, beta, kl_estimator, entropy_coef

A misspelled key, option, class path or Literal choice suggests the nearest valid one (difflib). A component whose
constructor refuses its arguments (``ValueError``/``FileNotFoundError`` ... raised while the classes are built) is
reported the same way by :func:`concise_errors`, naming the component and its key. ``ADVLAB_TRACEBACK=1`` (or
jsonargparse's ``JSONARGPARSE_DEBUG``) restores the full message and traceback.

Negative numbers parse as values: argparse's own matcher takes ``-0.5`` but not ``-1e-3``, ``-1.`` or ``-inf``,
which made ``--model.init_args.loss.init_args.beta -1e-3`` fail with "expected one argument".

:class:`DropEmptyRunDir` (a callback the CLI always adds) removes ``runs/lightning_logs/version_N`` when a run fails
before its first optimiser step and wrote no checkpoint, so failed starts do not pile up empty version folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser

# "-0.5", "-3", "-1e-3", "-1.5E+2", "-.5", "-1.", "-inf": values, never option names (argparse's own: ^-\d+$|^-\d*\.\d+$).
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$")
MAX_LINE = 400  # a quoted user value (a whole YAML dict) is cut to this many characters per line
PREFIX = "advlab: "
CKPT_ALIASES = ("last", "best", "hpc", "registry")  # Lightning's named checkpoints (not paths)


def _debug() -> bool:
    return bool(os.environ.get("ADVLAB_TRACEBACK")) or os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def _type_name(text: str) -> str:
    """``<class 'float'>`` -> ``float``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).removeprefix("builtins."), text)
    return re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", text)


def nearest(word: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (difflib ratio >= cutoff; also a case-insensitive match), else None."""
    candidates = [c for c in dict.fromkeys(candidates) if c and c != word]
    lower = {c.lower(): c for c in candidates}
    if word.lower() in lower:
        return lower[word.lower()]
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return found[0] if found else None


def class_parameters(class_path: str) -> list[str]:
    """The keyword parameters a YAML ``init_args`` may give ``class_path`` (dataclass fields or ``__init__``)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - only used for a suggestion
        return []
    try:  # jsonargparse's own resolver: follows **kwargs into the base classes, as the parser does
        from jsonargparse._parameter_resolvers import get_signature_parameters

        return [p.name for p in get_signature_parameters(cls)]
    except Exception:  # noqa: BLE001 - fall back to the visible signature
        pass
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def import_suggestion(class_path: str) -> str | None:
    """For a class path that does not import, the nearest importable one: the longest importable module prefix,
    then the closest attribute (a class) or submodule name at the first missing part."""
    parts = class_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - try a shorter prefix
            continue
        names = [n for n in dir(module) if not n.startswith("_")]
        if hasattr(module, "__path__"):
            names += [m.name for m in pkgutil.iter_modules(module.__path__)]
        near = nearest(parts[i], names)
        if near is None:
            return None
        guess = ".".join([*parts[:i], near, *parts[i + 1:]])
        if _resolves(guess):
            return guess
        # a misspelled module: look for the class again inside the corrected one
        return import_suggestion(guess) if _resolves(".".join([*parts[:i], near])) else None
    return None


def _resolves(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    try:
        return bool(module) and hasattr(importlib.import_module(module), name) or _imports(dotted)
    except Exception:  # noqa: BLE001
        return _imports(dotted)


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------------------------------------------
# jsonargparse's nested error message -> (key path, class path, leaf text)

_STRUCTURAL = ("Subtypes:", "Given value type:", "Given value:", "Errors:")


def _block(lines: list[str]) -> list[str]:
    """Drop blank lines and the common indentation."""
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return []
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
    return [ln[indent:] for ln in lines]


def _bullets(lines: list[str]) -> list[list[str]]:
    """The ``- item`` entries at the block's own indentation, each with its continuation lines."""
    items: list[list[str]] = []
    for ln in lines:
        if ln.startswith("- "):
            items.append(["  " + ln[2:]])
        elif items and ln.startswith("  "):
            items[-1].append(ln)
        elif items and not ln.startswith(_STRUCTURAL):
            items[-1].append("  " + ln)
    return [_block(item) for item in items]


@dataclasses.dataclass
class Problem:
    path: list[str]
    class_path: str | None
    leaf: str


def explain(message: str, path: list[str] | None = None, class_path: str | None = None) -> Problem:
    """Follow jsonargparse's error tree to its deepest specific failure."""
    path = list(path or [])
    lines = _block(message.splitlines())
    while lines:
        head = lines[0]
        m = re.match(r'Parser key "([^"]+)":\s*(.*)$', head)
        if m:
            path.append(m.group(1))
            lines = _block(([m.group(2)] if m.group(2) else []) + lines[1:])
            continue
        m = re.match(r"- Problem with given class_path '([^']+)':\s*(.*)$|Problem with given class_path '([^']+)':\s*(.*)$", head)
        if m:
            class_path = m.group(1) or m.group(3)
            path.append("init_args")
            rest = m.group(2) if m.group(1) else m.group(4)
            lines = _block(([rest] if rest else []) + lines[1:])
            continue
        if head.startswith("- ") or "Does not validate against any of the Union subtypes" in head:
            items = _bullets(lines) if head.startswith("- ") else []
            if "Errors:" in lines:
                after = lines[lines.index("Errors:") + 1:]
                end = next((i for i, ln in enumerate(after) if not ln.startswith(" ")), len(after))
                items = _bullets(_block(after[:end]))
            items = [it for it in items if it and not re.match(r"Expected a <class 'NoneType'>", it[0])
                     and not it[0].startswith("Expected a path but")]
            deep = [it for it in items if "Does not validate" not in it[0] or len(it) > 1]
            if len(deep) == 1 or (deep and not all(it[0].startswith("Expected a ") for it in deep)):
                nested = [it for it in deep if not it[0].startswith("Expected a ")] or deep
                sub = explain("\n".join(nested[0]), path, class_path)
                if sub.leaf:
                    return sub
            types = [re.match(r"Expected an? (.+?)(?:\. Got value: (.*))?$", it[0]) for it in deep]
            if deep and all(types):
                wanted = " or ".join(_type_name(t.group(1)) for t in types)
                given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
                return Problem(path, class_path, f"expected {wanted}, got {types[0].group(2) or given}")
            return Problem(path, class_path, _clip(" ".join(ln for ln in lines if not ln.startswith(_STRUCTURAL))))
        body = [ln for ln in lines if not ln.startswith(_STRUCTURAL)]
        return Problem(path, class_path, "\n".join(body))
    return Problem(path, class_path, "")


def _key(path: list[str]) -> str:
    return ".".join(p for i, p in enumerate(path) if not (p == "init_args" and i == len(path) - 1))


def describe(message: str, option_names=(), top_keys=()) -> list[str]:
    """One or two lines for a jsonargparse error ``message``; ``option_names``/``top_keys`` feed suggestions."""
    message = message.strip()
    m = re.match(r"unrecognized arguments: (.*)$", message)
    if m:
        bad = m.group(1).split()
        flag = next((b for b in bad if b.startswith("-")), bad[0] if bad else "")
        near = nearest(flag.split("=")[0], option_names)
        line = f"unrecognized argument {flag}" + (f"; did you mean {near}?" if near else "")
        return [line, f"see: advlab {_subcommand()} --help" if not near else ""]
    m = re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        near = nearest(m.group(1), [*choices, "list", "export"])
        return [f"no subcommand {m.group(1)!r}" + (f"; did you mean {near}?" if near else ""),
                f"  subcommands: {', '.join(choices)}, list, export"]
    m = re.match(r"argument (\S+): expected one argument$", message)
    if m:
        flag = _flag_without_value(m.group(1))
        return [f"{flag} expects a value (a negative number is written -0.5 or {flag}=-0.5)"]
    m = re.match(r"Problems parsing config\s*:?\s*(.*)$", message, re.S)
    if m:
        config = _last_config()
        detail = [_clip(ln) for ln in m.group(1).splitlines() if ln.strip()]
        where = f"--config {config}" if config else "--config"
        return [f"{where}: not valid YAML: {' '.join(detail[:2])}", " ".join(detail[2:])]
    m = re.match(r"Option '([^']+)' is not accepted$", message)
    if m:  # a top-level key of a config file
        top = m.group(1).split(".")[0]
        near = nearest(top, top_keys)
        return [f"{m.group(1)}: unknown key {top!r}" + (f"; did you mean {near}?" if near else ""),
                f"top-level keys: {', '.join(k for k in top_keys if k)}"]
    p = explain(message)
    key, leaf = _key(p.path), p.leaf.strip()
    m = re.match(r"Option '([^']+)' is not accepted", leaf)
    if m:
        name = m.group(1).split(".")[0]
        key = ".".join([*p.path, m.group(1)])
        accepted = class_parameters(p.class_path) if p.class_path else []
        near = nearest(name, accepted)
        owner = p.class_path or "this component"
        return [f"{key}: not a parameter of {owner}" + (f"; did you mean {near}?" if near else ""),
                _accepted(accepted, _key(p.path), owner)]
    m = re.match(r"Key \"([^\"]+)\" is required but not included", leaf)
    if m:
        key = ".".join([*p.path, m.group(1)])
        return [f"{key}: required by {p.class_path or 'this component'}, but not given"]
    m = re.match(r"module '([^']+)' has no attribute '([^']+)'|No module named '([^']+)'|"
                 r"Import path ([\w.]+) does not|.*?'([\w.]+)' could not be (?:imported|resolved)", leaf)
    if m and p.class_path:
        near = import_suggestion(p.class_path)
        return [f"{_key(p.path[:-1]) or key}: cannot import {p.class_path} ({leaf.splitlines()[0]})"
                + (f"; did you mean {near}?" if near else ""),
                "  list what a recipe can name: advlab list"]
    m = re.match(r"Expected an? (.+?)\. Got value: (.*)$", leaf, re.S)
    if m:
        wanted, got = _type_name(m.group(1)), m.group(2).strip()
        choices = re.findall(r"'([^']*)'", wanted) if wanted.startswith("one of") else []
        near = nearest(got.strip("'\""), choices) if choices else None
        return [f"{key}: expected {wanted}, got {_clip(got)}" + (f"; did you mean {near!r}?" if near else "")]
    m = re.match(r"File does not exist: (.*)$", leaf)
    if m:
        return [f"--{key}: file does not exist: {m.group(1)}"]
    lines = [ln for ln in leaf.splitlines() if ln.strip()] or [message.splitlines()[0]]
    first = f"{key}: {_type_name(lines[0])}" if key else _type_name(lines[0])
    return [_clip(first), _clip(" ".join(lines[1:])) if len(lines) > 1 else ""]


def _accepted(names: list[str], key: str, class_path: str, width: int = 160) -> str:
    """``  accepted: a, b, c`` cut to ``width`` characters, then where the full list is."""
    if not names:
        return ""
    shown, size = [], 0
    for n in names:
        if size + len(n) + 2 > width:
            break
        shown.append(n)
        size += len(n) + 2
    more = "" if len(shown) == len(names) else f", ... ({len(names)} in all: advlab {_subcommand()} --{key}.help {class_path})"
    return f"  accepted: {', '.join(shown)}{more}"


# ---------------------------------------------------------------------------------------------------------------
# what was on the command line (for "expects a value" and "--config FILE")

_ARGS: list[str] = []


def _subcommand() -> str:
    return next((a for a in _ARGS if a in ("fit", "validate", "test", "predict")), "fit")


def _last_config() -> str | None:
    found = None
    for i, a in enumerate(_ARGS):
        if a in ("-c", "--config") and i + 1 < len(_ARGS):
            found = _ARGS[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
    return found


def _flag_without_value(flag: str) -> str:
    """argparse names only ``--model`` for ``--model.init_args.lr`` given no value: find the full flag."""
    for i, a in enumerate(_ARGS):
        nxt = _ARGS[i + 1] if i + 1 < len(_ARGS) else None
        if a.startswith(flag) and "=" not in a and (nxt is None or (nxt.startswith("-") and not NEGATIVE_NUMBER.match(nxt))):
            return a
    return flag


def _fail(lines: list[str]) -> None:
    lines = [ln for ln in lines if ln and ln.strip()][:2]
    sys.stderr.write("".join((PREFIX if i == 0 else "") + ln.rstrip() + "\n" for i, ln in enumerate(lines)))
    sys.stderr.flush()
    sys.exit(2)


class AdvlabParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one or two lines (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def parse_args(self, args=None, *rest, **kwargs):
        _ARGS[:] = list(sys.argv[1:] if args is None else args)
        cfg = super().parse_args(args, *rest, **kwargs)
        sub = cfg.get("subcommand") if hasattr(cfg, "get") else None
        ckpt = cfg.get(f"{sub}.ckpt_path") if sub else None
        # a checkpoint that is not there fails here, naming it, not after the model is built and a run folder made;
        # a folder with meta.pt is a sharded checkpoint (ModelParallelStrategy's, FSDP2: common/fsdp.py)
        if (isinstance(ckpt, str) and ckpt not in CKPT_ALIASES and "://" not in ckpt and not Path(ckpt).is_file()
                and not (Path(ckpt) / "meta.pt").is_file()):
            self.error(f"ckpt_path: {'is a directory, not a checkpoint file' if Path(ckpt).is_dir() else 'no such file'}: {ckpt}")
        return cfg

    def _parsers(self) -> Iterator[LightningArgumentParser]:
        yield self
        action = getattr(self, "_subcommands_action", None)
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            yield sub

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or _debug():
            return super().error(message, ex)
        parsers = list(self._parsers())
        sub = getattr(ex, "subcommand_parser", None)
        if sub is not None:
            parsers.insert(0, sub)
        options = [o for p in parsers for o in p._option_string_actions if o.startswith("--")]
        top = [a.dest for p in parsers[1:] or parsers for a in p._actions if a.dest and a.dest != "help"]
        _fail(describe(message, options, sorted(set(k.split(".")[0] for k in top) - {"config"})))

    def instantiate_classes(self, cfg, *args, **kwargs):
        with concise_errors(cfg):
            return super().instantiate_classes(cfg, *args, **kwargs)


def _root(exc: BaseException) -> BaseException:
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def _constructors(exc: BaseException) -> list[str]:
    """The classes whose ``__init__``/``__post_init__`` frames the traceback passes through, outermost first."""
    tb, found = exc.__traceback__, []
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("__init__", "__post_init__") and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            found.append(f"{cls.__module__}.{cls.__qualname__}")
        tb = tb.tb_next
    return found


def _class_paths(tree) -> set[str]:
    """Every ``class_path`` named in a parsed config (nested dicts/lists)."""
    if isinstance(tree, dict):
        own = {tree["class_path"]} if isinstance(tree.get("class_path"), str) else set()
        return own.union(*(_class_paths(v) for v in tree.values()))
    if isinstance(tree, (list, tuple)):
        return set().union(*(_class_paths(v) for v in tree))
    return set()


def _dest_path(exc: BaseException) -> str | None:
    """The recipe key being built when ``exc`` was raised: jsonargparse instantiates nested components through one
    argparse Action per level (``model``, then ``policy``), each frame of the exception chain holding one."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    dests: list[str] = []
    for e in chain:
        tb = e.__traceback__
        while tb is not None:
            action = tb.tb_frame.f_locals.get("self")
            if isinstance(action, argparse.Action) and action.dest and (not dests or dests[-1] != action.dest):
                dests.append(action.dest)
            tb = tb.tb_next
    return ".init_args.".join(dests) or None


@contextlib.contextmanager
def concise_errors(cfg=None, key: str | None = None):
    """A constructor that refuses its arguments while the recipe's classes are built: one line naming the recipe
    key (or ``key``), the component and the constructor's own message, then a pointer to the traceback."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - reported, then exit 2
        if _debug():
            raise
        root = _root(exc)
        try:
            named = _class_paths(cfg.clone().as_dict() if hasattr(cfg, "as_dict") else cfg)
        except Exception:  # noqa: BLE001
            named = set()
        owners = _constructors(root)
        owner = next((o for o in reversed(owners) if o in named), owners[-1] if owners and not key else None)
        where = _dest_path(exc) or key
        text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        if text.startswith("Does not validate"):
            text = describe(str(exc))[0]
        name = f"{where} ({owner})" if where and owner else owner or where
        _fail([_clip(f"{name}: {type(root).__name__}: {text}" if name else f"{type(root).__name__}: {text}"),
               "  (ADVLAB_TRACEBACK=1 shows the traceback)"])


class DropEmptyRunDir(Callback):
    """A run that fails before its first optimiser step and wrote no checkpoint leaves no ``version_N`` folder:
    on the exception, the logger's folder is closed and removed (rank zero; it holds at most the saved config,
    hyperparameters and an event file with nothing of the run in it)."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_step != 0 or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if not log_dir or not Path(log_dir).is_dir() or any(Path(log_dir).rglob("*.ckpt")):
                continue
            with contextlib.suppress(Exception):
                logger.finalize("failed")
            shutil.rmtree(log_dir, ignore_errors=True)
            for parent in list(Path(log_dir).parents)[:2]:  # lightning_logs/ and runs/, where this run made them
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when empty
