"""Safe Markdown rendering and the splitting of a growing answer into finished blocks.

Raw HTML is disabled: a model's ``<script>`` or ``<img onerror=...>`` becomes visible text,
never live markup, and markdown-it refuses ``javascript:`` links on its own.
"""

from __future__ import annotations

import functools
import html
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from markdown_it import MarkdownIt

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@functools.lru_cache(maxsize=1)
def _markdown() -> "MarkdownIt":
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def render_markdown(text: str) -> str:
    """Markdown to HTML with raw HTML shown as text."""
    return _markdown().render(text)


def escape(text: str) -> str:
    return html.escape(text, quote=True)


class BlockSplitter:
    """Feeds on a streamed answer and hands back each Markdown block once it is finished.

    A block ends at a blank line outside a fenced code block. Finished blocks never
    change again, so a view renders each of them once; only the open block is re-rendered.
    """

    def __init__(self) -> None:
        self._partial_line = ""
        self._block_lines: list[str] = []
        self._fence: str | None = None  # the opening fence while inside a code block

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; return the blocks it finished (in order)."""
        if "\n" not in delta:
            self._partial_line += delta
            return []
        *lines, self._partial_line = (self._partial_line + delta).split("\n")
        finished: list[str] = []
        for line in lines:
            self._take_line(line, finished)
        return finished

    @property
    def open_block(self) -> str:
        """The unfinished block's text, the partial last line included."""
        if not self._block_lines:
            return self._partial_line
        return "\n".join([*self._block_lines, self._partial_line])

    def _take_line(self, line: str, finished: list[str]) -> None:
        fence = _FENCE.match(line)
        if self._fence is None:
            if not line.strip():
                if self._block_lines:
                    finished.append("\n".join(self._block_lines))
                    self._block_lines = []
                return
            if fence:
                self._fence = fence.group(1)
        elif fence and fence.group(1)[0] == self._fence[0] and len(fence.group(1)) >= len(self._fence):
            if not line.strip().strip(self._fence[0]):  # a closing fence has no info string
                self._fence = None
        self._block_lines.append(line)
