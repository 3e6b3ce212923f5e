"""The notebook as context: the last error, earlier cells and their outputs, files.

``lasterror.ErrorWatch`` (a ``post_run_cell`` callback) remembers the last cell that
raised; ``NotebookContext`` turns ``--fix``, ``--cells`` and ``--file`` into labelled blocks
placed before the cell's question. Errors of ``%%qwen`` and ``%qwen`` cells themselves (a
refusal, a DashScope error, an interrupted answer) are not what ``%qwen fix`` fixes: it looks
at the last error of any other cell.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from IPython.core.error import UsageError

from .i18n import N_, _
from .lasterror import CellError, ErrorWatch, cell_label, cell_source, strip_ansi

NO_ERROR = N_("No error to fix: no cell has raised one since the kernel started.")
ERROR_FIXED = N_("No error to fix: the cell that raised the last one (In [{number}]) has run without error since.")
# Sent in the current language, so that the model explains the error in the user's language
# (a %qwen fix has no question of the user's whose language it would follow). The blocks
# around the question (the cell, the traceback) are the model's to read and stay in English.
FIX_SYSTEM = N_(
    "You help fix errors in Jupyter notebook cells. Say briefly what caused the error, then give "
    "the corrected cell as one complete Python code block that can replace the failing cell."
)
TRACEBACK_TOKENS = 1500
CELL_OUTPUT_TOKENS = 500
_LIBRARY_DIRS = ("site-packages", "dist-packages")
_SHELL_PACKAGES = ("IPython", "ipykernel")  # errors remembered per prompt number, for --cells


def traceback_text(shell: Any, error: BaseException, limit: int = TRACEBACK_TOKENS) -> tuple[str, int]:
    """The error's traceback, oldest exception first, innermost frames last, without colours,
    frames inside installed packages folded; the outermost frames are left out to stay
    within ``limit`` tokens. Returns the text and how many frames were left out."""
    from .tokens import count_text
    from .values import cut

    pieces: list[tuple[str, bool]] = []  # (text, may be left out)
    for exception, link in _chain(error):
        if link:
            pieces.append((link, False))
        for text in _frames(shell, exception):
            pieces.append((text, True))
        pieces.append((cut(_exception_only(shell, exception), limit // 3).text, False))
    counts = [count_text(text) for text, _droppable in pieces]
    total, dropped = sum(counts), 0
    for at, (_text, droppable) in enumerate(pieces):  # outermost first
        if total <= limit:
            break
        if droppable:
            total -= counts[at]
            pieces[at] = ("", False)
            dropped += 1
    lines = [text for text, _droppable in pieces if text]
    if dropped:
        lines.insert(0, f"[… {dropped} outer frame(s) left out …]")
    text = "\n".join(lines)
    if count_text(text) > limit:  # one enormous message: keep its end, where the error is
        text = cut(text, limit).text
    return text, dropped


def _chain(error: BaseException) -> list[tuple[BaseException, str | None]]:
    """The exceptions as Python prints them, oldest first, each with the line printed before it."""
    newest_first: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(newest_first) < 10:
        seen.add(id(current))
        if current.__cause__ is not None:
            link, cause = "The above exception was the direct cause of the following exception:", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, cause = "During handling of the above exception, another exception occurred:", current.__context__
        else:
            link, cause = None, None
        newest_first.append((current, link))
        current = cause
    oldest_first = newest_first[::-1]
    oldest_first[0] = (oldest_first[0][0], None)  # nothing is printed before the first
    return oldest_first


def _frames(shell: Any, error: BaseException) -> Iterator[str]:
    """One text per frame; a run of frames inside installed packages is one line, except the
    innermost frame of the traceback, which is always shown."""
    frames = traceback.extract_tb(error.__traceback__)
    # The shell's own frame that ran the cell comes first: IPython leaves it out too.
    while len(frames) > 1 and _library(frames[0].filename) in _SHELL_PACKAGES:
        frames = frames[1:]
    folded: list[str] = []
    previous, repeated = "", 0
    for position, frame in enumerate(frames):
        library = _library(frame.filename)
        innermost = position == len(frames) - 1
        if library and not innermost:
            folded.append(library)
            continue
        if folded:
            if repeated:
                yield f"[Previous frame repeated {repeated} more time(s)]"
            yield _folded(folded)
            folded, previous, repeated = [], "", 0
        label = cell_label(shell, frame.filename)
        where = f"Cell {label}" if label else f"File {frame.filename}"
        line = (frame.line or "").strip()
        text = f"{where}, line {frame.lineno}, in {frame.name}" + (f"\n    {line}" if line else "")
        if text == previous:  # deep recursion: said once, as Python does
            repeated += 1
            continue
        if repeated:
            yield f"[Previous frame repeated {repeated} more time(s)]"
            repeated = 0
        previous = text
        yield text
    if repeated:
        yield f"[Previous frame repeated {repeated} more time(s)]"


def _library(filename: str) -> str | None:
    """The package a frame's file belongs to, when it is an installed one."""
    parts = Path(filename).parts
    for directory in _LIBRARY_DIRS:
        if directory in parts:
            at = parts.index(directory)
            return parts[at + 1].removesuffix(".py") if at + 1 < len(parts) else directory
    return None


