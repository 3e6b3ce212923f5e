"""The real-time scheduler: N rows in flight under the model's QPM/TPM windows.

Worker threads take rows in order and send each through ``QwenClient`` (the same code path,
limiter and SDK client as a single cell). A throttled or server-failed row waits and is sent
again; a throttle also slows the whole job (fewer rows in flight, and a pause for all), which
then speeds up again row by row, so that a busy service is not stormed. An account error
(arrears, a wrong key) stops the job at once. Results go to a queue the caller reads.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..catalog import ModelInfo
from ..client import CallState, ChatRequest, Connection, QwenAPIError, QwenClient
from ..limits import RateLimiter, RetryPolicy
from ..pricing import call_cost
from ..result import COMPLETE, FAILED
from .results import NOT_RUN, RowResult
from .rows import Row

# Errors about the account or the key, not the row: every other row would fail the same way.
STOPS_THE_JOB = frozenset({
    "Arrearage", "InvalidApiKey", "AccessDenied", "AccessDenied.Unpurchased", "AllocationQuota.FreeTierOnly",
    "CommodityNotPurchased", "PrepaidBillOverdue", "PostpaidBillOverdue", "ModelNotFound", "Model.NotExist",
    "NotDashScope",
})
# A throttled row is sent again up to this many times: under a storm most rows are throttled
# at least once, and none should fail for it.
THROTTLED_RETRIES = 10


def stops_the_job(error: QwenAPIError) -> bool:
    return error.code in STOPS_THE_JOB or error.status in (401, 402, 403)


def is_throttling(error: QwenAPIError) -> bool:
    """DashScope's rate limits (429 Throttling.*): they clear within a minute."""
    return error.code.startswith("Throttling") or error.code in ("limit_requests", "limit_burst_rate",
                                                                   "insufficient_quota") or error.status == 429


