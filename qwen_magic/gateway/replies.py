"""What the gateway answers: scripted replies, failures, recorded requests, default answers."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

from ..tokens import count_chat_input, count_text

NATIVE_PREFIX = "/api/v1"
COMPATIBLE_PREFIX = "/compatible-mode/v1"
CONTROL_PREFIX = "/_gateway"

_TEXT_GENERATION = NATIVE_PREFIX + "/services/aigc/text-generation/generation"
_MULTIMODAL_GENERATION = NATIVE_PREFIX + "/services/aigc/multimodal-generation/generation"
_TOKENIZER = NATIVE_PREFIX + "/tokenizer"
_CHAT_COMPLETIONS = COMPATIBLE_PREFIX + "/chat/completions"
_MODELS = COMPATIBLE_PREFIX + "/models"

#: Tokens the gateway refuses, so the "wrong key" path can be exercised.
INVALID_API_KEY = "sk-invalid"
#: Models whose name starts with this do not exist, so that path can be exercised too.
MISSING_MODEL_PREFIX = "no-such-"
#: What ``GET /compatible-mode/v1/models`` lists (the gateway accepts any other name as well).
LISTED_MODELS = (
    "qwen-plus",
    "qwen-max",
    "qwen-turbo",
    "qwen-flash",
    "qwen3-max",
    "qwq-plus",
    "qwen-vl-plus",
    "qwen-vl-max",
)

_ECHO_LIMIT = 60
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_STREAM_CONTENT_TYPE = "text/event-stream;charset=UTF-8"
_JSON_CONTENT_TYPE = "application/json; charset=utf-8"


# --------------------------------------------------------------------------- errors

# DashScope error codes: the HTTP status they travel with and the message the
# service gives when nothing more specific is known.
_KNOWN_ERRORS: dict[str, tuple[int, str]] = {
    "InvalidParameter": (400, "Required parameter(s) missing or invalid, please check the request parameters."),
    "DataInspectionFailed": (400, "Input data may contain inappropriate content."),
    "Arrearage": (400, "Access denied, please make sure your account is in good standing."),
    "BadRequest.EmptyModel": (400, 'Required parameter "model" missing from request.'),
    "InvalidApiKey": (401, "Invalid API-key provided."),
    "AccessDenied": (403, "Access denied."),
    "AccessDenied.Unpurchased": (403, "Access to model denied. Please make sure you are eligible for using the model."),
    "AllocationQuota.FreeTierOnly": (
        403,
        "The free tier of the model has been exhausted. If you wish to continue access the model on a paid basis, "
        'please disable the "use free tier only" mode in the management console.',
    ),
    "ModelNotFound": (404, "Model not found."),
    "Model.NotExist": (404, "Model not exist."),
    "Throttling": (429, "Requests throttling triggered."),
    "Throttling.RateQuota": (429, "Requests rate limit exceeded, please try again later."),
    "Throttling.AllocationQuota": (429, "Allocated quota exceeded, please increase your quota limit."),
    "InternalError": (500, "An internal error has occurred, please try again later or contact service support."),
    "ServiceUnavailable": (503, "The service is temporarily unavailable, please try again later."),
    "GatewayTimeout": (504, "The gateway timed out waiting for the model, please try again later."),
}

# The code implied by a bare HTTP status (a Reply with a status but no code).
_CODE_FOR_STATUS = {
    400: "InvalidParameter",
    401: "InvalidApiKey",
    403: "AccessDenied",
    404: "ModelNotFound",
    429: "Throttling",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}

# Compatible mode reports errors with OpenAI-style codes and types; codes not
# listed here travel unchanged.
_COMPATIBLE_ERRORS: dict[str, tuple[str, str]] = {
    "InvalidApiKey": ("invalid_api_key", "invalid_request_error"),
    "InvalidParameter": ("invalid_parameter_error", "invalid_request_error"),
    "DataInspectionFailed": ("data_inspection_failed", "data_inspection_failed"),
    "ModelNotFound": ("model_not_found", "invalid_request_error"),
    "Model.NotExist": ("model_not_found", "invalid_request_error"),
    "Throttling": ("limit_requests", "limit_requests"),
    "Throttling.RateQuota": ("limit_requests", "limit_requests"),
    "Throttling.AllocationQuota": ("insufficient_quota", "insufficient_quota"),
    "InternalError": ("internal_error", "internal_error"),
}


@dataclass(frozen=True)
class _Failure:
    """One error as the gateway reports it, rendered per protocol."""

    status: int
    code: str
    message: str
    request_id: str
    retry_after: float | None = None

    def native_body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "request_id": self.request_id}

    def compatible_body(self) -> dict[str, Any]:
        default_type = "invalid_request_error" if self.status < 500 else "internal_error"
        code, kind = _COMPATIBLE_ERRORS.get(self.code, (self.code, default_type))
        return {
            "error": {"message": self.message, "type": kind, "param": None, "code": code},
            "request_id": self.request_id,
        }


def _failure(code: str, request_id: str, *, status: int | None = None, message: str | None = None) -> _Failure:
    known_status, known_message = _KNOWN_ERRORS.get(code, (400, code))
    return _Failure(status or known_status, code, message or known_message, request_id)


def _new_request_id() -> str:
    return str(uuid.uuid4())


# --------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class Reply:
    """What the gateway sends back for one chat request.

    Frames are the reasoning text (split by ``chunk_size``) followed by the
    answer (``chunks``, or ``text`` split by ``chunk_size``). ``error_after``,
    ``cut_after`` and ``stall_after`` count those frames. An error is scripted
    with ``error_code`` and/or an HTTP ``status`` of 400 or more; a status left
    at 200 takes the usual status of the code (429 for throttling, ...).

    As the service does: ``search_results`` are sent only to a request with
    ``enable_search``, the usage then counting one search (``plugins.search``);
    the sources go in the first native frame (later frames carry an empty list)
    and only with ``search_options.enable_source``; compatible mode sends none.
    ``cached_tokens`` (read from the context cache) and ``cache_creation_tokens``
    (written to it) are reported in ``usage.prompt_tokens_details`` and counted
    in the input. ``usage`` overrides any figure by name, e.g. ``{"cached_tokens":
    N}`` for the vision models that report cache reads at the top of the usage.
    """

    text: str | None = None
    chunks: list[str] | None = None
    chunk_size: int = 8
    reasoning: str = ""
    first_token_delay: float = 0.0
    frame_delay: float = 0.0
    usage: dict | None = None
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    finish_reason: str = "stop"
    status: int = 200
    error_code: str | None = None
    error_message: str | None = None
    error_after: int | None = None
    error_as_sse: bool = False
    retry_after: float | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall: float = 30.0
    search_results: list[dict] | None = None
    request_id: str | None = None
    # What no well-behaved server sends, for the client's error paths: ``body`` answers the
    # request as it is (with ``status`` and ``content_type``: a proxy's HTML page); each of
    # ``raw_frames`` is sent as one stream event's data before the answer's frames (a
    # malformed frame); ``ascii_json`` writes frames with JSON escapes, so that a text piece
    # may end in half a surrogate pair as the service's frames sometimes do.
    body: str | None = None
    content_type: str = "text/html"
    raw_frames: list[str] | None = None
    ascii_json: bool = False
    # Tool calls the answer makes, after its text: each {"name", "arguments" (a dict, or the
    # text as sent, which may be broken), "id" (made up if absent)}. Streamed as the service
    # does: the id and name in a call's first fragment, later fragments with an empty id and
    # the arguments in pieces of ``chunk_size``; the finish reason is then "tool_calls".
    tool_calls: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if self.chunks is not None and not all(isinstance(chunk, str) for chunk in self.chunks):
            raise TypeError("chunks must be a list of strings")
        for name in ("first_token_delay", "frame_delay", "stall"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("error_after", "cut_after", "stall_after", "cached_tokens", "cache_creation_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        for call in self.tool_calls or ():
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise TypeError("each tool call needs a name")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")

    @property
    def is_error(self) -> bool:
        """Whether this reply ends in an error (before or during the stream)."""
        return self.error_code is not None or self.status >= 400

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reply:
        """Build a reply from JSON (the control endpoint and the command line use this)."""
        if not isinstance(data, Mapping):
            raise TypeError("a reply must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown reply field(s): {', '.join(unknown)}")
        values = dict(data)
        if values.get("chunks") is not None:
            values["chunks"] = list(values["chunks"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that :meth:`from_dict` reads back."""
        return asdict(self)


