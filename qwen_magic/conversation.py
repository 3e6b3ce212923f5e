"""Turns and chats: a notebook's conversation follows its cells, not the clock.

A turn belongs to the cell that asked (its Jupyter cell id). Re-running the cell replaces
the turn in place, with only the turns before it as context; without a cell id (a
terminal), turns append.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .client import Usage
from .i18n import N_, _, ngettext
from .result import COMPLETE, FAILED, INTERRUPTED, QwenResult
from .tokens import count_message

RECORD_VERSION = 1


@dataclass
class Turn:
    """One question and its answer."""

    prompt: str
    result: QwenResult
    cell_id: str | None = None
    system: str | None = None
    # With --tools: what followed the question, as sent (the assistant's calls, the tool
    # results, and the assistant's last message, which holds the answer).
    exchange: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gives_context(self) -> bool:
        """Complete answers, and interrupted ones the user saw part of, carry on the chat."""
        return self.result.status == COMPLETE or (
            self.result.status == INTERRUPTED and bool(self.result.text)
        )

    def messages(self) -> list[dict[str, Any]]:
        """What later requests carry: the question and the answer (never the reasoning)."""
        if self.exchange:
            return [{"role": "user", "content": self.prompt}, *self.exchange]
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.result.text},
        ]

    def tokens(self) -> int:
        """Input tokens this turn adds to a later request (counts are cached per message)."""
        return sum(count_message(m["role"], _counted_text(m)) for m in self.messages())

    def to_record(self) -> dict[str, Any]:
        """Plain JSON: what the history file and the notebook's output metadata keep."""
        return {
            "version": RECORD_VERSION,
            "prompt": self.prompt,
            "cell_id": self.cell_id,
            "system": self.system,
            **self.result.metadata(),
            **({"exchange": self.exchange} if self.exchange else {}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Turn":
        """The turn back from ``to_record``'s JSON; ``RecordError`` names a field of the wrong type."""
        if not isinstance(record, Mapping):
            raise RecordError(_("the turn is {kind}, not an object").format(kind=_kind(record)))
        usage = _field(record, "usage", {}, _is_usage, N_("an object of token counts")) or {}
        result = QwenResult(
            text=_field(record, "text", "", _is_text, "text"),
            model=_field(record, "model", "?", _is_text, "text"),
            usage=Usage(**{k: v for k, v in usage.items() if k in Usage.__dataclass_fields__}),
            request_id=_field(record, "request_id", None, _is_optional_text, "text"),
            elapsed=float(_field(record, "elapsed", 0.0, _is_optional_number, N_("a number")) or 0.0),
            first_text_after=_field(record, "first_text_after", None, _is_optional_number, N_("a number")),
            status=_field(record, "status", COMPLETE, _STATUSES.__contains__, N_("one of {values}")),
            finish_reason=_field(record, "finish_reason", None, _is_optional_text, "text"),
            reasoning=_field(record, "reasoning", "", _is_text, "text"),
            error=_field(record, "error", None, _is_optional_text, "text"),
            cost=_field(record, "cost", None, _is_optional_number, N_("a number of yuan")),
            chat=_field(record, "chat", "default", _is_text, "text"),
            turn=_field(record, "turn", None, _is_optional_position, N_("a turn number")),
            currency=_field(record, "currency", "CNY", _is_text, "text"),
        )
        return cls(
            prompt=_field(record, "prompt", None, _is_text, "text"),
            result=result,
            cell_id=_field(record, "cell_id", None, _is_optional_text, "text"),
            system=_field(record, "system", None, _is_optional_text, "text"),
            exchange=list(_field(record, "exchange", [], _is_exchange, N_("a list of assistant and tool messages"))),
        )


def _counted_text(message: Mapping[str, Any]) -> str:
    """A message's text for counting: its content, and the calls it makes as they are sent."""
    content = message.get("content") or ""
    calls = message.get("tool_calls")
    return f"{content}{json.dumps(calls, ensure_ascii=False)}" if calls else content


def _is_exchange(value: Any) -> bool:
    """Assistant messages (text, calls) and tool messages, each in the shape a request carries;
    the last one the assistant's answer."""
    if not isinstance(value, list):
        return False
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return False
        if message.get("role") == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                return False
        elif message.get("role") == "assistant":
            calls = message.get("tool_calls", [])
            if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
                return False
        else:
            return False
    return not value or (value[-1].get("role") == "assistant" and not value[-1].get("tool_calls"))


def _is_call(call: Any) -> bool:
    if not isinstance(call, dict):
        return False
    function = call.get("function")
    return (isinstance(call.get("id"), str) and isinstance(function, dict)
            and isinstance(function.get("name"), str) and isinstance(function.get("arguments"), str))


class RecordError(ValueError):
    """A saved turn whose fields are not what this package writes; the message names the field."""


_STATUSES = (COMPLETE, INTERRUPTED, FAILED)


def _field(record: Mapping[str, Any], name: str, default: Any, valid: Callable[[Any], bool], expected: str) -> Any:
    """The record's ``name``; ``expected`` (marked with ``N_``) says what it should be, in a RecordError."""
    value = record.get(name, default)
    if not valid(value):
        expected_shown = _(expected).format(values=", ".join(_STATUSES))
        raise RecordError(_("its {name!r} is {kind}, not {expected}").format(name=name, kind=_kind(value),
                                                                            expected=expected_shown))
    return value


def _kind(value: Any) -> str:
    if value is None:
        return _("missing (null)")
    if isinstance(value, str):
        return _("text")
    if isinstance(value, bool):
        return _("true/false")
    if isinstance(value, (int, float)):
        return _("the number {value!r}").format(value=value)
    if isinstance(value, list):
        return _("a list")
    if isinstance(value, dict):
        return _("an object")
    return type(value).__name__


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_optional_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_optional_number(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_optional_position(value: Any) -> bool:
    return value is None or (_is_count(value) and value >= 1)


def _is_usage(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, dict) and all(
        _is_count(count) for key, count in value.items() if key in Usage.__dataclass_fields__
    )


@dataclass
class Window:
    """The context turns a request carries, and how many older ones were left out (and why)."""

    turns: list[Turn]
    left_out: int = 0
    reason: str = ""

    def note(self) -> str | None:
        if not self.left_out:
            return None
        return ngettext("{count} oldest turn of the chat left out of the request ({reason}).",
                        "{count} oldest turns of the chat left out of the request ({reason}).",
                        self.left_out).format(count=self.left_out, reason=self.reason)


@dataclass
class Chat:
    """A named conversation of the notebook."""

    name: str = "default"
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def _index_of(self, cell_id: str | None) -> int | None:
        if cell_id is None:
            return None
        for index, turn in enumerate(self.turns):
            if turn.cell_id == cell_id:
                return index
        return None

    def context_for(self, cell_id: str | None) -> list[Turn]:
        """The turns a cell's request carries: those before its own turn, or all of them."""
        index = self._index_of(cell_id)
        before = self.turns if index is None else self.turns[:index]
        return [turn for turn in before if turn.gives_context]

    def position_for(self, cell_id: str | None) -> int:
        """The 1-based place the cell's turn will take: its old place, or the end."""
        index = self._index_of(cell_id)
        return len(self.turns) + 1 if index is None else index + 1

    def accepts(self, turn: Turn) -> bool:
        """A failed re-run does not replace the cell's answer that carries the chat on."""
        index = self._index_of(turn.cell_id)
        return index is None or turn.gives_context or not self.turns[index].gives_context

    def record(self, turn: Turn) -> int:
        """Replace the cell's earlier turn in place, or append; return its 1-based number."""
        index = self._index_of(turn.cell_id)
        if index is None:
            self.turns.append(turn)
            return len(self.turns)
        self.turns[index] = turn
        return index + 1

    def undo(self) -> Turn | None:
        return self.turns.pop() if self.turns else None

    def reset(self) -> None:
        self.turns.clear()

    def totals(self) -> tuple[int, int, float]:
        """Input tokens, output tokens and yuan of the chat's turns as they stand."""
        return (
            sum(t.result.usage.input_tokens for t in self.turns),
            sum(t.result.usage.output_tokens for t in self.turns),
            sum(t.result.cost or 0.0 for t in self.turns),
        )


def fit_window(
    context: list[Turn],
    *,
    fixed_tokens: int,
    input_limit: int | None,
    max_turns: int | None,
    max_history_tokens: int | None,
    model_name: str,
) -> Window:
    """Leave out the oldest turns until the request fits every limit that applies.

    ``fixed_tokens`` is what the request costs without any history (system prompt, the
    question, the template): only history is ever left out.
    """
    kept = list(context)
    left_out, reason = 0, ""
    if max_turns is not None and len(kept) > max_turns:
        left_out = len(kept) - max_turns
        kept = kept[left_out:]
        reason = f"--max-history {max_turns}"
    sizes = [turn.tokens() for turn in kept]
    history = sum(sizes)
    budgets = []
    if max_history_tokens is not None:
        budgets.append((max_history_tokens, f"QwenMagic.max_history_tokens = {max_history_tokens:,}"))
    if input_limit is not None:
        budgets.append((input_limit - fixed_tokens, _("{model}'s input limit of {limit:,} tokens").format(
            model=model_name, limit=input_limit)))
    for allowed, why in budgets:
        dropped = 0
        while kept and history > allowed:
            history -= sizes.pop(0)
            kept.pop(0)
            dropped += 1
        if dropped:
            left_out += dropped
            reason = why
    return Window(kept, left_out, reason)


def messages_for(system: str | None, context: list[Turn], prompt: str | list[dict[str, str]]) -> list[dict[str, Any]]:
    """System prompt, the context turns, then this cell's question."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for turn in context:
        messages.extend(turn.messages())
    messages.append({"role": "user", "content": prompt})
    return messages
