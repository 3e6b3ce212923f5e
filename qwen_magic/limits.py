"""Rate limits before sending, and the bounded retry of a call that failed before any text."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .catalog import ModelInfo
from .i18n import _


@dataclass
class _Sent:
    at: float
    tokens: int


class RateLimiter:
    """Per-model sliding windows of requests and tokens, as DashScope counts QPM and TPM."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._sent: dict[str, deque[_Sent]] = {}
        self._lock = threading.Lock()

    def _recent(self, model: str) -> deque[_Sent]:
        sent = self._sent.setdefault(model, deque())
        horizon = self._clock() - self.window
        while sent and sent[0].at <= horizon:
            sent.popleft()
        return sent

    def wait_needed(self, model: ModelInfo | None, tokens: int) -> tuple[float, str]:
        """Seconds to wait before a request of ``tokens`` fits the model's windows, and why."""
        if model is None or (model.qpm is None and model.tpm is None):
            return 0.0, ""
        with self._lock:
            sent = self._recent(model.name)
            now = self._clock()
            wait, reason = 0.0, ""
            if model.qpm is not None and len(sent) >= model.qpm:
                # The oldest request that must leave the window for one more to fit.
                leaving = sent[len(sent) - model.qpm]
                wait, reason = leaving.at + self.window - now, _("{count:,} requests per minute").format(count=model.qpm)
            if model.tpm is not None:
                used = sum(item.tokens for item in sent)
                excess = used + tokens - model.tpm
                if excess > 0:
                    freed = 0
                    for item in sent:
                        freed += item.tokens
                        if freed >= excess:
                            token_wait = item.at + self.window - now
                            if token_wait > wait:
                                wait, reason = token_wait, _("{count:,} tokens per minute").format(count=model.tpm)
                            break
            return max(wait, 0.0), reason

    def record(self, model: str, tokens: int) -> _Sent:
        """Count a request as sent now; the returned entry is settled with the real tokens."""
        entry = _Sent(self._clock(), tokens)
        with self._lock:
            self._recent(model).append(entry)
        return entry

    @staticmethod
    def settle(entry: _Sent, tokens: int) -> None:
        """Replace the estimate with the server's count (input and output) once known."""
        entry.tokens = tokens


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter; the server's retry-after wins."""

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    random: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(retry_after, 60.0)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        # "Equal jitter": never less than half the backoff, never all clients in step.
        return ceiling / 2 + self.random.uniform(0, ceiling / 2)
