"""``{name}`` in a cell, filled from the notebook's variables without evaluating code.

Only plain references are filled: a name, then attributes and constant indexes, as in
``{df.shape}``, ``{rows[0]}``, ``{config['model']}`` or ``{row[city]}`` (a bare key, as
``str.format`` reads it), with an optional ``!r``/``!s``
conversion and a format spec (``{price:.2f}``). A plain reference is filled by ``values``:
tables, arrays, long strings and collections summarised within a token limit, images named;
``!full`` sends the whole value. No expression is evaluated and nothing in
braces is called, but the objects' own methods do run, as they would in an f-string: each
attribute access (``__getattr__``, properties), each index (``__getitem__``), then the
value's ``__format__`` (with a spec), ``__str__``, ``__repr__`` (``!r``) or ``ascii``
(``!a``). Any of them that fails is one ``UsageError`` naming the placeholder. A name the
notebook does not have, anything else in braces (code, JSON) and doubled braces ``{{ }}``
are left exactly as written.
"""

from __future__ import annotations

import ast
import functools
import re
from typing import Any, Callable, Mapping

from IPython.core.error import UsageError

from .i18n import N_, _
from .values import DEFAULT_VALUE_TOKENS, render, render_full

# {{ ... }} first (kept whole), then a reference with an optional conversion and spec.
_PLACEHOLDER = re.compile(
    r"\{\{.*?\}\}"
    r"|\{(?P<expr>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[[^\[\]{}]*\])*)"
    # A format spec as Python defines it (no spaces): "{k: v}" in code is not a reference.
    r"(?:!(?P<conversion>[rsa]|full))?(?::(?P<spec>(?:[^{}\s]?[<>=^])?[+-]?#?0?\d*[,_]?(?:\.\d+)?[bcdeEfFgGnosxX%]?))?\}",
    re.DOTALL,
)


SUMMARISED = N_("{placeholder} was summarised ({summary}); {{{name}!full}} sends it whole.")


def fill(text: str, namespace: Mapping[str, Any], *, value_tokens: int = DEFAULT_VALUE_TOKENS,
         notes: list[str] | None = None) -> str:
    """The prompt with every reference to an existing variable replaced by its value.

    A plain reference gives at most about ``value_tokens`` tokens; ``notes`` collects a line
    for each value that was summarised to fit.
    """
    return _PLACEHOLDER.sub(lambda match: _replacement(match, namespace, value_tokens, notes), text)


def filler(text: str, namespace: Mapping[str, Any], varying: tuple[str, ...], *,
           value_tokens: int = DEFAULT_VALUE_TOKENS, notes: list[str] | None = None,
           ) -> Callable[[Mapping[str, Any]], str]:
    """``fill`` for many values of the names in ``varying`` (a job's ``item`` and ``index``).

    The references to other names are filled once, now (summarised as ``fill`` does), and
    those to ``varying`` names are parsed once; the returned function fills them from the
    mapping it is given. A row's own value is never summarised: it is the job's input, and
    cutting it would change every answer without a word.
    """
    parts: list[Any] = []
    last = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(text[last:match.start()])
        last = match.end()
        expr = match.group("expr")
        if expr is not None and _ROOT.match(expr).group(0) in varying:  # type: ignore[union-attr]
            written = match.group(0)
            name, steps = _steps(expr, written)
            parts.append((name, steps, written, match.group("conversion"), match.group("spec") or ""))
        else:
            parts.append(_replacement(match, namespace, value_tokens, notes))
    parts.append(text[last:])

    def fill_with(values: Mapping[str, Any]) -> str:
        return "".join(part if type(part) is str else _formatted(_walk(values[part[0]], part[1], part[2]), *part[2:])
                       for part in parts)

    return fill_with


