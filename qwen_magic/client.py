"""The only code that talks to DashScope.

It turns the dashscope 2.0 ``Client``'s stream into a few plain events, and every way a
call can fail (an API error before or during the stream, a refused connection, a stall,
a cut) into one ``QwenAPIError`` with a line a person can act on. dashscope and httpx are
imported here, lazily, so that ``%load_ext`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Union
from urllib.parse import urlsplit, urlunsplit

from .i18n import N_, _

if TYPE_CHECKING:  # pragma: no cover
    import dashscope

    from .limits import RetryPolicy

NO_KEY_HELP = N_(
    "No DashScope API key is set. Provide one in any of three ways: "
    "run %qwen login (asks for it with a hidden prompt and keeps it for this session only); "
    "set the environment variable DASHSCOPE_API_KEY before starting Jupyter; "
    "or put api_key = \"sk-...\" in ~/.dashscope/config.toml. "
    "Keys are per region: a Beijing key does not work in Singapore."
)

# What to do about each DashScope error code, in one sentence.
ERROR_ADVICE: dict[str, str] = {
    "InvalidApiKey": N_(
        "Check the key: keys are region-specific (mainland vs international), so use the key "
        "of the region you call; set it with %qwen login or DASHSCOPE_API_KEY."
    ),
    "InvalidParameter": N_("Check the cell's options and the model name (%qwen help)."),
    "DataInspectionFailed": N_(
        "Content moderation rejected the input or the answer; rephrase the prompt."
    ),
    "Arrearage": N_("The account is in arrears: top it up in the Model Studio console, then retry."),
    "AccessDenied": N_("This key may not use this model or workspace; check its permissions."),
    "AccessDenied.Unpurchased": N_("This model is not activated for the account; activate it first."),
    "AllocationQuota.FreeTierOnly": N_(
        "The free quota is used up and the account allows free tier only; "
        "turn off free-tier-only in the console to be billed, or pick another model."
    ),
    "ModelNotFound": N_("No such model; check the name with -m (see the Model Studio model list)."),
    "Model.NotExist": N_("No such model; check the name with -m (see the Model Studio model list)."),
    "Throttling": N_("Too many requests: wait a moment and run the cell again."),
    "Throttling.RateQuota": N_("The model's requests or tokens per minute are exceeded: wait a minute."),
    "Throttling.AllocationQuota": N_("The quota for this model is exhausted: wait or raise the quota."),
    "InternalError": N_("A server-side error: try again shortly."),
    "ServiceUnavailable": N_("The service is unavailable for now: try again shortly."),
    "GatewayTimeout": N_("The server timed out: try again, or ask for a shorter answer."),
    "ConnectionError": N_("Check DASHSCOPE_BASE_URL / QwenMagic.base_url and the network."),
    "Timeout": N_("The server did not answer in time: try again, or raise QwenMagic.timeout."),
    "StreamStalled": N_("The stream stopped sending: try again, or raise QwenMagic.timeout."),
    "StreamCut": N_("The connection closed before the answer ended: run the cell again."),
    "NotDashScope": N_(
        "Check the base URL (DASHSCOPE_BASE_URL, QwenMagic.base_url, --base-url) or the proxy; "
        "a network's login page answers so too."
    ),
    "NotAStream": N_("Check the base URL or the proxy between: this is not DashScope's stream."),
    "MalformedFrame": N_("Check the base URL or the proxy between, or run the cell again."),
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


# An error line stays within ~300 characters: a server may answer with a page or a 1 MB frame.
_MESSAGE_LIMIT = 160


def _shortened(text: str, limit: int) -> str:
    """The text on one line (white space runs made one space), cut at ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def _html_answer(error: Exception, said: str) -> int | None:
    """The HTTP status, when the server answered with an HTML page instead of the API."""
    status = getattr(error, "status_code", None)
    head = said.lstrip()[:300].lower()
    if "<html" in head or "<!doctype html" in head or "<head" in head or "<body" in head:
        return int(status or 200)
    if type(error).__name__ == "SSEError" and "text/html" in said:
        return 200
    document = getattr(error, "doc", None)  # a JSONDecodeError keeps the text it could not read
    if isinstance(document, str) and "<html" in document[:300].lower():
        return 200
    return None


