"""Reward functions: the protocol, weighting of components, and what happens when one fails.

A reward function is any callable ``fn(completions: Sequence[str], samples: Sequence[Mapping]) -> Tensor (B,)``
where ``samples[i]`` is the metadata of completion i's prompt (``"answer"``, ``"task"``, ...). Model output is
untrusted: an unparseable answer is a wrong answer (0), not an exception. A reward function that raises,
returns None/NaN or hangs is a bug or a pathological input, handled by :class:`RewardPolicy`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor



class RewardFunction:
    """Base class of reward functions: ``fn(completions, samples) -> Tensor (B,)`` float32.

    Args of subclasses are typed so YAML can name them by ``class_path``. ``name`` labels the logged component.
    """

    name: str | None = None

    def __call__(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> Tensor:
        raise NotImplementedError


RewardFn = RewardFunction | Callable[[Sequence[str], Sequence[Mapping[str, Any]]], Tensor]


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _as_rewards(value: Any, n: int, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"reward function {name} returned None")
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"reward function {name} returned {t.numel()} values for {n} completions")
    return t


class RewardFailure(RuntimeError):
    pass


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float | None) -> Any:
    """``fn(*args)``, raising ``TimeoutError`` after ``timeout_s`` seconds (None = wait forever).

    The call runs in a daemon thread; a call that times out is abandoned, not killed (Python threads cannot
    be), so reward code that may truly hang must bound itself too (math-verify does, with its own timeout).
    """
    if timeout_s is None:
        return fn(*args)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{reward_name(fn)} did not return within {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def score_components(
    fns: Sequence[RewardFn],
    completions: Sequence[str],
    samples: Sequence[Mapping[str, Any]],
    on_failure: Literal["raise", "zero"] = "raise",
    timeout_s: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Evaluate every reward function on the batch: components (B, K) and failed (B,) bool.

    A function is called once on the whole batch. If it raises, times out, returns None or a non-finite
    value, it is called again one completion at a time to find the failing samples: ``on_failure="raise"``
    raises naming the prompt and completion; ``"zero"`` gives those samples 0 and marks them in ``failed``.
    """
    B = len(completions)
    cols, failed = [], torch.zeros(B, dtype=torch.bool)
    for fn in fns:
        name = reward_name(fn)
        try:
            col = _as_rewards(call_with_timeout(fn, completions, samples, timeout_s=timeout_s), B, name)
            if bool(torch.isfinite(col).all()):
                cols.append(col)
                continue
        except Exception:  # noqa: BLE001 - located per sample below
            pass
        col = torch.zeros(B)
        for i in range(B):  # ok: only on failure, to name the failing sample
            try:
                v = _as_rewards(call_with_timeout(fn, [completions[i]], [samples[i]], timeout_s=timeout_s), 1, name)[0]
                if not torch.isfinite(v):
                    raise ValueError(f"non-finite reward {float(v)}")
                col[i] = v
            except Exception as err:  # noqa: BLE001
                if on_failure == "raise":
                    raise RewardFailure(
                        f"reward function {name} failed on sample {i} (prompt {str(samples[i].get('prompt', ''))[:200]!r}, "
                        f"completion {completions[i][:200]!r}): {err!r}. Set the module's reward_failure='zero' to "
                        "score such samples 0 instead."
                    ) from err
                failed[i] = True
        cols.append(col)
    return (torch.stack(cols, 1) if cols else torch.zeros(B, 0)), failed