_ROOT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _replacement(match: re.Match[str], namespace: Mapping[str, Any], value_tokens: int | None = None,
                 notes: list[str] | None = None) -> str:
    """What one reference becomes: its value, formatted; itself, if the name does not exist.

    With ``value_tokens``, a plain reference is summarised to fit (and said so in ``notes``).
    """
    expr = match.group("expr")
    if expr is None:  # {{ ... }}: written on purpose, kept as is
        return match.group(0)
    root = _ROOT.match(expr).group(0)  # type: ignore[union-attr]
    if root not in namespace:
        return match.group(0)
    written = match.group(0)
    value = _resolve(expr, namespace, written)
    conversion, spec = match.group("conversion"), match.group("spec") or ""
    if value_tokens is not None and conversion is None and not spec:
        try:
            rendered = render(value, value_tokens)
        except Exception as error:  # the value's own __str__/__repr__ failed
            raise UsageError(_("{placeholder}: cannot format the value ({error}).").format(
                placeholder=written, error=_described(error))) from None
        if rendered.summary is not None and notes is not None:
            notes.append(_(SUMMARISED).format(placeholder=written, summary=rendered.summary, name=expr))
        return rendered.text
    return _formatted(value, written, conversion, spec)


def _formatted(value: Any, written: str, conversion: str | None, spec: str) -> str:
    try:
        if conversion == "full":
            return render_full(value)
        if conversion == "r":
            value = repr(value)
        elif conversion == "a":
            value = ascii(value)
        text = format(value, spec) if spec else str(value)
        if not isinstance(text, str):
            raise TypeError(_("it gave a {type}, not a str").format(type=type(text).__name__))
        return text
    except Exception as error:  # the value's own __format__/__str__/__repr__ failed
        raise UsageError(_("{placeholder}: cannot format the value ({error}).").format(
            placeholder=written, error=_described(error))) from None


def _resolve(expr: str, namespace: Mapping[str, Any], written: str) -> Any:
    """Walk name.attr[index] by hand: attributes and constant keys only, no calls."""
    name, steps = _steps(expr, written)
    return _walk(namespace[name], steps, written)


def _walk(value: Any, steps: tuple[tuple[str, Any], ...], written: str) -> Any:
    for kind, key in steps:
        try:
            value = getattr(value, key) if kind == "attr" else value[key]
        except Exception as error:  # a property or __getitem__ of the user's object may raise anything
            raise UsageError(f"{written}: {_described(error)}") from None
    return value


@functools.lru_cache(maxsize=1024)
def _steps(expr: str, written: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The reference's name and its steps, outermost last (parsed once: a job fills it per row)."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise UsageError(_("{placeholder}: not a variable reference; write {{{{ }}}} to keep braces as they are.").format(
            placeholder=written)) from None
    steps: list[tuple[str, Any]] = []
    node = tree
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise UsageError(_("{placeholder}: private attributes ({name}) are not filled in.").format(
                    placeholder=written, name=node.attr))
            steps.append(("attr", node.attr))
            node = node.value
        elif isinstance(node, ast.Subscript):
            key = _constant(node.slice, written)
            steps.append(("item", key))
            node = node.value
        else:
            raise UsageError(_("{placeholder}: only names, attributes and constant indexes are filled in.").format(
                placeholder=written))
    return node.id, tuple(reversed(steps))


def _described(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, shortened; a message that cannot be shown is left out."""
    try:
        message = " ".join(str(error).split())
    except Exception:
        message = ""
    if len(message) > limit:
        message = message[:limit] + "…"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _constant(node: ast.AST, written: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
        return node.value
    if isinstance(node, ast.Name):  # {row[city]}: a key written bare, as str.format reads it
        return node.id
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) is int):
        return -node.operand.value
    if isinstance(node, ast.Slice):
        parts = [None if part is None else _constant(part, written) for part in (node.lower, node.upper, node.step)]
        return slice(*parts)
    raise UsageError(_("{placeholder}: an index must be a number, a quoted key or a slice.").format(placeholder=written))
