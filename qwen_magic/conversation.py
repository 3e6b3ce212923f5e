"""Turns and chats: a notebook's conversation follows its cells, not the clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .result import COMPLETE, INTERRUPTED, QwenResult


@dataclass
class Turn:
    """One question and its answer, owned by the cell that asked (when there is a cell id)."""

    prompt: str
    result: QwenResult
    cell_id: str | None = None

    @property
    def gives_context(self) -> bool:
        """Complete answers, and interrupted ones the user saw part of, carry on the chat."""
        return self.result.status == COMPLETE or (
            self.result.status == INTERRUPTED and bool(self.result.text)
        )

    def messages(self) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.result.text},
        ]


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

    def record(self, turn: Turn) -> int:
        """Replace the cell's earlier turn in place, or append; return its 1-based number."""
        index = self._index_of(turn.cell_id)
        if index is None:
            self.turns.append(turn)
            return len(self.turns)
        self.turns[index] = turn
        return index + 1

    def messages_for(self, prompt: str, cell_id: str | None, *, system: str | None) -> list[dict[str, Any]]:
        """System prompt, the context turns, then this cell's question."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        for turn in self.context_for(cell_id):
            messages.extend(turn.messages())
        messages.append({"role": "user", "content": prompt})
        return messages