def _folded(packages: list[str]) -> str:
    names = ", ".join(dict.fromkeys(packages))
    return f"[… {len(packages)} frame(s) inside installed packages ({names}) …]"


def _exception_only(shell: Any, error: BaseException) -> str:
    text = strip_ansi("".join(traceback.format_exception_only(type(error), error))).rstrip()
    # A SyntaxError names the cell's file: as IPython does, name the cell instead.
    filename = getattr(error, "filename", None) if isinstance(error, SyntaxError) else None
    if filename:
        label = cell_label(shell, filename)
        if label:
            text = text.replace(f'File "{filename}"', f"Cell {label}")
    return text


# ---- blocks placed before the question

@dataclass
class Attached:
    """What the notebook adds to a cell: blocks before its question, a system prompt, notes."""

    blocks: list[str] = field(default_factory=list)
    system: str | None = None
    notes: list[str] = field(default_factory=list)

    def around(self, question: str) -> str:
        return "\n\n".join([*self.blocks, question] if question else self.blocks)


def fenced(text: str, language: str = "") -> str:
    """A Markdown code block that the text cannot close early."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    body = text[:-1] if text.endswith("\n") else text  # a file's last newline is not a blank line
    return f"{fence}{language}\n{body}\n{fence}"


class NotebookContext:
    """The shell's side of the context: its history, outputs and last error."""

    def __init__(self, shell: Any, watch: ErrorWatch, current: int | None) -> None:
        self.shell = shell
        self.watch = watch
        self.current = current  # the running cell's prompt number

    def nothing_to_fix(self) -> str | None:
        """The line to show instead of asking, when there is no error to fix."""
        error = self.watch.last_error(self.shell)
        if error is None:
            return _(NO_ERROR)
        if self.watch.last is error and self.watch.fixed_by is not None:
            return _(ERROR_FIXED).format(number=error.number)
        return None

    def attach(self, options: Any, *, max_input: int | None, model_name: str, value_tokens: int) -> Attached:
        from .files import file_block

        attached = Attached()
        for path in options.files:
            block, note = file_block(path, max_input=max_input, model_name=model_name, value_tokens=value_tokens)
            attached.blocks.append(block)
            if note:
                attached.notes.append(note)
        if options.cells is not None:
            attached.blocks.append(self.cells_block(options.cells))
        if options.fix:
            error = self.watch.last_error(self.shell)
            if error is None:  # checked before: the magic says so without asking
                raise UsageError(_(NO_ERROR))
            block, dropped = self.fix_block(error, value_tokens)
            attached.blocks.append(block)
            attached.system = _(FIX_SYSTEM)
            if dropped:
                attached.notes.append(_("The traceback's {count} outermost frame(s) were left out to keep it short.").format(
                    count=dropped))
        return attached

    def fix_block(self, error: CellError, value_tokens: int) -> tuple[str, int]:
        from .values import cut

        # What the model reads stays English (a question costs and answers the same in both languages).
        where = f"Cell In [{error.number}]" if error.number is not None else "A cell"
        trace, dropped = traceback_text(self.shell, error.error)
        parts = [f"{where} raised an error."]
        if error.source:
            parts.append(f"The cell:\n\n{fenced(cut(error.source, value_tokens).text, 'python')}")
        parts.append(f"The error: {error.line}")
        parts.append("Its traceback (innermost frames last; frames inside installed packages folded):\n\n"
                     + fenced(trace, "text"))
        return "\n\n".join(parts), dropped

    def cells_block(self, spec: int | tuple[int, int]) -> str:
        numbers = self._cell_numbers(spec)
        if not numbers:
            raise UsageError(_("--cells: there is no earlier code cell to send (%%qwen and %qwen cells are not counted)."))
        from .values import render

        outputs = getattr(getattr(self.shell, "history_manager", None), "output_hist", {}) or {}
        parts = ["Earlier cells of this notebook:"]
        for number in numbers:
            parts.append(f"In [{number}]:\n\n{fenced(cell_source(self.shell, number), 'python')}")
            if number in outputs:
                text = render(outputs[number], CELL_OUTPUT_TOKENS).text
                parts.append(f"Out [{number}]:\n\n{fenced(text, 'text')}")
            if number in self.watch.by_number:
                parts.append(f"In [{number}] raised {self.watch.by_number[number]}")
        return "\n\n".join(parts)

    def _cell_numbers(self, spec: int | tuple[int, int]) -> list[int]:
        history = getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", None) or []
        before = self.current if self.current is not None else len(history)
        candidates = range(1, min(before, len(history)))
        if isinstance(spec, tuple):
            chosen = [n for n in candidates if spec[0] <= n <= spec[1] and _is_code(str(history[n]))]
            return chosen
        chosen = [n for n in reversed(candidates) if _is_code(str(history[n]))][:spec]
        return sorted(chosen)


def _is_code(source: str) -> bool:
    """A cell worth sending: not empty, not a %%qwen question or a %qwen command (the chat has those)."""
    stripped = source.strip()
    return bool(stripped) and not stripped.startswith(("%%qwen", "%qwen"))
