"""A notebook value as prompt text that fits: tables, arrays, long strings and collections
are summarised within a token limit, images are named, rich objects give their text.

The text is what the model reads, in English whatever the language; what was left out of it
(``Rendered.summary``) is said to the user, in the current language.

pandas, polars and numpy are never imported here: a value of theirs is only recognised by
its type's module, and read through its own methods.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .i18n import N_, _
from .tokens import count_text

DEFAULT_VALUE_TOKENS = 2000
# A table this long is sent whole when it fits; longer ones send their first and last rows.
WHOLE_TABLE_ROWS = 60
_CELL_CHARS = 60  # a table cell's text is cut after this many characters
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
# An object repr that says nothing but the type: <Figure size 640x480 with 1 Axes>, <Foo at 0x...>
_BARE_REPR = re.compile(r"\A<[^\n]*>\Z")


@dataclass(frozen=True)
class Rendered:
    """A value's prompt text, and what was left out of it (None when nothing was)."""

    text: str
    summary: str | None = None


def render(value: Any, limit: int) -> Rendered:
    """The value as text within about ``limit`` tokens."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return cut(str(value), limit)
    module = type(value).__module__.split(".")[0]
    name = type(value).__name__
    if module == "pandas" and name == "DataFrame":
        return _pandas_frame(value, limit)
    if module == "polars" and name == "DataFrame":
        return _polars_frame(value, limit)
    if module in ("pandas", "polars") and name == "Series":
        return _series(value, limit)
    if module == "numpy" and name == "ndarray":
        return _array(value, limit)
    image = image_type(value)
    if image is not None:
        return Rendered(image_name(value, image))
    if isinstance(value, (dict, list, tuple)):
        return _collection(value, limit)
    return cut(rich_text(value), limit)


def render_full(value: Any) -> str:
    """``{name!full}``: the whole value, in the most compact complete form for its type."""
    module = type(value).__module__.split(".")[0]
    name = type(value).__name__
    if module == "pandas" and name in ("DataFrame", "Series"):
        return value.to_csv().rstrip("\n")
    if module == "polars" and name == "DataFrame":
        return value.write_csv().rstrip("\n")
    if module == "polars" and name == "Series":
        return "\n".join(str(item) for item in value.to_list())
    if module == "numpy" and name == "ndarray":
        import sys

        import numpy

        return numpy.array2string(value, threshold=sys.maxsize, max_line_width=200)
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):  # keys JSON cannot hold, or a cycle
            return str(value)
    return str(value)


# ---- text of rich objects and images

def rich_text(value: Any) -> str:
    """The value's text: its own ``__str__`` if its type has one (as an f-string gives it), else
    what the notebook shows: its Markdown, then IPython's pretty text, then the plain repr."""
    if isinstance(value, str) or type(value).__str__ is not object.__str__:
        return str(value)
    markdown = _call_repr(value, "_repr_markdown_")
    if isinstance(markdown, str) and markdown:
        return markdown
    if _has_pretty_printer(value):
        formatter = _formatter("text/plain")
        try:
            return str(formatter(value)) if formatter is not None else str(value)
        except Exception:
            pass
    return str(value)


def image_type(value: Any) -> str | None:
    """The image type the notebook shows the value as (a figure, a PIL image), if any."""
    if type(value).__module__.startswith("matplotlib.figure"):
        return "image/png"  # a figure is shown as a picture, whichever backend draws it
    for mime in _IMAGE_TYPES:
        formatter = _formatter(mime)
        if formatter is not None:
            try:
                formatter.lookup(value)
                return mime
            except KeyError:
                pass
            method = getattr(formatter, "print_method", None)
            if method and callable(getattr(type(value), method, None)):
                return mime
    return None


def image_name(value: Any, mime: str) -> str:
    """An image output named in words (its pixels are not sent)."""
    described = _figure_words(value)
    if described is None:
        text = _plain_text(value)
        described = f"{type(value).__name__}" + (f": {text}" if text and not _BARE_REPR.match(text) else "")
    return f"[an image ({mime}), not sent: {described}]"