class Pace:
    """How many rows may be in flight now, and until when all of them wait.

    Each throttle halves the rows in flight (at least one) and pauses every worker for the
    row's backoff; each run of successes as long as the current allowance adds one back.
    """

    def __init__(self, concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = concurrency
        self.allowed = concurrency
        self.in_flight = 0
        self._successes = 0
        self._paused_until = 0.0
        self._clock = clock
        self._condition = threading.Condition()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a slot (False once the job stops)."""
        with self._condition:
            while not stop.is_set():
                wait = self._paused_until - self._clock()
                if wait <= 0 and self.in_flight < self.allowed:
                    self.in_flight += 1
                    return True
                self._condition.wait(min(wait, 0.1) if wait > 0 else 0.1)
            return False

    def release(self) -> None:
        with self._condition:
            self.in_flight -= 1
            self._condition.notify()

    def throttled(self, delay: float) -> None:
        with self._condition:
            self.allowed = max(1, self.allowed // 2)
            self._successes = 0
            self._paused_until = max(self._paused_until, self._clock() + delay)

    def succeeded(self) -> None:
        with self._condition:
            if self.allowed < self.limit:
                self._successes += 1
                if self._successes >= self.allowed:
                    self.allowed += 1
                    self._successes = 0
                    self._condition.notify()


@dataclass(frozen=True)
class RowCall:
    """What every row's request shares."""

    client: QwenClient
    sdk: Any
    connection: Connection
    model_name: str
    model: ModelInfo | None
    parameters: dict[str, Any]
    stream: bool
    fmt: str
    schema: Any = None  # --schema: every answer is checked against it


class Runner:
    """Runs rows on worker threads; finished rows come out of ``results``."""

    def __init__(self, call: RowCall, limiter: RateLimiter, *, concurrency: int, retry: RetryPolicy) -> None:
        self.call = call
        self.limiter = limiter
        self.concurrency = concurrency
        self.retry = retry
        self.pace = Pace(concurrency)
        self.results: queue.SimpleQueue[RowResult] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.fatal: QwenAPIError | None = None  # the error that stopped the job
        self.requests = 0
        self.throttles = 0
        self._lock = threading.Lock()  # counters, and the limiter's check-then-record
        self._work: collections.deque[tuple[Row, int]] = collections.deque()
        self._threads: list[threading.Thread] = []

    def start(self, rows: list[Row], tokens: list[int]) -> None:
        self._work.extend(zip(rows, tokens))
        for number in range(min(self.concurrency, len(rows))):
            thread = threading.Thread(target=self._work_on, name=f"qwen-magic-map-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the rows in flight; True if every worker ended."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.running

    def _work_on(self) -> None:
        while not self.stop.is_set():
            try:
                row, tokens = self._work.popleft()
            except IndexError:
                return
            self.results.put(self._run(row, tokens))

    def _run(self, row: Row, tokens: int) -> RowResult:
        call = self.call
        request = ChatRequest(call.model_name, row.messages, call.parameters, stream=call.stream)
        attempts = 0
        started = time.monotonic()
        while True:
            if not self.pace.acquire(self.stop):
                return RowResult(row.position, row.key, status=NOT_RUN, attempts=attempts)
            state = CallState()
            failure = None
            try:
                sent = self._wait_for_window(tokens)
                if sent is None:
                    return RowResult(row.position, row.key, status=NOT_RUN, attempts=attempts)
                with self._lock:
                    self.requests += 1
                attempts += 1
                try:
                    for _ in call.client.stream(call.connection, request, state, sdk=call.sdk):
                        pass  # the thinking, and the answer's start: the answer is in state.answer
                except QwenAPIError as error:
                    failure = error
                finally:
                    # The server's count replaces the estimate in the window (a refusal reads none).
                    self.limiter.settle(sent, state.usage.total_tokens)
            finally:
                self.pace.release()
            if failure is None:
                self.pace.succeeded()
                return self._finished(row, state, attempts, started)
            if stops_the_job(failure):
                with self._lock:
                    self.fatal = self.fatal or failure
                self.stop.set()
                return self._failed(row, state, failure, attempts, started)
            throttled = is_throttling(failure)
            retries = THROTTLED_RETRIES if throttled else self.retry.max_retries
            if not (throttled or failure.retryable) or attempts > retries:
                return self._failed(row, state, failure, attempts, started)
            delay = self.retry.delay(attempts, failure.retry_after)
            if throttled:
                with self._lock:
                    self.throttles += 1
                self.pace.throttled(delay)
            if self.stop.wait(delay):
                return RowResult(row.position, row.key, status=NOT_RUN, attempts=attempts)

    def _wait_for_window(self, tokens: int) -> Any:
        """Wait until the model's windows have room, then count the request as sent (None: the job stopped)."""
        model = self.call.model
        while not self.stop.is_set():
            with self._lock:  # checked and counted together: two workers never take one free place
                wait, _ = self.limiter.wait_needed(model, tokens)
                if wait <= 0:
                    return self.limiter.record(model.name if model else self.call.model_name, tokens)
            self.stop.wait(min(wait, 0.25))
        return None

    def _finished(self, row: Row, state: CallState, attempts: int, started: float) -> RowResult:
        call = self.call
        text = "".join(state.answer)
        usage = state.usage
        result = RowResult(row.position, row.key, text=text, usage=usage, cost=call_cost(call.model, usage),
                           status=COMPLETE, request_id=state.request_id, elapsed=time.monotonic() - started,
                           attempts=attempts)
        return result.judge(call.fmt, call.schema)

    def _failed(self, row: Row, state: CallState, error: QwenAPIError, attempts: int, started: float) -> RowResult:
        usage = state.usage
        return RowResult(row.position, row.key, text="".join(state.answer), usage=usage,
                         cost=call_cost(self.call.model, usage), status=FAILED, error=error.code,
                         message=error.message, request_id=error.request_id or state.request_id,
                         elapsed=time.monotonic() - started, attempts=attempts)
