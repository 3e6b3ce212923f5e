"""A chat shown, exported, or rebuilt from a saved notebook's outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from .conversation import Chat, RecordError, Turn
from .markdown import escape, render_markdown
from .pricing import format_money
from .result import COMPLETE, QUIET_STYLE, text_from_markdown

_MARKS = {"interrupted": "⚠ interrupted", "failed": "✖ failed"}


def shortened(text: object, limit: int = 120) -> str:
    """A name or path as a message quotes it: whole, or its start and end around an ellipsis."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}…{text[-(limit // 2 - 1):]}"


def _turn_line(number: int, turn: Turn) -> str:
    result = turn.result
    usage = result.usage
    parts = [f"turn {number}", result.model, f"{usage.input_tokens:,} in / {usage.output_tokens:,} out",
             format_money(result.cost, result.currency) if result.cost is not None else "cost unknown"]
    if result.status != COMPLETE:
        parts.append(_MARKS.get(result.status, result.status) + (f" ({result.error})" if result.error else ""))
    return " · ".join(parts)


@dataclass(frozen=True)
class ChatHistory:
    """``%qwen history``: who said what, turn by turn, with tokens, cost and status."""

    chat: Chat

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = [f"Chat {self.chat.name!r}: {len(self.chat.turns)} turn(s)"]
        if self.chat.system:
            lines.append(f"system: {self.chat.system}")
        for number, turn in enumerate(self.chat.turns, start=1):
            lines += ["", f"── {_turn_line(number, turn)}", f"you: {turn.prompt}", f"{turn.result.model}: {turn.result.text}"]
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        parts = [f"<strong>Chat {escape(self.chat.name)}</strong>: {len(self.chat.turns)} turn(s)"]
        if self.chat.system:
            parts.append(f"<p><em>system:</em> {escape(self.chat.system)}</p>")
        for number, turn in enumerate(self.chat.turns, start=1):
            parts.append(
                "<div style='border-left:3px solid var(--jp-border-color1,#ccc);padding-left:0.6em;margin:0.6em 0'>"
                f"<div style='{QUIET_STYLE} font-size:0.85em'>{escape(_turn_line(number, turn))}</div>"
                f"<div><strong>You</strong></div>{render_markdown(turn.prompt)}"
                f"<div><strong>{escape(turn.result.model)}</strong></div>{render_markdown(turn.result.text)}</div>"
            )
        return "".join(parts)


def chat_to_markdown(chat: Chat) -> str:
    lines = [f"# Chat: {chat.name}", ""]
    if chat.system:
        lines += [f"*System:* {chat.system}", ""]
    for number, turn in enumerate(chat.turns, start=1):
        lines += [f"## Turn {number}", "", f"*{_turn_line(number, turn)}*", "", "**You:**", "", turn.prompt, "",
                  f"**{turn.result.model}:**", "", turn.result.text, ""]
    return "\n".join(lines)


def chat_to_json(chat: Chat, notebook: str) -> str:
    document = {
        "chat": chat.name,
        "notebook": notebook,
        "system": chat.system,
        "turns": [turn.to_record() for turn in chat.turns],
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


def turns_from_notebook(path: Path, chat: str) -> list[Turn]:
    """A chat's turns from the output metadata of a saved notebook, in cell order.

    Each ``%%qwen`` output carries its turn; a cell re-run before saving holds its latest.
    A notebook of the wrong shape is refused whole (``UsageError`` naming the file and the
    field): nothing of it reaches the chat or the history file.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
            raise UsageError(f"{shortened(path)} is not a notebook ({type(error).__name__}).") from None
        reason = getattr(error, "strerror", None) or error
        raise UsageError(f"Cannot read {shortened(path)}: {reason}") from None
    try:
        return _turns_of(document, chat)
    except NotebookShapeError as error:
        raise UsageError(f"{shortened(path)} cannot be resumed: {error}; nothing was changed.") from None


class NotebookShapeError(ValueError):
    """A notebook whose JSON is not shaped as nbformat writes it; the message says where."""


def _turns_of(document: Any, chat: str) -> list[Turn]:
    if not isinstance(document, dict) or not isinstance(document.get("cells", []), list):
        raise NotebookShapeError("it is not a notebook (no list of cells)")
    turns: list[Turn] = []
    for cell_number, cell in enumerate(document.get("cells", []), start=1):
        where = f"cell {cell_number}"
        if not isinstance(cell, dict):
            raise NotebookShapeError(f"{where} is not an object")
        outputs = cell.get("outputs", [])
        if not isinstance(outputs, list):
            raise NotebookShapeError(f"the outputs of {where} are not a list")
        for output_number, output in enumerate(outputs, start=1):
            where = f"output {output_number} of cell {cell_number}"
            if not isinstance(output, dict):
                raise NotebookShapeError(f"{where} is not an object")
            metadata = output.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise NotebookShapeError(f"the metadata of {where} is not an object")
            record = metadata.get("qwen_magic")
            if record is None:
                continue
            if not isinstance(record, dict):
                raise NotebookShapeError(f"the qwen_magic record of {where} is not an object")
            if record.get("chat") != chat or "prompt" not in record:
                continue
            turn = _turn_of(record, output, cell, where)
            if turn is None:
                continue  # the output was edited by hand: its answer cannot be trusted
            number = record.get("turn")
            if isinstance(number, int) and 1 <= number <= len(turns):
                # This turn took an earlier place (after -n, undo or a reset): what followed is gone.
                del turns[number - 1:]
            turns.append(turn)
    return turns


def _turn_of(record: dict[str, Any], output: dict[str, Any], cell: dict[str, Any], where: str) -> Turn | None:
    text = record.get("text")
    if text is None:  # not repeated in the metadata: the Markdown less the footer
        data = output.get("data") or {}
        footer = record.get("footer") or []
        if not isinstance(data, dict):
            raise NotebookShapeError(f"the data of {where} is not an object")
        markdown = data.get("text/markdown", "")
        if isinstance(markdown, list) and all(isinstance(line, str) for line in markdown):
            markdown = "".join(markdown)  # nbformat may store text as a list of lines
        if not isinstance(markdown, str):
            raise NotebookShapeError(f"the Markdown of {where} is not text")
        if not (isinstance(footer, list) and all(isinstance(line, str) for line in footer)):
            raise NotebookShapeError(f"the footer of {where} is not a list of lines")
        text = text_from_markdown(markdown, footer)
        if text is None:
            return None
    try:
        turn = Turn.from_record({**record, "text": text})
    except RecordError as error:
        raise NotebookShapeError(f"the turn in {where}: {error}") from None
    cell_id = cell.get("id")
    if turn.cell_id is None and cell_id is not None:
        if not isinstance(cell_id, str):
            raise NotebookShapeError(f"the id of the cell of {where} is not text")
        turn.cell_id = cell_id
    return turn
