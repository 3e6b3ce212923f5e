"""The only code that talks to DashScope.

It turns the dashscope 2.0 ``Client``'s stream into a few plain events, and every way a
call can fail (an API error before or during the stream, a refused connection, a stall,
a cut) into one ``QwenAPIError`` with a line a person can act on. dashscope and httpx are
imported here, lazily, so that ``%load_ext`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Union
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # pragma: no cover
    import dashscope

    from .limits import RetryPolicy

NO_KEY_HELP = (
    "No DashScope API key is set. Provide one in any of three ways: "
    "run %qwen login (asks for it with a hidden prompt and keeps it for this session only); "
    "set the environment variable DASHSCOPE_API_KEY before starting Jupyter; "
    "or put api_key = \"sk-...\" in ~/.dashscope/config.toml. "
    "Keys are per region: a Beijing key does not work in Singapore."
)

# What to do about each DashScope error code, in one sentence.
ERROR_ADVICE: dict[str, str] = {
    "InvalidApiKey": (
        "Check the key: keys are region-specific (mainland vs international), so use the key "
        "of the region you call; set it with %qwen login or DASHSCOPE_API_KEY."
    ),
    "InvalidParameter": "Check the cell's options and the model name (%qwen help).",
    "DataInspectionFailed": (
        "Content moderation rejected the input or the answer; rephrase the prompt."
    ),
    "Arrearage": "The account is in arrears: top it up in the Model Studio console, then retry.",
    "AccessDenied": "This key may not use this model or workspace; check its permissions.",
    "AccessDenied.Unpurchased": "This model is not activated for the account; activate it first.",
    "AllocationQuota.FreeTierOnly": (
        "The free quota is used up and the account allows free tier only; "
        "turn off free-tier-only in the console to be billed, or pick another model."
    ),
    "ModelNotFound": "No such model; check the name with -m (see the Model Studio model list).",
    "Model.NotExist": "No such model; check the name with -m (see the Model Studio model list).",
    "Throttling": "Too many requests: wait a moment and run the cell again.",
    "Throttling.RateQuota": "The model's requests or tokens per minute are exceeded: wait a minute.",
    "Throttling.AllocationQuota": "The quota for this model is exhausted: wait or raise the quota.",
    "InternalError": "A server-side error: try again shortly.",
    "ServiceUnavailable": "The service is unavailable for now: try again shortly.",
    "GatewayTimeout": "The server timed out: try again, or ask for a shorter answer.",
    "ConnectionError": "Check DASHSCOPE_BASE_URL / QwenMagic.base_url and the network.",
    "Timeout": "The server did not answer in time: try again, or raise QwenMagic.timeout.",
    "StreamStalled": "The stream stopped sending: try again, or raise QwenMagic.timeout.",
    "StreamCut": "The connection closed before the answer ended: run the cell again.",
}
_RETRYABLE_CODES = frozenset({
    "Throttling", "Throttling.RateQuota", "InternalError", "ServiceUnavailable", "GatewayTimeout",
    "ConnectionError", "Timeout",
})
_ADVICE_BY_STATUS = {
    401: ERROR_ADVICE["InvalidApiKey"],
    429: ERROR_ADVICE["Throttling"],
    500: ERROR_ADVICE["InternalError"],
    502: ERROR_ADVICE["ServiceUnavailable"],
    503: ERROR_ADVICE["ServiceUnavailable"],
    504: ERROR_ADVICE["GatewayTimeout"],
}


class QwenAPIError(Exception):
    """A failed call, shown as one line with its code, message, request id and advice."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status
        self.retry_after = retry_after
        self.advice = ERROR_ADVICE.get(code) or _ADVICE_BY_STATUS.get(status or 0, "")
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"DashScope error {self.code}: {self.message.rstrip('.')}."]
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        if self.advice:
            parts.append(self.advice)
        return " ".join(parts)

    @property
    def retryable(self) -> bool:
        """Worth another try before any text was shown: rate limits and server trouble."""
        if self.code == "Throttling.AllocationQuota":  # an exhausted quota does not come back in seconds
            return False
        # An error frame at the head of a stream arrives with HTTP 200: its code says what it is.
        return self.status in (408, 409, 429) or (self.status or 0) >= 500 or self.code in _RETRYABLE_CODES

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback.
        return [self.line()]


