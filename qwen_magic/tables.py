"""Small tables that read well in both places: aligned text in a terminal, HTML in a notebook."""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence


def width(text: str) -> int:
    """Columns ``text`` takes in a terminal: Chinese characters take two."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def aligned(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows of cells as lines of text, each column padded to its widest cell."""
    if not rows:
        return []
    widths = [max(width(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell + " " * (most - width(cell)) for cell, most in zip(row, widths)).rstrip()
            for row in rows]


def html_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


@dataclass(frozen=True)
class Table:
    """A titled table with an optional header row and notes under it."""

    title: str
    rows: tuple[tuple[str, ...], ...]
    header: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        rows = [self.header, *self.rows] if self.header else list(self.rows)
        printer.text("\n".join([self.title, *aligned(rows, "  "), *self.notes]))

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in self.notes)
        return f"<strong>{html.escape(self.title)}</strong>{html_table(self.rows, self.header)}{notes}"
