"""One cell's flow, as plain code the magic delegates to.

options -> chat context -> client stream -> view -> turn. The kernel-wide state (the SDK
client, the session's key, the chats) lives in one ``QwenSession`` per shell.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from IPython.core.error import UsageError

from .client import (
    NO_KEY_HELP,
    CallState,
    ChatRequest,
    Connection,
    QwenAPIError,
    QwenClient,
    TextDelta,
)
from .conversation import Chat, Turn
from .options import CellOptions
from .result import COMPLETE, FAILED, INTERRUPTED, QwenResult
from .view import View, make_view


class QwenInterrupted(KeyboardInterrupt):
    """The user interrupted the stream; the partial answer is kept, and Run All stops here."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


@dataclass(frozen=True)
class Settings:
    """The magic's settings for one call (traits, after the cell's options)."""

    model: str = "qwen-plus"
    system: str | None = None
    display: str = "auto"
    timeout: float | None = None
    base_url: str | None = None
    protocol: str = "native"


class _Ticker(threading.Thread):
    """Says how long the first text is taking, then keeps pending updates flowing."""

    PERIOD = 0.1

    def __init__(self, view: View, model: str, started: float) -> None:
        super().__init__(name="qwen-magic-ticker", daemon=True)
        self._view = view
        self._model = model
        self._since = started
        self._stop_event = threading.Event()
        self.text_started = False

    def run(self) -> None:
        shown_second = -1
        while not self._stop_event.wait(self.PERIOD):
            if self.text_started:
                self._view.tick()
                continue
            second = int(time.monotonic() - self._since)
            if second != shown_second:
                shown_second = second
                self._view.waiting(f"Waiting for {self._model}… {second} s")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()


class QwenSession:
    """What one kernel keeps between cells."""

    def __init__(self) -> None:
        self.client = QwenClient()
        self.session_key: str | None = None
        self.chats: dict[str, Chat] = {}

    def chat(self, name: str = "default") -> Chat:
        return self.chats.setdefault(name, Chat(name))

    def connection(self, settings: Settings) -> Connection:
        return Connection(
            api_key=self.session_key,
            base_url=settings.base_url,
            protocol=settings.protocol,
            timeout=settings.timeout,
        )

    def ask(
        self,
        prompt: str,
        options: CellOptions,
        settings: Settings,
        *,
        cell_id: str | None,
        in_kernel: bool,
        display: Callable[..., Any],
    ) -> QwenResult:
        """Send one cell, stream the answer into its view, record the turn."""
        # Blank lines around the cell's text are not part of the question (and cost tokens).
        prompt = prompt.strip("\n").rstrip()
        if not prompt.strip():
            raise UsageError("The %%qwen cell is empty: write a question below the %%qwen line.")
        model = options.model or settings.model
        chat = self.chat()
        system = options.system or chat.system or settings.system
        chat.system = system
        request = ChatRequest(
            model=model,
            messages=tuple(chat.messages_for(prompt, cell_id)),
            parameters=options.parameters(),
            stream=options.stream,
        )
        connection = self.connection(settings)
        if settings.protocol == "native" and not self.client.resolved_key(connection):
            raise UsageError(NO_KEY_HELP)

        view = make_view(settings.display, in_kernel=in_kernel, display=display)
        result, error = self._stream(request, connection, view)
        view.finish(result, result.footer())
        chat.record(Turn(prompt=prompt, result=result, cell_id=cell_id))

        if result.status == INTERRUPTED:
            raise QwenInterrupted(
                "the answer was interrupted; its partial text is kept above and in the chat."
            )
        if error is not None:
            raise error
        return result

    def _stream(
        self, request: ChatRequest, connection: Connection, view: View
    ) -> tuple[QwenResult, QwenAPIError | None]:
        """Drive the view from the stream; an interrupt or a failure keeps the partial text."""
        state = CallState()
        text: list[str] = []
        reasoning: list[str] = []
        started = time.monotonic()
        first_text_after: float | None = None
        status, failure = COMPLETE, None
        ticker = _Ticker(view, request.model, started)
        ticker.start()
        try:
            for event in self.client.stream(connection, request, state):
                if isinstance(event, TextDelta):
                    if first_text_after is None:
                        first_text_after = time.monotonic() - started
                        ticker.text_started = True
                    text.append(event.text)
                    view.add_text(event.text)
                else:
                    reasoning.append(event.text)
                    view.add_reasoning(event.text)
        except KeyboardInterrupt:
            status = INTERRUPTED
        except QwenAPIError as error:
            status, failure = FAILED, error
        finally:
            ticker.stop()
        result = QwenResult(
            text="".join(text),
            model=request.model,
            usage=state.usage,
            request_id=state.request_id,
            elapsed=time.monotonic() - started,
            first_text_after=first_text_after,
            status=status,
            finish_reason=state.finish_reason,
            reasoning="".join(reasoning),
            error=failure.code if failure else None,
            search_results=state.search_results,
        )
        return result, failure

    def close(self) -> None:
        self.client.close()