@dataclass(frozen=True)
class Usage:
    """Token figures of one call; the server's, once it sends them.

    ``cached_tokens`` (read from the context cache) and ``cache_creation_tokens`` (written to
    it) are part of ``input_tokens``; ``searches`` counts the web searches the call made.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    searches: int = 0

    @classmethod
    def from_sdk(cls, usage: Any) -> "Usage":
        """Read the SDK's ``Usage`` (native or compatible names; details as extras)."""
        if usage is None:
            return cls()
        data = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
        output_details = _mapping(data.get("output_tokens_details") or data.get("completion_tokens_details"))
        input_details = _mapping(data.get("prompt_tokens_details") or data.get("input_tokens_details"))
        search = _mapping(_mapping(data.get("plugins")).get("search"))
        return cls(
            input_tokens=_count(data.get("input_tokens") or data.get("prompt_tokens")),
            output_tokens=_count(data.get("output_tokens") or data.get("completion_tokens")),
            reasoning_tokens=_count(output_details.get("reasoning_tokens")),
            # Most models report cache reads in the details; some vision models at the top.
            cached_tokens=_count(input_details.get("cached_tokens") or data.get("cached_tokens")),
            cache_creation_tokens=_count(input_details.get("cache_creation_input_tokens")),
            searches=_count(search.get("count")),
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(value: Any) -> int:
    """A token count from the server: a missing or malformed figure counts as none."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


class ReasoningDelta(NamedTuple):
    """New thinking text, before the answer."""

    text: str


class AnswerStarted(NamedTuple):
    """The answer's first text is in ``CallState.answer``.

    The rest of the answer is appended there with no event: a frame comes every few
    microseconds at full speed, and handing each piece over costs more than the piece.
    """


ANSWER_STARTED = AnswerStarted()
Event = Union[ReasoningDelta, AnswerStarted]


@dataclass(frozen=True)
class ChatRequest:
    """One call: model, messages and the parameters given (SDK names)."""

    model: str
    messages: tuple[Mapping[str, Any], ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True


@dataclass
class CallState:
    """What is known of a call so far; kept when it fails or is interrupted."""

    # The SDK's latest usage object: native frames each carry a running total, so it is
    # kept as it comes and converted only when asked for (not once per frame).
    raw_usage: Any = None
    raw_search_info: Any = None
    request_id: str | None = None
    finish_reason: str | None = None
    # The answer as it came, a piece per frame: the stream appends, the views read (a list's
    # append and its slices are safe across threads).
    answer: list[str] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        return Usage.from_sdk(self.raw_usage)

    @property
    def search_results(self) -> list[dict[str, Any]]:
        """Web sources the answer cites, when search was on."""
        if self.raw_search_info is None:
            return []
        return [result.model_dump() for result in self.raw_search_info.search_results]


@dataclass(frozen=True)
class Connection:
    """Where and how to connect; a change of any field builds a new SDK client."""

    api_key: str | None = field(default=None, repr=False)  # never in a repr or a log line
    base_url: str | None = None
    protocol: str = "native"
    timeout: float | None = None
    # The cell's own --base-url is used as written; a configured DashScope root (the trait,
    # DASHSCOPE_BASE_URL, config.toml) follows the protocol (see dashscope_root_for).
    base_url_as_given: bool = False


# DashScope serves each protocol under its own root on the same host.
_DASHSCOPE_ROOTS = {"native": "/api/v1", "openai": "/compatible-mode/v1"}


def dashscope_root_for(base_url: str, protocol: str) -> str:
    """``base_url`` moved to ``protocol``'s root when it is DashScope's other root.

    ``https://dashscope-intl.aliyuncs.com/api/v1`` (the native root, which many set as
    DASHSCOPE_HTTP_BASE_URL) becomes ``…/compatible-mode/v1`` for the OpenAI protocol, and
    the reverse; any other URL (vLLM's /v1, a proxy) is left as it is.
    """
    wanted = _DASHSCOPE_ROOTS.get(protocol)
    if wanted is None:
        return base_url
    try:
        parts = urlsplit(base_url)
    except ValueError:  # not a URL: left for the request to report
        return base_url
    path = parts.path.rstrip("/")
    for root in _DASHSCOPE_ROOTS.values():
        if root != wanted and path.endswith(root):
            return urlunsplit(parts._replace(path=path[: -len(root)] + wanted))
    return base_url


def key_source(session_key: str | None) -> tuple[str | None, str]:
    """The key the SDK would use and where it comes from (same order as dashscope 2.0)."""
    if session_key:
        return session_key, "%qwen login (this session only)"
    if os.environ.get("DASHSCOPE_API_KEY"):
        return os.environ["DASHSCOPE_API_KEY"], "environment variable DASHSCOPE_API_KEY"
    from dashscope.v2._config import resolve_config

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no workspace configured")
        key = resolve_config().api_key
    if key:
        return key, "~/.dashscope (config.toml or api_key file)"
    return None, "set it with %qwen login or DASHSCOPE_API_KEY"


def mask_key(key: str | None) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    if not key:
        return "(not set)"
    return f"{key[:3]}…{key[-4:]}" if len(key) > 12 else "…"


_BEARER = re.compile(r"(Bearer\s+)[^\s'\"]+")


def redact(text: str, secret: str | None) -> str:
    """The text with the key masked, as written and as escaped (a header's repr shows \\n)."""
    if secret:
        for form in {secret, secret.strip(), secret.encode("unicode_escape").decode("ascii", "replace")}:
            if form:
                text = text.replace(form, mask_key(secret.strip()))
    return _BEARER.sub(lambda match: match.group(1) + "…", text)


def _keep_sources(state: CallState, search_info: Any) -> None:
    """Keep the first list of sources that has any.

    The native stream sends them in its first frame and empty lists after it; the SDK's own
    final message keeps the last frame's, so they are read here as they come.
    """
    if state.raw_search_info is None and search_info is not None and search_info.search_results:
        state.raw_search_info = search_info


def _read_last_frame(state: CallState, frame: Any, choice: Any) -> None:
    """Keep what the last frame read says of the whole call.

    Native frames each carry the running usage and the request id; the compatible mode sends
    its usage in a last frame of its own, after the one with the finish reason (``choice``,
    the last choice read). ``"null"`` is the native protocol's "not finished".
    """
    if frame is None:
        return
    if state.request_id is None:
        state.request_id = frame.request_id
    if frame.usage is not None:
        state.raw_usage = frame.usage
    if choice is not None and choice.finish_reason and choice.finish_reason != "null":
        state.finish_reason = choice.finish_reason


class QwenClient:
    """One dashscope ``Client`` per effective configuration, reused across cells.

    The configuration is resolved again for every call (explicit settings, then
    dashscope's environment variables and files), so a key exported in a cell after a
    failed attempt is picked up, while the client and its connection pool are reused.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], "dashscope.Client"] = {}
        self._lock = threading.Lock()

    def sdk_client(self, connection: Connection) -> "dashscope.Client":
        from dashscope.v2._config import resolve_config

        with warnings.catch_warnings():
            # dashscope suggests a workspace on every client; notebooks need not see it.
            warnings.filterwarnings("ignore", message="no workspace configured")
            try:
                config = resolve_config(
                    api_key=connection.api_key,
                    base_url=connection.base_url,
                    protocol=connection.protocol,
                    timeout=connection.timeout,
                )
            except ValueError as error:  # DASHSCOPE_REGION, DASHSCOPE_TIMEOUT, config.toml
                from IPython.core.error import UsageError

                raise UsageError(f"dashscope's configuration cannot be used: {error}") from None
            if config.api_key and config.api_key != config.api_key.strip():
                # A key read from a file often ends in a newline; no key has white space.
                config = dataclasses.replace(config, api_key=config.api_key.strip())
            if config.configured_base_url and not connection.base_url_as_given:
                # dashscope uses a configured URL verbatim for every protocol: /api/v1 with the
                # OpenAI protocol would post to /api/v1/chat/completions, which does not exist.
                root = dashscope_root_for(config.configured_base_url, config.protocol)
                config = dataclasses.replace(config, configured_base_url=root, protocol_base_url=root)
            identity = (
                config.api_key,
                config.protocol_base_url,
                config.protocol,
                config.timeout,
                config.workspace,
                config.region,
            )
            with self._lock:
                client = self._clients.get(identity)
                if client is None:
                    import dashscope

                    client = dashscope.Client(
                        api_key=config.api_key,
                        base_url=config.configured_base_url,
                        workspace=config.workspace,
                        region=config.region,
                        protocol=config.protocol,
                        timeout=config.timeout,
                        # Streams are never retried by the SDK; retries are ours, before any text.
                        max_retries=0,
                    )
                    self._clients[identity] = client
                return client

    def resolved_base_url(self, connection: Connection) -> str:
        return self.sdk_client(connection).config.protocol_base_url

    def stream(
        self,
        connection: Connection,
        request: ChatRequest,
        state: CallState,
        *,
        retry: "RetryPolicy | None" = None,
        on_retry: Callable[[QwenAPIError, float, int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        sdk: "dashscope.Client | None" = None,
    ) -> Iterator[Event]:
        """Read the answer into ``state.answer``; yield the thinking and the answer's start.

        Raise ``QwenAPIError`` for any failure. A rate limit or server error that comes before
        anything was shown is retried as ``retry`` allows (``on_retry`` is told first); once
        text has been shown, never. ``state`` is filled as frames arrive, so a caller that
        stops early (an interrupt) or catches an error still has the text, usage and request id
        seen so far. ``sdk`` is the client ``sdk_client(connection)`` gave, when the caller has
        it already.
        """
        client = sdk or self.sdk_client(connection)
        attempt = 0
        while True:
            shown = False
            try:
                if not request.stream:
                    yield from self._whole_answer(client, request, state)
                    return
                frames = self._create(client, request, stream=True)
                # The frame loop is written out here, not in generators of its own: it runs once
                # per frame, and every layer, call or attribute read costs on every frame. Both
                # loops read one iterator (a second iter() of the SDK's stream would start over).
                reader = iter(frames)
                last = choice = None
                try:
                    for last in reader:  # until the answer's first text: thinking, search results
                        if last.search_info is not None:
                            _keep_sources(state, last.search_info)
                        choices = last.choices
                        if not choices:
                            continue
                        choice = choices[0]
                        delta = choice.delta
                        thought, text = delta.reasoning_content, delta.content
                        if thought:
                            shown = True
                            yield ReasoningDelta(thought)
                        if text:
                            shown = True
                            state.answer.append(text)
                            yield ANSWER_STARTED
                            break
                    # The answer: as little per frame as a bare loop that joins the text. The
                    # facts every frame repeats (usage, request id, finish reason) are read from
                    # the last frame once the loop ends, however it ends; the sources are not
                    # repeated (later frames carry an empty list), so they are read as they come.
                    keep = state.answer.append
                    for last in reader:
                        # Sources come in the first frame; this only catches a later first list.
                        if last.search_info is not None and state.raw_search_info is None:
                            _keep_sources(state, last.search_info)
                        choices = last.choices
                        if choices:
                            choice = choices[0]
                            delta = choice.delta
                            text = delta.content
                            if text:
                                keep(text)
                            elif delta.reasoning_content:
                                yield ReasoningDelta(delta.reasoning_content)
                finally:
                    frames.close()
                    _read_last_frame(state, last, choice)
                if state.finish_reason is None:
                    raise QwenAPIError(
                        "StreamCut", "the stream ended before the answer was finished", request_id=state.request_id
                    )
                return
            except QwenAPIError as error:
                failure = error
            except Exception as error:  # every SDK / transport failure becomes one line
                failure = self._translate(error, client, state, client.config.api_key)
            # Once text has been shown, nothing is retried.
            if shown or not failure.retryable or retry is None or attempt >= retry.max_retries:
                raise failure from None
            attempt += 1
            delay = retry.delay(attempt, failure.retry_after)
            if on_retry is not None:
                on_retry(failure, delay, attempt)
            sleep(delay)
            state.request_id = None
            state.raw_search_info = None  # the next try brings its own

    @staticmethod
    def _create(client: "dashscope.Client", request: ChatRequest, *, stream: bool) -> Any:
        return client.chat.completions.create(
            model=request.model, messages=list(request.messages), stream=stream, **request.parameters
        )

    def _whole_answer(
        self, client: "dashscope.Client", request: ChatRequest, state: CallState
    ) -> Iterator[Event]:
        completion = self._create(client, request, stream=False)
        state.request_id = completion.request_id
        state.raw_usage = completion.usage
        _keep_sources(state, completion.search_info)
        if completion.choices:
            choice = completion.choices[0]
            state.finish_reason = choice.finish_reason or "stop"
            if choice.message.reasoning_content:
                yield ReasoningDelta(choice.message.reasoning_content)
            if choice.message.content:
                state.answer.append(choice.message.content)
                yield ANSWER_STARTED
        else:
            state.finish_reason = "stop"

    def _translate(
        self, error: Exception, client: "dashscope.Client", state: CallState, key: str | None
    ) -> QwenAPIError:
        import httpx
        from dashscope.v2 import errors as sdk_errors

        base_url = client.config.protocol_base_url
        if isinstance(error, sdk_errors.APITimeoutError):
            translated = QwenAPIError("Timeout", f"no answer from {base_url} in time")
        elif isinstance(error, sdk_errors.APIConnectionError):
            translated = QwenAPIError("ConnectionError", f"cannot reach {base_url} ({_reason(error)})")
        elif isinstance(error, sdk_errors.DashScopeError) and error.code:
            translated = QwenAPIError(
                error.code,
                error.message or "no message",
                request_id=error.request_id or state.request_id,
                status=error.status_code,
                retry_after=_retry_after(error.headers),
            )
        elif isinstance(error, sdk_errors.DashScopeError):
            translated = QwenAPIError(
                f"HTTP{error.status_code}" if error.status_code else "DashScopeError",
                error.message or str(error),
                request_id=error.request_id or state.request_id,
                status=error.status_code,
            )
        elif isinstance(error, httpx.TimeoutException):
            translated = QwenAPIError(
                "StreamStalled",
                f"no data from {base_url} for {client.config.timeout:g} s",
                request_id=state.request_id,
            )
        elif isinstance(error, (httpx.TransportError, httpx.StreamError)):
            translated = QwenAPIError(
                "StreamCut",
                f"the connection to {base_url} closed mid-answer ({type(error).__name__})",
                request_id=state.request_id,
            )
        else:
            translated = QwenAPIError(type(error).__name__, str(error) or "unexpected failure")
        translated.message = redact(translated.message, key)
        translated.args = (translated.line(),)
        return translated

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def _reason(error: Exception) -> str:
    """The innermost cause, e.g. 'Connection refused', without the SDK's prefix."""
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause) or type(cause).__name__
    return text.split("] ", 1)[-1]


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None