def _sent_content_type(said: str) -> str:
    """The content type httpx_sse names in its error ("... got 'text/plain'")."""
    found = re.search(r"got '([^']{0,60})'", said)
    return found.group(1) if found and found.group(1) else _("no content type")


def _first_validation_error(error: Exception, key: str | None) -> str:
    """A pydantic ValidationError's first problem, as ``field: message``."""
    try:
        first = error.errors()[0]  # type: ignore[attr-defined]
        where = ".".join(str(part) for part in first.get("loc", ())) or _("frame")
        said = _("{count} problem(s), first {where}: {problem}").format(
            count=error.error_count(), where=where, problem=first.get("msg"))  # type: ignore[attr-defined]
        return _shortened(redact(said, key), 100)  # type: ignore[attr-defined]
    except Exception:
        return _shortened(redact(str(error), key), 100)


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
        self.code = _shortened(code, 60)
        self.message = _shortened(message, _MESSAGE_LIMIT)
        self.request_id = request_id and _shortened(request_id, 80)
        self.status = status
        self.retry_after = retry_after
        self.advice = ERROR_ADVICE.get(code) or _ADVICE_BY_STATUS.get(status or 0, "")
        super().__init__(self.line())

    def line(self) -> str:
        """The error in the current language; the server's own message as it came."""
        message = self.message.rstrip(".")
        if self.request_id:
            line = _("DashScope error {code}: {message}. (request id {request_id})").format(
                code=self.code, message=message, request_id=self.request_id)
        else:
            line = _("DashScope error {code}: {message}.").format(code=self.code, message=message)
        # Translators: an error line, then what to do about it (joined without a space in Chinese).
        return _("{error} {advice}").format(error=line, advice=_(self.advice)) if self.advice else line

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
    # Tool calls the answer makes, merged from their streamed fragments by index.
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return Usage.from_sdk(self.raw_usage)

    def add_tool_calls(self, fragments: Any) -> None:
        """Merge streamed tool-call fragments: the name and id come in a call's first fragment
        (later ones may carry an empty id), the arguments in pieces, all keyed by ``index``."""
        for position, fragment in enumerate(fragments):
            index = fragment.index if fragment.index is not None else position
            call = self.tool_calls.setdefault(
                index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            if fragment.id:
                call["id"] = fragment.id
            function = fragment.function
            if function.name:
                call["function"]["name"] = function.name
            if function.arguments:
                call["function"]["arguments"] += function.arguments

    def merged_tool_calls(self) -> list[dict[str, Any]]:
        """The calls in order, each with an id (a server that sent none gets one made up)."""
        calls = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        for number, call in enumerate(calls):
            call["id"] = call["id"] or f"call_{number}"
        return calls

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


class Secret(str):
    """The API key: a string the SDK uses as any other, whose repr never shows it.

    Tracebacks in verbose mode print the arguments and locals of every frame, and the SDK's
    ``Config`` prints its fields: wrapped, the key shows there as ``'sk-…abcd'``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_key(str.__str__(self)))


def secret(key: str | None) -> Secret | None:
    """The key wrapped (white space around it dropped: no key has any), or None."""
    if not key or not key.strip():
        return None
    return key if isinstance(key, Secret) and key == key.strip() else Secret(key.strip())


def key_source(session_key: str | None) -> tuple[Secret | None, str]:
    """The key the SDK would use and where it comes from (same order as dashscope 2.0)."""
    if session_key:
        return secret(session_key), _("%qwen login (this session only)")
    if os.environ.get("DASHSCOPE_API_KEY"):
        return secret(os.environ["DASHSCOPE_API_KEY"]), _("environment variable DASHSCOPE_API_KEY")
    from dashscope.v2._config import resolve_config

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no workspace configured")
        found = secret(resolve_config().api_key)
    if found:
        return found, _("~/.dashscope (config.toml or api_key file)")
    return None, _("set it with %qwen login or DASHSCOPE_API_KEY")


def mask_key(key: str | None) -> str:
    """Enough to tell two keys apart, never enough to use one."""
    if not key:
        return _("(not set)")
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

    The configuration follows what dashscope reads at every call (explicit settings, then
    its environment variables and files), so a key exported in a cell after a failed attempt
    is picked up, while the client and its connection pool are reused. It is resolved again
    only when one of those changed (``_config_inputs``).
    """

    # Configurations kept: one per connection and set of inputs (a notebook uses a few).
    CONFIGS_KEPT = 16

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], "dashscope.Client"] = {}
        self._configs: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def sdk_client(self, connection: Connection) -> "dashscope.Client":
        """The SDK client of this configuration; a configuration that cannot work is a ``UsageError``.

        The key is wrapped in ``Secret`` from the moment it is read, and a failure here is
        raised afresh (``from None``): no frame a traceback could print holds it in the clear.
        """
        from IPython.core.error import UsageError

        inputs = _config_inputs()
        key = None if inputs is None else (connection, inputs)
        config = None if key is None else self._configs.get(key)
        if config is None:
            try:
                config = _resolved_config(connection)
            except ValueError as error:  # DASHSCOPE_REGION, DASHSCOPE_TIMEOUT, config.toml
                raise UsageError(_("dashscope's configuration cannot be used: {error}").format(error=error)) from None
            if key is not None:
                with self._lock:
                    if len(self._configs) >= self.CONFIGS_KEPT:
                        self._configs.clear()
                    self._configs[key] = config
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
                try:
                    client = _new_sdk_client(config)
                except Exception as error:  # checked above; whatever is left is still one line
                    raise UsageError(_("No DashScope client can be made for {url}: {error}").format(
                        url=repr(config.protocol_base_url),
                        error=_shortened(redact(str(error) or type(error).__name__, config.api_key), 200),
                    )) from None
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
                # A surrogate pair may come split across two frames (the JSON escapes "\\ud83d",
                # then "\\ude00"): the thinking's pieces are joined here, before they are shown;
                # the answer's, where the views read the answer (not once per frame).
                thought_mender = _Mender()
                try:
                    for last in reader:  # until the answer's first text: thinking, search results
                        if last.search_info is not None:
                            _keep_sources(state, last.search_info)
                        choices = last.choices
                        if not choices:
                            continue
                        choice = choices[0]
                        delta = choice.delta
                        if delta.tool_calls:
                            state.add_tool_calls(delta.tool_calls)
                        thought, text = delta.reasoning_content, delta.content
                        if thought and (thought_mender.held or not _encodable(thought)):
                            thought = thought_mender(thought)
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
                            elif delta.tool_calls:  # a call after some text
                                state.add_tool_calls(delta.tool_calls)
                            elif delta.reasoning_content:
                                thought = delta.reasoning_content
                                if thought_mender.held or not _encodable(thought):
                                    thought = thought_mender(thought)
                                yield ReasoningDelta(thought)
                    if thought_mender.held:
                        yield ReasoningDelta(thought_mender.rest())
                finally:
                    frames.close()
                    _read_last_frame(state, last, choice)
                if state.finish_reason is None:
                    raise QwenAPIError(
                        "StreamCut", _("the stream ended before the answer was finished"), request_id=state.request_id
                    )
                return
            except QwenAPIError as error:
                failure = error
            except Exception as error:  # every SDK / transport failure becomes one line
                failure = self._translate(error, client, state)
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
            state.tool_calls.clear()

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
                yield ReasoningDelta(mend(choice.message.reasoning_content))
            if choice.message.tool_calls:
                state.add_tool_calls(choice.message.tool_calls)
            if choice.message.content:
                state.answer.append(mend(choice.message.content))
                yield ANSWER_STARTED
        else:
            state.finish_reason = "stop"

    def _translate(self, error: Exception, client: "dashscope.Client", state: CallState) -> QwenAPIError:
        """One ``QwenAPIError`` for any failure of the SDK or the transport, its text on one line.

        The key is masked in whatever the error says before the text is shortened, so that no
        part of it is left at a cut.
        """
        import httpx
        from dashscope.v2 import errors as sdk_errors

        config = client.config
        base_url = config.protocol_base_url
        said = redact(str(error), config.api_key)
        status = getattr(error, "status_code", None)
        html = _html_answer(error, said)
        if html is not None:
            translated = QwenAPIError(
                "NotDashScope",
                _("the server at {url} answered with an HTML page (HTTP {status}), not DashScope's API").format(
                    url=_shortened(base_url, 60), status=html),
                request_id=state.request_id,
                status=html if html >= 400 else None,
            )
        elif isinstance(error, sdk_errors.APITimeoutError):
            translated = QwenAPIError("Timeout", _("no answer from {url} in time").format(url=base_url))
        elif isinstance(error, sdk_errors.APIConnectionError):
            translated = QwenAPIError("ConnectionError", _("cannot reach {url} ({reason})").format(
                url=base_url, reason=redact(_reason(error), config.api_key)))
        elif isinstance(error, sdk_errors.DashScopeError) and error.code:
            translated = QwenAPIError(
                error.code,
                redact(error.message or _("no message"), config.api_key),
                request_id=error.request_id or state.request_id,
                status=status,
                retry_after=_retry_after(error.headers),
            )
        elif isinstance(error, sdk_errors.DashScopeError) and not status and "SSE payload" in said:
            translated = QwenAPIError(
                "MalformedFrame",
                _("a frame of the stream from {url} is not DashScope's JSON ({reason})").format(
                    url=_shortened(base_url, 60), reason=_shortened(redact(error.message or said, config.api_key), 60)),
                request_id=state.request_id,
            )
        elif isinstance(error, sdk_errors.DashScopeError):
            translated = QwenAPIError(
                f"HTTP{status}" if status else "DashScopeError",
                redact(error.message or said, config.api_key),
                request_id=error.request_id or state.request_id,
                status=status,
            )
        elif type(error).__name__ == "SSEError":  # httpx_sse (a TransportError): the answer is no event stream
            translated = QwenAPIError(
                "NotAStream",
                _("the server at {url} did not answer with an event stream (it sent {content_type})").format(
                    url=_shortened(base_url, 60), content_type=_sent_content_type(said)),
                request_id=state.request_id,
            )
        elif isinstance(error, httpx.TimeoutException):
            translated = QwenAPIError(
                "StreamStalled",
                _("no data from {url} for {seconds:g} s").format(url=base_url, seconds=config.timeout),
                request_id=state.request_id,
            )
        elif isinstance(error, (httpx.TransportError, httpx.StreamError)):
            translated = QwenAPIError(
                "StreamCut",
                _("the connection to {url} closed mid-answer ({reason})").format(url=base_url, reason=type(error).__name__),
                request_id=state.request_id,
            )
        elif type(error).__name__ == "ValidationError":  # pydantic: a frame of another shape
            translated = QwenAPIError(
                "MalformedFrame",
                _("a frame of the stream from {url} does not have the shape of DashScope's answers ({reason})").format(
                    url=_shortened(base_url, 60), reason=_first_validation_error(error, config.api_key)),
                request_id=state.request_id,
            )
        elif isinstance(error, (ValueError, TypeError, LookupError, AttributeError)):  # the SDK read a frame it did not expect
            translated = QwenAPIError(
                "MalformedFrame",
                _("what {url} sent could not be read as DashScope's answer ({reason})").format(
                    url=_shortened(base_url, 60), reason=f"{type(error).__name__}: {_shortened(said, 60)}"),
                request_id=state.request_id,
            )
        else:
            translated = QwenAPIError(type(error).__name__, said or _("unexpected failure"), request_id=state.request_id)
        return translated

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def _encodable(text: str) -> bool:
    """Whether the text can be written out (UTF-8 has no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def mend(text: str) -> str:
    """Surrogate pairs decoded into their characters; a lone surrogate left becomes U+FFFD."""
    if _encodable(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class _Mender:
    """Joins text pieces whose surrogate pairs were split between them, then decodes them."""

    def __init__(self) -> None:
        self.held = ""  # a high surrogate that ended the last piece, waiting for its pair

    def __call__(self, text: str) -> str:
        text, self.held = self.held + text, ""
        if "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], text[-1]
        return mend(text)

    def rest(self) -> str:
        """What is held when the text ends: a lone half of a pair, replaced."""
        held, self.held = self.held, ""
        return mend(held)


def _file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is written, replaced or made readable (``chmod``: its ctime)."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino


def _config_inputs() -> tuple[Any, ...] | None:
    """What dashscope's ``resolve_config`` reads besides its arguments, as a key: its environment
    variables, the values set on ``dashscope.settings``, and its two files (by change time).
    ``None`` where they cannot all be told (another SDK version): resolved every time then."""
    inputs = _dashscope_inputs()
    if inputs is None:
        return None
    variables, setting_names, config_variable, default_config, key_file_variable, default_key_file = inputs
    from dashscope.v2._config import settings

    environ = os.environ
    try:
        explicit = tuple(settings.get_explicit(name) for name in setting_names)
        hash(explicit)
    except Exception:  # a value that is not a plain one: never wrong to resolve again
        return None
    config_file = os.path.expanduser(environ.get(config_variable) or default_config)
    key_file = os.path.expanduser(environ.get(key_file_variable) or default_key_file)
    return (tuple(environ.get(name) for name in variables), explicit,
            _file_stamp(config_file), _file_stamp(key_file), config_file, key_file)


@functools.lru_cache(maxsize=1)
def _dashscope_inputs() -> tuple[tuple[str, ...], tuple[str, ...], str, str, str, str] | None:
    """The names dashscope's configuration reads: its variables, settings and default files."""
    try:
        from dashscope.v2 import _config

        variables = tuple(sorted(value for name, value in vars(_config).items()
                                 if name.endswith("_ENV") and isinstance(value, str)))
        setting_names = tuple(sorted(name for name, value in vars(type(_config.settings)).items()
                                     if isinstance(value, property)))
        found = (variables, setting_names, _config._CONFIG_PATH_ENV, _config._DEFAULT_CONFIG_PATH,
                 _config._API_KEY_FILE_PATH_ENV, _config._DEFAULT_API_KEY_FILE_PATH)
    except (ImportError, AttributeError):
        return None
    if "DASHSCOPE_API_KEY" not in variables or "api_key" not in setting_names:
        return None
    return found


