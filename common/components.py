"""``advlab list [KIND ...]``: every component a recipe can name by ``class_path``, found from the code itself.

There is no registry: a recipe names any class by import path. This listing is derived the same way jsonargparse
checks a recipe. It starts from the two things ``advlab fit`` takes, ``model`` (a LightningModule) and ``data`` (a
LightningDataModule), and Lightning's ``trainer.callbacks``. For every project class found, it follows the type
hints of its constructor parameters (jsonargparse's resolver, which follows ``**kwargs`` into base classes as the
parser does). A parameter typed with a class T (``loss: PolicyLoss | None``, ``methods: Sequence[Method]``) is a
*slot*; its components are the project's public subclasses of T (for a ``Protocol``, the classes that have all of its
methods). Every module of the project's packages is imported to find them. So a new loss under ``common/losses``
appears without being registered, and ``tests/test_components.py`` checks that each class under the component
packages and each ``class_path`` in ``configs/`` is listed.

``advlab list`` prints every kind; ``advlab list losses rewards`` only those. A kind is matched by its parameter
name, singular or plural (``loss``/``losses``, ``advantage``/``advantages``, ``policy``/``policies``,
``model``/``modules``, ``data``, ``methods``, ``rewards``, ``selector``, ``tasks`` ...), or by its base class's name
(``PolicyLoss``). ``--format markdown`` prints the same as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil
import sys
import typing
from collections.abc import Iterable

PACKAGES = ("common", "text_reasoning", "retrieval", "speculative", "diffusion")
ROOTS = {  # what `advlab fit` itself takes: the recipe keys and the classes they must subclass
    "model": "lightning.pytorch.LightningModule",
    "data": "lightning.pytorch.LightningDataModule",
    "trainer.callbacks": "lightning.pytorch.callbacks.Callback",
}
SKIP_MODULES = ("__main__",)


@dataclasses.dataclass
class Kind:
    """One slot type: ``base`` and the parameter names (``owner.param``) that take it."""

    base: type
    params: set[str] = dataclasses.field(default_factory=set)
    members: list[type] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted({p.rpartition(".")[2] for p in self.params})


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def project_modules(packages: Iterable[str] = PACKAGES) -> tuple[list, dict[str, str]]:
    """Import every module of ``packages``; returns (modules, {module name: import error}) - a module whose optional
    dependency is missing is reported, not fatal."""
    modules, failed = [], {}
    for pkg in packages:
        try:
            root = importlib.import_module(pkg)
        except Exception as exc:  # noqa: BLE001
            failed[pkg] = f"{type(exc).__name__}: {exc}"
            continue
        modules.append(root)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{pkg}.", onerror=lambda name: failed.setdefault(name, "import error")):
            if info.name.rpartition(".")[2] in SKIP_MODULES:
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception as exc:  # noqa: BLE001 - e.g. vLLM not installed: listed as not importable
                failed[info.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return modules, failed


def project_classes(modules) -> list[type]:
    """Public classes defined (not just imported) in ``modules``."""
    found = {}
    for module in modules:
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_"):
                found[_path(obj)] = obj
    return list(found.values())


def _class_types(annotation) -> list[type]:
    """The classes inside a type hint: ``X | None``, ``Sequence[X]``, ``list[X]``, ``dict[str, X]``,
    ``float | KLController`` ... (builtins, typing constructs and Literals are not components)."""
    if annotation is inspect.Parameter.empty or annotation is None:
        return []
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return []
    if origin is not None:
        out = []
        for arg in typing.get_args(annotation):
            out += _class_types(arg)
        if inspect.isclass(origin) and origin.__module__ not in ("builtins", "typing", "collections.abc"):
            out.append(origin)
        return out
    if isinstance(annotation, type) and annotation.__module__ not in ("builtins", "typing", "collections.abc", "pathlib", "os", "types"):
        return [annotation]
    return []


def _parameters(cls: type) -> list:
    try:
        from jsonargparse._parameter_resolvers import get_signature_parameters

        return list(get_signature_parameters(cls))
    except Exception:  # noqa: BLE001 - a class jsonargparse cannot resolve contributes no slots
        return []


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def _implements(cls: type, protocol: type) -> bool:
    members = [n for n in vars(protocol) if not n.startswith("_") and callable(getattr(protocol, n, None))]
    return bool(members) and all(callable(getattr(cls, n, None)) for n in members)


def is_base(cls: type, classes: Iterable[type] = ()) -> bool:
    """A base class to subclass, not a component to name: abstract, a Protocol, documented as "Base ...", or
    subclassed in the project (one of ``classes``) while a method of its own raises NotImplementedError
    (``PolicyLoss``, ``PolicySource``, ``Environment``)."""
    if inspect.isabstract(cls) or _is_protocol(cls):
        return True
    if cls.__doc__ and (inspect.getdoc(cls) or "").startswith(("Base ", "Base:")):
        return True
    if not any(c is not cls and issubclass(c, cls) for c in classes):
        return False
    try:
        return "raise NotImplementedError" in inspect.getsource(cls)
    except (OSError, TypeError):
        return False


def discover(packages: Iterable[str] = PACKAGES) -> tuple[dict[str, Kind], dict[str, str]]:
    """{base class path: Kind} over every slot reachable from the roots, and the modules that did not import."""
    modules, failed = project_modules(packages)
    classes = project_classes(modules)
    kinds: dict[str, Kind] = {}
    todo: list[tuple[type, str]] = [(_import(base), key) for key, base in ROOTS.items()]
    seen_owner: set[str] = set()
    while todo:
        base, param = todo.pop()
        key = _path(base)
        kind = kinds.setdefault(key, Kind(base))
        kind.params.add(param)
        if kind.members:
            continue
        if _is_protocol(base):
            members = [c for c in classes if _implements(c, base) and not is_base(c, classes)]
        else:
            members = [c for c in classes if issubclass(c, base) and not is_base(c, classes)]
        kind.members = sorted(members, key=_path)
        for owner in kind.members:
            if _path(owner) in seen_owner:
                continue
            seen_owner.add(_path(owner))
            for p in _parameters(owner):
                for t in _class_types(p.annotation):  # project types only: a bare nn.Module or Tensor is no slot
                    if t.__module__.split(".")[0] in PACKAGES:
                        todo.append((t, f"{owner.__qualname__}.{p.name}"))
    return {k: v for k, v in kinds.items() if v.members}, failed


def _words(kind: Kind) -> set[str]:
    """The names a user may type for a kind: its parameter names, singular and plural, and its base class name."""
    out = {kind.base.__name__.lower()}
    for p in kind.params:
        name = p.rpartition(".")[2].lower()
        out |= {name, name + "s", name + "es", name.rstrip("s"), name.removesuffix("es")}
        if name.endswith("y"):
            out.add(name[:-1] + "ies")
        if name.endswith("ies"):
            out.add(name[:-3] + "y")
    if "model" in out:
        out |= {"modules", "module"}
    return out


def summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return first if len(first) <= 110 else first[:107] + "..."


def _title(key: str, kind: Kind) -> str:
    return f"{', '.join(kind.names)}  ({key})"


def render(kinds: dict[str, Kind], wanted: list[str], fmt: str = "text") -> str:
    order = sorted(kinds, key=lambda k: (min(kinds[k].names) if kinds[k].names else k))
    chosen = [k for k in order if not wanted or any(w.lower() in _words(kinds[k]) for w in wanted)]
    lines = []
    if fmt == "markdown":
        lines += ["| kind (recipe keys) | class_path | what it is |", "|---|---|---|"]
        for k in chosen:
            for cls in kinds[k].members:
                lines.append(f"| {', '.join(kinds[k].names)} | `{_path(cls)}` | {summary(cls).replace('|', '/')} |")
        return "\n".join(lines)
    for k in chosen:
        kind = kinds[k]
        lines.append(_title(k, kind))
        width = max(len(_path(c)) for c in kind.members)
        for cls in kind.members:
            lines.append(f"  {_path(cls):<{width}}  {summary(cls)}")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="advlab list", description="Every component a recipe can name by class_path (losses, advantages, "
        "rewards, methods, policies, data, tasks ...), found from the constructors' type hints.")
    parser.add_argument("kinds", nargs="*", help="kinds to show (e.g. losses rewards); default: all")
    parser.add_argument("--format", choices=("text", "markdown"), default="text")
    args = parser.parse_args(argv)
    kinds, failed = discover()
    known = set().union(*(_words(k) for k in kinds.values()))
    unknown = [w for w in args.kinds if w.lower() not in known]
    if unknown:
        from common.cli_errors import nearest

        names = sorted({n for k in kinds.values() for n in k.names})
        near = nearest(unknown[0].lower(), names) or nearest(unknown[0].lower(), sorted(known))
        sys.exit(f"advlab list: no kind {unknown[0]!r}" + (f"; did you mean {near}?" if near else "")
                 + f"\n  kinds: {', '.join(names)}")
    print(render(kinds, args.kinds, args.format))
    if failed:
        print("\nnot importable here (their components are not listed): "
              + "; ".join(f"{m} ({e[:80]})" for m, e in sorted(failed.items())), file=sys.stderr)


if __name__ == "__main__":
    main()