def _masked(name: str, value: str) -> str:
    lowered = name.lower()
    if "authorization" in lowered or "api-key" in lowered or "apikey" in lowered:
        return "Bearer ***" if value.lower().startswith("bearer ") else "***"
    return value


@dataclass(frozen=True, repr=False)
class RecordedRequest:
    """One request as the gateway received it (header names in lower case).

    Its repr and :meth:`to_dict` mask credentials, so a failing test or a log
    line never shows a key; :attr:`api_key` still reads the real one.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    protocol: str  # "native" | "openai" | "tokenizer" | "control"

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def messages(self) -> list[dict]:
        if not isinstance(self.body, dict):
            return []
        if self.protocol == "openai":
            messages = self.body.get("messages")
        else:
            messages = (self.body.get("input") or {}).get("messages")
        return list(messages) if isinstance(messages, list) else []

    @property
    def parameters(self) -> dict[str, Any]:
        """Native ``parameters``, or the top-level options of a compatible-mode body."""
        if not isinstance(self.body, dict):
            return {}
        if self.protocol == "openai":
            return {key: value for key, value in self.body.items() if key not in ("model", "messages")}
        parameters = self.body.get("parameters")
        return dict(parameters) if isinstance(parameters, dict) else {}

    @property
    def api_key(self) -> str | None:
        """The bearer token, or None when no Authorization header came."""
        value = self.headers.get("authorization", "").strip()
        if value.lower().startswith("bearer"):
            value = value[len("bearer") :].strip()
        return value or None

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed answer."""
        if self.protocol == "openai":
            return isinstance(self.body, dict) and self.body.get("stream") is True
        return _wants_sse(self.headers)

    def __repr__(self) -> str:
        return f"RecordedRequest({self.method} {self.path} protocol={self.protocol} model={self.model!r})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form with credentials masked, so a key is never echoed back."""
        return {
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "headers": {name: _masked(name, value) for name, value in self.headers.items()},
            "body": self.body,
        }