def _resolved_config(connection: Connection) -> Any:
    """dashscope's configuration for ``connection``, its key wrapped and its base URL checked."""
    from IPython.core.error import UsageError
    from dashscope.v2._config import resolve_config

    from .options import url_problem

    with warnings.catch_warnings():
        # dashscope suggests a workspace on every client; notebooks need not see it.
        warnings.filterwarnings("ignore", message="no workspace configured")
        config = resolve_config(
            api_key=connection.api_key,
            base_url=connection.base_url,
            protocol=connection.protocol,
            timeout=connection.timeout,
        )
    config = dataclasses.replace(config, api_key=secret(config.api_key))
    if config.configured_base_url and not connection.base_url_as_given:
        # dashscope uses a configured URL verbatim for every protocol: /api/v1 with the
        # OpenAI protocol would post to /api/v1/chat/completions, which does not exist.
        root = dashscope_root_for(config.configured_base_url, config.protocol)
        config = dataclasses.replace(config, configured_base_url=root, protocol_base_url=root)
    for url in dict.fromkeys(filter(None, (config.configured_base_url, config.protocol_base_url))):
        problem = url_problem(url)
        if problem:
            raise UsageError(_(
                "The base URL {url} cannot be used: {problem}. Set a working one in "
                "DASHSCOPE_BASE_URL, QwenMagic.base_url or --base-url."
            ).format(url=_shortened(repr(url), 100), problem=problem))
    return config


def _new_sdk_client(config: Any) -> "dashscope.Client":
    import dashscope

    return dashscope.Client(
        api_key=config.api_key,
        base_url=config.configured_base_url,
        workspace=config.workspace,
        region=config.region,
        protocol=config.protocol,
        timeout=config.timeout,
        # Streams are never retried by the SDK; retries are ours, before any text.
        max_retries=0,
    )


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
