"""Safe Markdown rendering and the splitting of a growing answer into finished blocks.

Raw HTML is disabled: a model's ``<script>`` or ``<img onerror=...>`` becomes visible text,
never live markup, and markdown-it refuses ``javascript:`` links on its own.
"""

from __future__ import annotations

import functools
import html
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from markdown_it import MarkdownIt

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_FENCE_MARKS = ("```", "~~~")


@functools.lru_cache(maxsize=1)
def _markdown() -> "MarkdownIt":
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def render_markdown(text: str) -> str:
    """Markdown to HTML with raw HTML shown as text."""
    return _markdown().render(text)


def escape(text: str) -> str:
    return html.escape(text, quote=True)


# After a blank line, an indented line may still belong to the block above (a list item's
# next paragraph, indented code), and so may a list item if the block holds a list (a loose
# list): no split there.
_INDENTED = re.compile(r"[ \t]")
_LIST_ITEM = re.compile(r" {0,3}(?:[*+-]|\d{1,9}[.)])(?:[ \t]+|$)")
# The start of a line that cannot be judged yet: a bare marker, or digits that may end in one.
_UNDECIDED = re.compile(r"[*+-]|\d{1,9}[.)]?")

class BlockSplitter:
    """Feeds on a streamed answer and hands back each Markdown block once it is finished.

    A block ends at a blank line outside a fenced code block, once the next line shows it
    cannot carry the block on: it is not indented, and starts no list item after a list (so
    loose lists and code inside list items stay whole). Finished blocks never change again,
    so a view renders each of them once and only the open block is re-rendered. For the
    usual shapes of an answer the blocks render as the whole text does, and the durable output
    reuses them. Where they may not, it is rendered whole: a link reference definition
    anywhere in the text, or what ``renders_as_whole`` looks for (a fence left to a list
    item, a tab, a line of spaces alone).
    """

    def __init__(self) -> None:
        self._partial_line = ""
        self._block_lines: list[str] = []
        self._blank_lines = 0  # after the block, not yet known to end it
        self._holds_list = False  # a list item began in the block
        self._item_content = 0  # the column where the last list item's text begins
        self._fence: str | None = None  # the opening fence while inside a code block
        # False once the text holds what blocks may render differently from the whole text
        # (which must then be rendered whole): a fence left to a list item, a tab, a line of
        # spaces alone.
        self.renders_as_whole = True

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; return the blocks it finished (in order)."""
        finished: list[str] = []
        if "\n" in delta:
            *lines, self._partial_line = (self._partial_line + delta).split("\n")
            for line in lines:
                self._take_line(line, finished)
        else:
            self._partial_line += delta
        if self._blank_lines and self._partial_line:
            # The next line has begun: its first characters may already tell.
            if _UNDECIDED.fullmatch(self._partial_line) is None:
                self._end_or_continue(self._partial_line, finished)
        return finished

    @property
    def open_block(self) -> str:
        """The unfinished block's text, the partial last line included."""
        if not self._block_lines:
            return self._partial_line
        return "\n".join([*self._block_lines, *[""] * self._blank_lines, self._partial_line])

    def _end_or_continue(self, line: str, finished: list[str]) -> None:
        if _INDENTED.match(line) or (self._holds_list and _LIST_ITEM.match(line)):
            self._block_lines.extend([""] * self._blank_lines)
        else:
            finished.append("\n".join(self._block_lines))
            self._block_lines = []
            self._holds_list = False
        self._blank_lines = 0

    def _take_line(self, line: str, finished: list[str]) -> None:
        if "\t" in line or (line and not line.strip()):
            # Tabs (their width depends on the column) and lines of spaces alone (kept inside
            # indented code, and a block keeps its blank lines as empty ones) may render
            # differently in blocks.
            self.renders_as_whole = False
        if self._fence is None and not line.strip():
            if self._block_lines:
                self._blank_lines += 1
            return
        if self._blank_lines:
            self._end_or_continue(line, finished)
        fence = _FENCE.match(line)
        if self._fence is None:
            item = _LIST_ITEM.match(line)
            # A fence inside a list item ends with the item, not at a closing fence: only
            # fences outside lists are followed (blank lines in an item never split anyway).
            if fence and (not self._holds_list or fence.start(1) < self._item_content):
                self._fence = fence.group(1)
            elif fence or line.lstrip().startswith(_FENCE_MARKS):  # left to a list item, or indented
                self.renders_as_whole = False
            elif item:
                if line[item.end():].lstrip().startswith(_FENCE_MARKS):  # an item that opens with one
                    self.renders_as_whole = False
                self._holds_list = True
                self._item_content = item.end() + (1 if item.end() == len(line) else 0)
        elif fence and fence.group(1)[0] == self._fence[0] and len(fence.group(1)) >= len(self._fence):
            if not line.strip().strip(self._fence[0]):  # a closing fence has no info string
                self._fence = None
        self._block_lines.append(line)