def _wants_sse(headers: Mapping[str, str]) -> bool:
    return (
        headers.get("x-dashscope-sse", "").strip().lower() == "enable"
        or "text/event-stream" in headers.get("accept", "").lower()
    )


# --------------------------------------------------------------------------- answers


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def _last_user_text(messages: Iterable[Mapping[str, Any]]) -> str:
    for message in reversed(list(messages)):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _echo(text: str) -> str:
    collapsed = " ".join(text.split())
    if len(collapsed) > _ECHO_LIMIT:
        return collapsed[: _ECHO_LIMIT - 1] + "…"
    return collapsed


_ASKS_FOR_CODE = re.compile(r"\b(code|python|function|script|snippet|pandas)\b|代码|函数|脚本", re.IGNORECASE)


def default_answer(model: str, messages: Iterable[Mapping[str, Any]], *, json_mode: bool = False) -> str:
    """The unscripted answer: says what answered, names the model, echoes the prompt.

    It keeps to the form asked for, so that a notebook runs through offline: a JSON
    object in JSON mode, and a code block when the prompt asks for code.
    """
    said = _last_user_text(messages)
    results = _tool_results(messages)
    if results is not None and not json_mode:
        return f"The offline gateway answering as {model} read what the tools returned: {_echo(results)}"
    if json_mode:
        return json.dumps(
            {"answer": "offline gateway: no model ran", "model": model, "you_said": _echo(said)},
            ensure_ascii=False,
        )
    if _ASKS_FOR_CODE.search(said):
        return (
            f"The offline gateway answering as {model} cannot write code for you, "
            "but here is a block of the kind you asked for:\n\n"
            f"```python\n# offline gateway: no model ran\nprint({_echo(said)!r})\n```"
        )
    if _CJK.search(said):
        return (
            f"这是 qwen_magic 离线网关（模型 {model}）的回答。你说：{_echo(said)}\n\n"
            "**离线模式**：没有调用任何模型，这个回答是固定的。"
            "把 `DASHSCOPE_BASE_URL` 指向 DashScope 即可获得真实的回答。"
        )
    return (
        f"This is the qwen_magic offline gateway answering as {model}. You said: {_echo(said) or '(nothing)'}\n\n"
        "**Offline mode**: no model ran, this answer is canned. "
        "Point `DASHSCOPE_BASE_URL` at DashScope for real answers."
    )


def default_reasoning(model: str, messages: Iterable[Mapping[str, Any]]) -> str:
    """The unscripted thinking text, for requests with ``enable_thinking``."""
    said = _last_user_text(messages)
    if _CJK.search(said):
        return f"用户说：“{_echo(said)}”。我是离线网关，不是模型，所以给出固定的回答，并说明模型是 {model}。"
    return (
        f"The user wrote “{_echo(said)}”. I am the offline gateway, not a model, "
        f"so I will give my fixed answer and name the model, {model}."
    )


def _split(text: str, size: int) -> list[str]:
    return [text[start : start + size] for start in range(0, len(text), size)]


_USAGE_ALIASES = {
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "completion_tokens_details": "output_tokens_details",
}


def _template_extra_tokens(model: str, thinking: bool) -> int:
    """What the server's template adds for this model (the catalog knows), as billing does."""
    from ..catalog import builtin_catalog

    info = builtin_catalog().get(model)
    return info.extra_input_tokens(thinking) if info else 0


