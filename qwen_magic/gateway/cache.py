"""The explicit context cache, as the service keeps it: marked prefixes written, then read.

A request whose messages carry ``cache_control: {"type": "ephemeral"}`` on a content block
writes the prefix up to its last marker (``cache_creation_input_tokens``), unless a prefix
up to one of its markers is cached already, which is read (``cached_tokens``) and only the
rest written. Prefixes under 1,024 tokens are not cached; an entry lives 5 minutes, renewed
by each hit. The cache is per model, as DashScope's is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from typing import Any, Mapping, Sequence

from ..tokens import count_chat_input
from .replies import Reply

MIN_PREFIX_TOKENS = 1024
LIFETIME = 300.0


def _marked(message: Mapping[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, Mapping) and b.get("cache_control") for b in content)


def _key(model: str, prefix: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(json.dumps([model, list(prefix)], sort_keys=True, ensure_ascii=False,
                                     default=str).encode()).hexdigest()


class ContextCache:
    """Marked prefixes by model and content, with their token counts and expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, float] = {}  # key -> expires at

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    def figures(self, model: str, messages: Sequence[Mapping[str, Any]], now: float | None = None) -> tuple[int, int] | None:
        """(read, written) tokens for a request, None if it marks nothing."""
        ends = [index + 1 for index, message in enumerate(messages) if isinstance(message, Mapping) and _marked(message)]
        if not ends:
            return None
        now = time.monotonic() if now is None else now
        sizes = {end: count_chat_input(messages[:end]) for end in ends}
        read = written = 0
        with self._lock:
            for end in reversed(ends):  # the longest cached prefix is read
                key = _key(model, messages[:end])
                if self._entries.get(key, 0.0) > now:
                    self._entries[key] = now + LIFETIME
                    read = sizes[end]
                    break
            last = ends[-1]
            if sizes[last] >= MIN_PREFIX_TOKENS and sizes[last] > read:
                written = sizes[last] - read
            for end in ends:
                if sizes[end] >= MIN_PREFIX_TOKENS:
                    self._entries.setdefault(_key(model, messages[:end]), now + LIFETIME)
        return read, written

    def applied(self, reply: Reply | None, model: str, messages: Sequence[Mapping[str, Any]]) -> Reply | None:
        """The reply with the cache's figures, unless the test scripted its own."""
        figures = self.figures(model, messages)
        if figures is None:
            return reply
        base = reply or Reply()
        if base.cached_tokens or base.cache_creation_tokens or base.is_error:
            return reply
        return dataclasses.replace(base, cached_tokens=figures[0], cache_creation_tokens=figures[1])