def _figure_words(value: Any) -> str | None:
    """A matplotlib figure by its axes' titles and labels."""
    if type(value).__module__.split(".")[0] != "matplotlib" or not hasattr(value, "axes"):
        return None
    parts = []
    try:
        width, height = (int(size) for size in value.get_size_inches() * value.dpi)
        for axes in value.axes:
            words = [f"{what} {text!r}" for what, text in (
                ("title", axes.get_title()), ("x axis", axes.get_xlabel()), ("y axis", axes.get_ylabel())) if text]
            parts.append(", ".join(words) if words else "untitled")
    except Exception:
        return None
    axes_count = f"{len(parts)} axes" if len(parts) != 1 else "1 axes"
    return f"a matplotlib figure, {width}×{height} px, {axes_count}" + (f" ({'; '.join(parts)})" if parts else "")


def _plain_text(value: Any) -> str:
    formatter = _formatter("text/plain")
    try:
        return str(formatter(value)) if formatter is not None else repr(value)
    except Exception:
        return ""


def _formatter(mime: str) -> Any:
    from IPython.core.getipython import get_ipython

    shell = get_ipython()
    if shell is None:
        return None
    return shell.display_formatter.formatters.get(mime)


def _has_pretty_printer(value: Any) -> bool:
    formatter = _formatter("text/plain")
    if formatter is None:
        return False
    if callable(getattr(type(value), "_repr_pretty_", None)):
        return True
    try:
        formatter.lookup(value)
        return True
    except KeyError:
        return False


def _call_repr(value: Any, method: str) -> Any:
    function = getattr(type(value), method, None)
    if not callable(function):
        return None
    try:
        result = function(value)
    except Exception:
        return None
    return result[0] if isinstance(result, tuple) else result


# ---- text