# What ends the inline content emphasis or a code span may reach over: a blank line, a
# heading, a list item, a table row, a fence.
_INLINE_BREAK = re.compile(r" {0,3}(?:#{1,6}(?:[ \t]|$)|(?:[*+-]|\d{1,9}[.)])(?:[ \t]|$)|\|)")
# A last line that is only the start of a list marker (or of a number that may become one).
_BARE_MARKER = re.compile(r" {0,3}(?:[*+-]|\d{1,9}[.)]?|[*_-]{2,})[ \t]*")
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _is_punctuation(char: str) -> bool:
    import unicodedata

    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _flanking(before: str, after: str) -> tuple[bool, bool]:
    """CommonMark's left- and right-flanking, from the characters around a delimiter run."""
    before_space = not before or before.isspace()
    after_space = not after or after.isspace()
    left = not after_space and (not _is_punctuation(after) or before_space or _is_punctuation(before))
    right = not before_space and (not _is_punctuation(before) or after_space or _is_punctuation(after))
    return left, right


def close_open_markers(text: str) -> str:
    """An unfinished answer, with the emphasis and code span its last lines left open closed.

    Mid-stream, ``**bold`` or `` `code`` would show their raw markers until the closing one
    comes; here they are closed so that they render as the finished text will (``**bold**``).
    A marker with nothing after it yet is dropped, and so is a last line that is only the
    start of a list marker (``-``, ``1``): the next text shows them as they are meant.
    """
    lines = text.split("\n")
    fence: str | None = None
    start = 0  # the first line of the inline run the text ends in
    for number, line in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) \
                    and not line.strip().strip(fence[0]):
                fence = None
            start = number + 1
        elif opened:
            fence, start = opened.group(1), number + 1
        elif not line.strip() or _INLINE_BREAK.match(line):
            start = number + (0 if line.strip() else 1)
    if fence is not None:
        return text  # inside a code block: shown as it is
    if start < len(lines) and len(lines) - start >= 1 and _BARE_MARKER.fullmatch(lines[-1]) and lines[-1].strip():
        lines = lines[:-1]
        text = "\n".join(lines)
    head = "\n".join(lines[:start])
    run = "\n".join(lines[start:])
    closed = _close_inline(run)
    if closed is run:
        return text
    return f"{head}\n{closed}" if start else closed


def _close_inline(original: str) -> str:
    """``run`` (one block's inline text so far) with its open code span and emphasis closed."""
    run = original
    run = run.rstrip()
    openers: list[list[Any]] = []  # [char, count, position] of delimiter runs still open
    ticks_open: tuple[int, int] | None = None  # (length, position) of an open code span
    index, length = 0, len(run)
    while index < length:
        char = run[index]
        if char == "\\" and ticks_open is None:
            index += 2
            continue
        if char == "`":
            end = index
            while end < length and run[end] == "`":
                end += 1
            count = end - index
            if ticks_open is None:
                ticks_open = (count, index)
            elif ticks_open[0] == count:
                ticks_open = None
            index = end
            continue
        if ticks_open is None and char in "*_":
            end = index
            while end < length and run[end] == char:
                end += 1
            count = end - index
            before = run[index - 1] if index else ""
            after = run[end] if end < length else ""
            left, right = _flanking(before, after)
            if char == "_":
                can_open = left and (not right or _is_punctuation(before))
                can_close = right and (not left or _is_punctuation(after))
            else:
                # Inside a word (``5*3``) a star is as often literal: only closed when it closes.
                can_open, can_close = left and (not before or not before.isalnum()), right
            if can_close:
                for opener in reversed(openers):
                    if opener[0] == char:
                        used = min(opener[1], count)
                        opener[1] -= used
                        count -= used
                        while openers and openers[-1][1] == 0:
                            openers.pop()
                        # Openers inside a closed one can no longer close: forget them.
                        while openers and openers[-1] is not opener and openers[-1][0] != char:
                            openers.pop()
                        break
            if count and end == length and not can_open:
                return _close_inline(run[: end - count].rstrip())  # a marker with nothing after it yet
            if can_open and count:
                openers.append([char, count, end - count])
            index = end
            continue
        index += 1
    if ticks_open is None and not openers:
        return original  # nothing to close: as it was
    if ticks_open is not None:
        count, position = ticks_open
        if not run[position + count:].strip():
            return _close_inline(run[:position].rstrip())  # nothing in it yet: drop the marker
        # Emphasis opened before the code span still needs closing, after it.
        closed = run + (" " if run.endswith("`") else "") + "`" * count  # a backtick inside: spaced off
        openers = [o for o in openers if o[2] < position]
        return closed + "".join(o[0] * o[1] for o in reversed(openers))
    last = openers[-1]
    if not run[last[2] + last[1]:].strip():
        return _close_inline(run[: last[2]].rstrip())  # nothing after the marker yet: drop it
    return run.rstrip() + "".join(o[0] * o[1] for o in reversed(openers))
