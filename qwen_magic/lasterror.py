"""The last cell that raised, watched after every cell (``post_run_cell``) for ``%qwen fix``.

Small on purpose: ``%load_ext`` registers the watch, and the rest of the notebook-as-context
code (``context``) is imported only by a cell that asks for it.
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_KEPT_ERRORS = 100


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


# ---- the last error

@dataclass(frozen=True)
class CellError:
    """A cell that raised: its prompt number, source and exception."""

    number: int | None
    source: str
    error: BaseException
    cell_id: str | None = None

    @property
    def line(self) -> str:
        """``Type: message``, on one line."""
        return one_line(self.error)


def one_line(error: BaseException) -> str:
    try:
        lines = traceback.format_exception_only(type(error), error)
        text = strip_ansi(lines[-1].strip()) if lines else type(error).__name__
    except Exception:
        text = type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def _own_error(source: str, error: BaseException) -> bool:
    """An error of a %%qwen or %qwen cell (a refusal, a DashScope error, an interrupt)."""
    if source.lstrip().startswith("%%qwen") or type(error).__module__.startswith("qwen_magic"):
        return True
    return type(error).__name__ == "UsageError" and re.search(r"^\s*%qwen\b", source, re.MULTILINE) is not None


class ErrorWatch:
    """``post_run_cell``: remembers the last cell that raised, and which cells raised what."""

    def __init__(self) -> None:
        self.last: CellError | None = None
        self.fixed_by: int | None = None  # the prompt number of a later, clean run of that cell
        self.by_number: dict[int, str] = {}

    def __call__(self, result: Any) -> None:
        try:
            self._see(result)
        except Exception:  # a callback must never break the user's cells
            pass

    def _see(self, result: Any) -> None:
        if result is None:
            return
        info = getattr(result, "info", None)
        source = getattr(info, "raw_cell", "") or ""
        cell_id = getattr(info, "cell_id", None)
        number = getattr(result, "execution_count", None)
        error = result.error_before_exec if result.error_before_exec is not None else result.error_in_exec
        if error is None:
            if self.last is not None and cell_id and cell_id == self.last.cell_id and self.fixed_by is None:
                self.fixed_by = number
            return
        if not isinstance(error, Exception) or _own_error(source, error):
            return
        self.last = CellError(number, source, error, cell_id)
        self.fixed_by = None
        if number is not None:
            self.by_number[number] = one_line(error)
            while len(self.by_number) > _KEPT_ERRORS:
                del self.by_number[next(iter(self.by_number))]

    def last_error(self, shell: Any) -> CellError | None:
        """The watched error; else the one IPython keeps (raised before the extension was loaded)."""
        if self.last is not None:
            return self.last
        error = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        if not isinstance(error, Exception):
            return None
        number = _cell_number(shell, error)
        source = cell_source(shell, number) if number is not None else ""
        if _own_error(source, error):
            return None
        return CellError(number, source, error)


def cell_label(shell: Any, filename: str) -> str | None:
    """``In [3]`` for code compiled from a cell, as IPython's tracebacks name it."""
    compiler = getattr(shell, "compile", None)
    try:
        named = compiler.format_code_name(filename) if compiler is not None else None
    except Exception:
        named = None
    if not named:
        return None
    number = named[1].removeprefix("In[").removesuffix("]")
    return f"In [{number}]"


def _cell_number(shell: Any, error: BaseException) -> int | None:
    """The prompt number of the cell the traceback starts in (for a SyntaxError, its file)."""
    filenames = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    if isinstance(error, SyntaxError) and error.filename:
        filenames.insert(0, error.filename)
    for filename in filenames:
        label = cell_label(shell, filename)
        if label is not None:
            try:
                return int(label[4:-1])
            except ValueError:
                return None
    return None


def cell_source(shell: Any, number: int | None) -> str:
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or []
    if number is None or not 0 < number < len(history):
        return ""
    return str(history[number])


# ---- the traceback as text