def cut(text: str, limit: int) -> Rendered:
    """Text within about ``limit`` tokens: its head and tail, saying how much was cut."""
    if len(text) <= limit // 4 or (len(text) <= limit * 20 and count_text(text) <= limit):
        return Rendered(text)
    keep = max(limit // 2 - 20, 8)
    head, tail = _head_within(text, keep), _tail_within(text, keep)
    left_out = len(text) - len(head) - len(tail)
    marker = f"[… {left_out:,} characters cut …]"
    return Rendered(f"{head}\n{marker}\n{tail}",
                    _("{count:,} characters, of which the first and last {sent:,} were sent").format(
                        count=len(text), sent=len(head) + len(tail)))


def _head_within(text: str, tokens: int) -> str:
    size = tokens * 3
    while size > 1:
        head = text[:size]
        if count_text(head) <= tokens:
            return head
        size = size * 2 // 3
    return text[:1]


def _tail_within(text: str, tokens: int) -> str:
    size = tokens * 3
    while size > 1:
        tail = text[-size:]
        if count_text(tail) <= tokens:
            return tail
        size = size * 2 // 3
    return text[-1:]


# ---- tables

@dataclass(frozen=True)
class Table:
    """What a data frame's summary needs, whichever library holds it."""

    kind: str  # marked with N_: the model reads it as it is, the user in the current language
    rows: int
    columns: Sequence[str]
    dtypes: Sequence[str]
    head: Callable[[int], list[list[Any]]]  # the first n rows, index first when there is one
    tail: Callable[[int], list[list[Any]]]
    index_name: str | None  # None: no index column


def _pandas_frame(frame: Any, limit: int) -> Rendered:
    def rows(part: Any) -> list[list[Any]]:
        return [[index, *values] for index, *values in part.itertuples(index=True, name=None)]

    table = Table(N_("pandas DataFrame"), len(frame), [str(c) for c in frame.columns], [str(d) for d in frame.dtypes],
                  lambda n: rows(frame.head(n)), lambda n: rows(frame.tail(n)), str(frame.index.name or ""))
    return summarise_table(table, limit)


def _polars_frame(frame: Any, limit: int) -> Rendered:
    table = Table(N_("polars DataFrame"), frame.height, list(frame.columns), [str(d) for d in frame.dtypes],
                  lambda n: [list(r) for r in frame.head(n).rows()], lambda n: [list(r) for r in frame.tail(n).rows()],
                  None)
    return summarise_table(table, limit)


def summarise_table(table: Table, limit: int) -> Rendered:
    """Shape, columns and dtypes, then all rows if they fit, else the first and last rows."""
    shape = f"{table.rows:,} rows × {len(table.columns):,} columns"
    for edge in (None, 5, 3, 2, 1, 0):
        if edge is None and table.rows > WHOLE_TABLE_ROWS:
            continue
        for shown_columns in (len(table.columns), 30, 12, 6):
            if shown_columns > len(table.columns) or (shown_columns < len(table.columns) and edge is None):
                continue
            text = _table_text(table, shape, edge, shown_columns)
            if count_text(text) <= limit:
                if edge is None and shown_columns == len(table.columns):
                    return Rendered(text)
                return Rendered(text, _table_summary(table, shape, edge, shown_columns))
    fallback = cut(_table_text(table, shape, 0, len(table.columns)), limit)
    return Rendered(fallback.text, _("a {kind} of {shape}: only its column list, cut").format(
        kind=_(table.kind), shape=_shape_shown(table)))


def _shape_shown(table: Table) -> str:
    return _("{rows:,} rows × {columns:,} columns").format(rows=table.rows, columns=len(table.columns))


def _table_summary(table: Table, shape: str, edge: int | None, shown_columns: int) -> str:
    """What the user is told was sent of the table (``shape`` is the model's, in English)."""
    if edge is None:
        rows = _("all rows")
    elif edge:
        rows = _("the first and last {count} rows").format(count=edge)
    else:
        rows = _("no rows")
    if shown_columns == len(table.columns):
        return _("a {kind} of {shape}: {rows}").format(kind=_(table.kind), shape=_shape_shown(table), rows=rows)
    # Translators: {rows} is "all rows", "the first and last 5 rows" or "no rows".
    return _("a {kind} of {shape}: {rows}, {shown} of the columns").format(
        kind=_(table.kind), shape=_shape_shown(table), rows=rows, shown=shown_columns)


def _table_text(table: Table, shape: str, edge: int | None, shown_columns: int) -> str:
    columns = list(table.columns)
    keep = _spread(len(columns), shown_columns)
    listed = ", ".join(f"{columns[i]} ({table.dtypes[i]})" for i in keep)
    if len(keep) < len(columns):
        listed += f", and {len(columns) - len(keep):,} more columns"
    lines = [f"{table.kind}: {shape}", f"Columns (dtype): {listed}"]
    if edge == 0 or table.rows == 0:
        return "\n".join(lines)
    offset = 0 if table.index_name is None else 1
    header = ([table.index_name or ""] if offset else []) + [columns[i] for i in keep]
    picked = [i + offset for i in keep]
    if offset:
        picked = [0, *picked]

    def row_line(row: list[Any]) -> str:
        return "| " + " | ".join(_cell(row[i]) for i in picked) + " |"

    body: list[str] = []
    if edge is None or table.rows <= 2 * edge:
        body = [row_line(row) for row in table.head(table.rows if edge is None else 2 * edge)]
        title = "All rows:"
    else:
        body = [row_line(row) for row in table.head(edge)]
        body.append("| " + " | ".join("…" for _column in picked) + " |")
        body += [row_line(row) for row in table.tail(edge)]
        title = f"First {edge} and last {edge} rows ({table.rows - 2 * edge:,} rows not shown):"
    lines += ["", title, "", "| " + " | ".join(_cell(h) for h in header) + " |",
              "|" + "---|" * len(header), *body]
    return "\n".join(lines)


def _spread(total: int, shown: int) -> list[int]:
    """Which of ``total`` columns to show: the first ones and the last few."""
    if shown >= total:
        return list(range(total))
    tail = max(shown // 4, 1)
    return list(range(shown - tail)) + list(range(total - tail, total))


def _cell(value: Any) -> str:
    try:
        text = str(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"


# ---- series, arrays, collections

def _series(series: Any, limit: int) -> Rendered:
    length = len(series)
    kind = f"{type(series).__module__.split('.')[0]} Series"
    name = getattr(series, "name", None)
    title = f"{kind} {name!r}" if name not in (None, "") else kind
    pandas = kind.startswith("pandas")

    def items(part: Any) -> list[str]:
        if pandas:
            return [f"{_cell(index)}: {_cell(value)}" for index, value in part.items()]
        return [_cell(value) for value in part.to_list()]

    for edge in (None, 10, 5, 3, 1):
        if edge is None and length > WHOLE_TABLE_ROWS:
            continue
        lines = [f"{title}: {length:,} values, dtype {series.dtype}"]
        if edge is None or length <= 2 * edge:
            lines += items(series)
        else:
            lines += items(series.head(edge)) + [f"… ({length - 2 * edge:,} values not shown)"] + items(series.tail(edge))
        text = "\n".join(lines)
        if count_text(text) <= limit:
            return Rendered(text, None if edge is None or length <= 2 * edge
                            else _("a {kind} of {count:,} values: the first and last {edge}").format(
                                kind=kind, count=length, edge=edge))
    return cut(f"{title}: {length:,} values, dtype {series.dtype}", limit)


def _array(array: Any, limit: int) -> Rendered:
    if array.size <= 100:
        whole = cut(str(array), limit)
        if whole.summary is None:
            return whole
    import numpy

    title = f"numpy array: shape {array.shape}, dtype {array.dtype}"
    stats = ""
    if array.size and array.dtype.kind in "iuf":
        try:
            stats = f"\nmin {array.min()}, max {array.max()}, mean {array.mean():.6g}"
        except Exception:
            stats = ""
    for edge in (3, 2, 1):
        values = numpy.array2string(array, threshold=2 * edge, edgeitems=edge, max_line_width=120)
        text = f"{title}{stats}\n{values}"
        if count_text(text) <= limit:
            return Rendered(text, _("a numpy array of shape {shape}: {edge} values from each end of each axis").format(
                shape=array.shape, edge=edge))
    return cut(f"{title}{stats}", limit)


def _collection(value: Any, limit: int) -> Rendered:
    whole = str(value)
    if len(whole) <= limit // 4 or (len(whole) <= limit * 20 and count_text(whole) <= limit):
        return Rendered(whole)
    kind = type(value).__name__
    for items in (50, 20, 10, 5, 3, 1):
        try:
            text = json.dumps(_shrunk(value, items, 3), ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            break
        if count_text(text) <= limit:
            return Rendered(text, _("a {kind} of {count:,} items, as JSON with at most {items} items per level").format(
                kind=kind, count=len(value), items=items))
    shortened = cut(whole, limit)
    return Rendered(shortened.text, _("a {kind} of {count:,} items: {summary}").format(
        kind=kind, count=len(value), summary=shortened.summary))


def _shrunk(value: Any, items: int, depth: int) -> Any:
    """The value with at most ``items`` entries per list or dict, strings cut, ``depth`` levels deep."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + f"… ({len(value):,} characters)"
    if depth == 0 and isinstance(value, (dict, list, tuple, set)):
        return f"… ({type(value).__name__} of {len(value):,})"
    if isinstance(value, dict):
        shrunk = {str(key): _shrunk(item, items, depth - 1) for key, item in list(value.items())[:items]}
        if len(value) > items:
            shrunk["…"] = f"{len(value) - items:,} more keys"
        return shrunk
    if isinstance(value, (list, tuple, set)):
        listed = list(value)
        shrunk_list = [_shrunk(item, items, depth - 1) for item in listed[:items]]
        if len(listed) > items:
            shrunk_list.append(f"… {len(listed) - items:,} more items")
        return shrunk_list
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return _cell(value)
