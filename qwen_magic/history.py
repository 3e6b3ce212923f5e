"""A chat shown, exported, or rebuilt from a saved notebook's outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from .conversation import Chat, RecordError, Turn
from .i18n import N_, _
from .markdown import escape, render_markdown
from .pricing import format_money
from .result import COMPLETE, QUIET_STYLE, text_from_markdown

_MARKS = {"interrupted": N_("⚠ interrupted"), "failed": N_("✖ failed")}


def shortened(text: object, limit: int = 120) -> str:
    """A name or path as a message quotes it: whole, or its start and end around an ellipsis."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}…{text[-(limit // 2 - 1):]}"


def _turn_line(number: int, turn: Turn) -> str:
    result = turn.result
    usage = result.usage
    parts = [_("turn {number}").format(number=number), result.model,
             _("{input} in / {output} out").format(input=f"{usage.input_tokens:,}", output=f"{usage.output_tokens:,}"),
             format_money(result.cost, result.currency) if result.cost is not None else _("cost unknown")]
    if result.status != COMPLETE:
        mark = _(_MARKS[result.status]) if result.status in _MARKS else result.status
        parts.append(_("{mark} ({error})").format(mark=mark, error=result.error) if result.error else mark)
    return " · ".join(parts)


@dataclass(frozen=True)
class ChatHistory:
    """``%qwen history``: who said what, turn by turn, with tokens, cost and status."""

    chat: Chat

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = [_("Chat {chat}: {turns} turn(s)").format(chat=repr(self.chat.name), turns=len(self.chat.turns))]
        if self.chat.system:
            lines.append(_("system: {system}").format(system=self.chat.system))
        for number, turn in enumerate(self.chat.turns, start=1):
            lines += ["", f"── {_turn_line(number, turn)}", _("you: {prompt}").format(prompt=turn.prompt),
                      f"{turn.result.model}: {turn.result.text}"]
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        parts = [_("<strong>Chat {chat}</strong>: {turns} turn(s)").format(
            chat=escape(self.chat.name), turns=len(self.chat.turns))]
        if self.chat.system:
            parts.append(_("<p><em>system:</em> {system}</p>").format(system=escape(self.chat.system)))
        you = escape(_("You"))
        for number, turn in enumerate(self.chat.turns, start=1):
            parts.append(
                "<div style='border-left:3px solid var(--jp-border-color1,#ccc);padding-left:0.6em;margin:0.6em 0'>"
                f"<div style='{QUIET_STYLE} font-size:0.85em'>{escape(_turn_line(number, turn))}</div>"
                f"<div><strong>{you}</strong></div>{render_markdown(turn.prompt)}"
                f"<div><strong>{escape(turn.result.model)}</strong></div>{render_markdown(turn.result.text)}</div>"
            )
        return "".join(parts)


def chat_to_markdown(chat: Chat) -> str:
    lines = [_("# Chat: {chat}").format(chat=chat.name), ""]
    if chat.system:
        lines += [_("*System:* {system}").format(system=chat.system), ""]
    for number, turn in enumerate(chat.turns, start=1):
        lines += [_("## Turn {number}").format(number=number), "", f"*{_turn_line(number, turn)}*", "",
                  _("**You:**"), "", turn.prompt, "",
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
            raise UsageError(_("{path} is not a notebook ({error}).").format(
                path=shortened(path), error=type(error).__name__)) from None
        reason = getattr(error, "strerror", None) or error
        raise UsageError(_("Cannot read {path}: {error}").format(path=shortened(path), error=reason)) from None
    try:
        return _turns_of(document, chat)
    except NotebookShapeError as error:
        raise UsageError(_("{path} cannot be resumed: {error}; nothing was changed.").format(
            path=shortened(path), error=error)) from None


class NotebookShapeError(ValueError):
    """A notebook whose JSON is not shaped as nbformat writes it; the message says where."""


def _turns_of(document: Any, chat: str) -> list[Turn]:
    if not isinstance(document, dict) or not isinstance(document.get("cells", []), list):
        raise NotebookShapeError(_("it is not a notebook (no list of cells)"))
    turns: list[Turn] = []
    for cell_number, cell in enumerate(document.get("cells", []), start=1):
        where = _("cell {cell}").format(cell=cell_number)
        if not isinstance(cell, dict):
            raise NotebookShapeError(_("{where} is not an object").format(where=where))
        outputs = cell.get("outputs", [])
        if not isinstance(outputs, list):
            raise NotebookShapeError(_("the outputs of {where} are not a list").format(where=where))
        for output_number, output in enumerate(outputs, start=1):
            where = _("output {output} of cell {cell}").format(output=output_number, cell=cell_number)
            if not isinstance(output, dict):
                raise NotebookShapeError(_("{where} is not an object").format(where=where))
            metadata = output.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise NotebookShapeError(_("the metadata of {where} is not an object").format(where=where))
            record = metadata.get("qwen_magic")
            if record is None:
                continue
            if not isinstance(record, dict):
                raise NotebookShapeError(_("the qwen_magic record of {where} is not an object").format(where=where))
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
            raise NotebookShapeError(_("the data of {where} is not an object").format(where=where))
        markdown = data.get("text/markdown", "")
        if isinstance(markdown, list) and all(isinstance(line, str) for line in markdown):
            markdown = "".join(markdown)  # nbformat may store text as a list of lines
        if not isinstance(markdown, str):
            raise NotebookShapeError(_("the Markdown of {where} is not text").format(where=where))
        if not (isinstance(footer, list) and all(isinstance(line, str) for line in footer)):
            raise NotebookShapeError(_("the footer of {where} is not a list of lines").format(where=where))
        text = text_from_markdown(markdown, footer)
        if text is None:
            return None
    try:
        turn = Turn.from_record({**record, "text": text})
    except RecordError as error:
        raise NotebookShapeError(_("the turn in {where}: {error}").format(where=where, error=error)) from None
    cell_id = cell.get("id")
    if turn.cell_id is None and cell_id is not None:
        if not isinstance(cell_id, str):
            raise NotebookShapeError(_("the id of the cell of {where} is not text").format(where=where))
        turn.cell_id = cell_id
    return turn