def _search_options(parameters: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The request's search options when it asks for a web search (both protocols), else None."""
    if parameters.get("enable_search") is not True:
        return None
    options = parameters.get("search_options")
    return options if isinstance(options, Mapping) else {}


def _cache_details(cached: int, written: int) -> dict[str, Any]:
    """``prompt_tokens_details`` as the service sends it (an explicit-cache write names its kind)."""
    details: dict[str, Any] = {"cached_tokens": cached}
    if written:
        details.update(cache_creation={"ephemeral_5m_input_tokens": written}, cache_creation_input_tokens=written,
                       cache_type="ephemeral")
    return details


def _final_usage(
    messages: list[dict],
    text: str,
    reasoning: str,
    reply: Reply,
    *,
    model: str,
    thinking: bool,
    search: Mapping[str, Any] | None,
    extra_input: int = 0,
) -> dict:
    """Billing figures in native names; a scripted override wins key by key.

    ``extra_input``: input beyond the messages' text (the tools, the calls sent back).
    """
    reasoning_tokens = count_text(reasoning)
    cached, written = reply.cached_tokens, reply.cache_creation_tokens
    input_tokens = count_chat_input(messages, extra_tokens=_template_extra_tokens(model, thinking) + extra_input)
    usage: dict[str, Any] = {
        # What was read from or written to the cache is part of the input.
        "input_tokens": max(input_tokens, cached + written),
        "output_tokens": count_text(text) + reasoning_tokens,
    }
    if reasoning:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    if cached or written:
        usage["prompt_tokens_details"] = _cache_details(cached, written)
    if search is not None:
        usage["plugins"] = {"search": {"count": 1, "strategy": search.get("search_strategy", "turbo")}}
    for key, value in (reply.usage or {}).items():
        usage[_USAGE_ALIASES.get(key, key)] = value
    usage.setdefault("total_tokens", usage["input_tokens"] + usage["output_tokens"])
    ordered = {key: usage.pop(key) for key in ("input_tokens", "output_tokens", "total_tokens")}
    ordered.update(usage)
    return ordered


# --------------------------------------------------------------------------- tools and JSON


def _tool_results(messages: Iterable[Mapping[str, Any]]) -> str | None:
    """The tool results that end the conversation (the model's turn to answer), or None."""
    results = []
    for message in reversed(list(messages)):
        if not isinstance(message, Mapping) or message.get("role") != "tool":
            break
        results.append(_text_of(message.get("content")))
    return "; ".join(reversed(results)) if results else None


def tool_message_problem(messages: Iterable[Mapping[str, Any]]) -> str | None:
    """Why the service would refuse the messages' tool turns (400), or None.

    A tool message must answer a call of the assistant message before it (other tool
    messages may come between), by the call's id.
    """
    open_calls: set[str] | None = None
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        if role == "tool":
            if open_calls is None:
                return 'messages with role "tool" must be a response to a preceding message with "tool_calls"'
            if message.get("tool_call_id") not in open_calls:
                return f'the tool message\'s tool_call_id {message.get("tool_call_id")!r} answers no call of the assistant message before it'
            continue
        calls = message.get("tool_calls") if role == "assistant" else None
        open_calls = {call.get("id") for call in calls if isinstance(call, Mapping)} if calls else None
    return None


def sample_of(schema: Any, depth: int = 0) -> Any:
    """A value that matches a JSON Schema (its common keywords): the offline json_schema answer."""
    if not isinstance(schema, Mapping) or depth > 10:
        return None
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if "anyOf" in schema and schema["anyOf"]:
        return sample_of(schema["anyOf"][0], depth + 1)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: sample_of(child, depth + 1) for name, child in properties.items()}
    if kind == "array":
        return [sample_of(schema.get("items") or {}, depth + 1)]
    return {"string": "offline", "integer": 1, "number": 1.5, "boolean": True}.get(str(kind))


def canned_tool_calls(parameters: Mapping[str, Any], messages: Iterable[Mapping[str, Any]]) -> list[dict] | None:
    """The unscripted answer to a request with tools, before any tool has answered: a call of
    each tool (the first only, unless ``parallel_tool_calls``) with its required arguments
    made up from their schema, so that an offline notebook shows the whole exchange."""
    tools = parameters.get("tools")
    listed = list(messages)
    if not isinstance(tools, list) or not tools or not listed or listed[-1].get("role") != "user":
        return None
    calls = []
    for tool in tools if parameters.get("parallel_tool_calls") is True else tools[:1]:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        schema = function.get("parameters") if isinstance(function.get("parameters"), Mapping) else {}
        properties = schema.get("properties") or {}
        required = [name for name in schema.get("required") or () if name in properties]
        calls.append({"name": function["name"],
                      "arguments": {name: sample_of(properties[name]) for name in required}})
    return calls or None


def tools_input_tokens(parameters: Mapping[str, Any], messages: Iterable[Mapping[str, Any]]) -> int:
    """What the tools' definitions and the calls sent back add to the billed input."""
    tools = parameters.get("tools")
    calls = [message["tool_calls"] for message in messages if isinstance(message, Mapping) and message.get("tool_calls")]
    total = count_text(json.dumps(tools, ensure_ascii=False)) if tools else 0
    return total + (count_text(json.dumps(calls, ensure_ascii=False)) if calls else 0)
