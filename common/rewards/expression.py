"""Safe evaluation of arithmetic written by a model (untrusted input).

DESIGN.md "Security": model output never reaches `eval`, `exec` or `sympy.sympify`. An
expression is accepted only if it is short, uses the characters of arithmetic, nests
at most `max_depth` levels, and its `ast` holds nothing but number literals, the binary
operators + - * /, and unary minus. Every violation gives `None`; nothing raises.

Deviations from Python semantics, on purpose: `×` and `÷` are read as `*` and `/`;
`**`, `//`, `%`, names, calls, attributes and scientific notation are rejected; the
result and every intermediate value must satisfy |v| <= max_abs.
"""

from __future__ import annotations

import ast
import operator
import re

_ARITHMETIC_CHARS = re.compile(r"[0-9+\-*/(). \t]*")
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Reject(Exception):
    """Internal: the expression is outside the whitelist or out of bounds."""


def _parse(expr: str, max_len: int, max_depth: int) -> ast.expr | None:
    """The `ast` body of a whitelisted-character, bounded expression, else None."""
    if not isinstance(expr, str) or len(expr) > max_len:
        return None
    expr = expr.replace("×", "*").replace("÷", "/").strip()
    if not expr or not _ARITHMETIC_CHARS.fullmatch(expr):
        return None
    depth = 0
    for char in expr:  # bracket depth before parsing: ast.parse itself recurses on nesting
        depth += (char == "(") - (char == ")")
        if depth > max_depth or depth < 0:
            return None
    try:
        return ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _evaluate(node: ast.expr, depth: int, max_depth: int, max_abs: float) -> float:
    if depth > max_depth:
        raise _Reject
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = float(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = -_evaluate(node.operand, depth + 1, max_depth, max_abs)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate(node.left, depth + 1, max_depth, max_abs)
        right = _evaluate(node.right, depth + 1, max_depth, max_abs)
        if isinstance(node.op, ast.Div) and right == 0.0:
            raise _Reject
        value = _BINARY_OPS[type(node.op)](left, right)
    else:
        raise _Reject
    if not abs(value) <= max_abs:  # also rejects nan
        raise _Reject
    return value


def safe_eval(expr: str, *, max_len: int = 200, max_depth: int = 20, max_abs: float = 1e12) -> float | None:
    """Value of an arithmetic expression (numbers, + - * /, unary minus, parentheses), or None.

    None when `expr` is longer than `max_len` characters, nests deeper than `max_depth`
    (brackets or syntax tree), uses anything outside the whitelist, divides by zero, or
    reaches |value| > max_abs at any step. Arithmetic is float64.

        safe_eval("(3 + 5) * 2")  -> 16.0
        safe_eval("9**9**9")      -> None  (power is not whitelisted)
    """
    node = _parse(expr, max_len, max_depth)
    if node is None:
        return None
    try:
        return _evaluate(node, 0, max_depth, max_abs)
    except _Reject:
        return None


def numbers_in(expr: str, *, max_len: int = 200, max_depth: int = 20) -> list[int]:
    """Integer literals of `expr` in source order (`"-3 + 12/4"` -> [3, 12, 4]).

    Signs are operators, so `-3` gives 3. Float literals are not listed; an expression
    that `safe_eval` would refuse to parse gives [].
    """
    node = _parse(expr, max_len, max_depth)
    if node is None:
        return []
    literals = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and type(n.value) is int]
    return [n.value for n in sorted(literals, key=lambda n: n.col_offset)]
