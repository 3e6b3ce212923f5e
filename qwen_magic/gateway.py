"""An offline DashScope gateway: the real wire protocol, scripted answers.

Tests, tutorials and demos point the real ``dashscope`` SDK at this loopback
server instead of Alibaba Cloud. It speaks DashScope's native protocol
(``/api/v1``) and the OpenAI-compatible mode (``/compatible-mode/v1``) over
real HTTP, so everything between the notebook and the socket runs for real:
the SDK's request building, SSE parsing, error mapping, retries and timeouts.

What the gateway answers is scripted with :class:`Reply`: text and how it is
cut into frames, reasoning, delays, usage figures, errors before or during
the stream, a cut connection or a stall. Without a script it gives a
deterministic answer that names the model and echoes the prompt.

Streams use ``Transfer-Encoding: chunked`` with hand-written framing, so a cut
connection is visible to the client as an incomplete body, exactly as a
dropped connection to the real service would be.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from .tokens import count_chat_input, count_text

__all__ = ["Gateway", "RecordedRequest", "Reply", "serve"]

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
    from .catalog import builtin_catalog

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
) -> dict:
    """Billing figures in native names; a scripted override wins key by key."""
    reasoning_tokens = count_text(reasoning)
    cached, written = reply.cached_tokens, reply.cache_creation_tokens
    input_tokens = count_chat_input(messages, extra_tokens=_template_extra_tokens(model, thinking))
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


@dataclass(frozen=True)
class _Piece:
    reasoning: bool
    text: str


@dataclass
class _Answer:
    """A reply resolved against one request: the frames and figures to send."""

    reply: Reply
    model: str
    request_id: str
    text: str
    reasoning: str
    pieces: list[_Piece]
    usage: dict[str, Any]
    sources: list[dict] | None = None  # what native frames carry as search_info, if any
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def compose(
        cls, reply: Reply | None, *, model: str, messages: list[dict], thinking: bool, json_mode: bool = False,
        parameters: Mapping[str, Any] | None = None,
    ) -> _Answer:
        reply = reply or Reply()
        search = _search_options(parameters or {}) if reply.search_results is not None else None
        canned = reply.text is None and reply.chunks is None
        if reply.chunks is not None:
            answer_pieces = list(reply.chunks)
        else:
            text = default_answer(model, messages, json_mode=json_mode) if reply.text is None else reply.text
            answer_pieces = _split(text, reply.chunk_size)
        reasoning = reply.reasoning
        if not reasoning and thinking and canned:
            reasoning = default_reasoning(model, messages)
        pieces = [_Piece(True, part) for part in _split(reasoning, reply.chunk_size)]
        pieces += [_Piece(False, part) for part in answer_pieces]
        if not pieces or pieces[-1].reasoning:
            # The finish_reason rides on an answer frame, even an empty one.
            pieces.append(_Piece(False, ""))
        text = "".join(answer_pieces)
        return cls(
            reply=reply,
            model=model,
            request_id=reply.request_id or _new_request_id(),
            text=text,
            reasoning=reasoning,
            pieces=pieces,
            usage=_final_usage(messages, text, reasoning, reply, model=model, thinking=thinking, search=search),
            sources=reply.search_results if search is not None and search.get("enable_source") is True else None,
        )

    @functools.cached_property
    def _chars_sent(self) -> tuple[list[int], list[int]]:
        """Characters (all, and of reasoning) sent after each frame, for running usage in O(1)."""
        total, reasoning = [0], [0]
        for piece in self.pieces:
            total.append(total[-1] + len(piece.text))
            reasoning.append(reasoning[-1] + (len(piece.text) if piece.reasoning else 0))
        return total, reasoning

    def usage_after(self, sent: int) -> dict[str, Any]:
        """Running usage once ``sent`` frames are out: output grows with the text sent."""
        usage = copy.deepcopy(self.usage)
        if sent >= len(self.pieces):
            return usage
        chars, reasoning_chars_sent = self._chars_sent
        total_chars = chars[-1]
        sent_chars = chars[sent]
        final_output = int(self.usage["output_tokens"])
        output = round(final_output * sent_chars / total_chars) if total_chars else 0
        usage["output_tokens"] = output
        usage["total_tokens"] = int(self.usage["total_tokens"]) - (final_output - output)
        details = usage.get("output_tokens_details")
        if isinstance(details, dict) and "reasoning_tokens" in details and self.reasoning:
            reasoning_chars = reasoning_chars_sent[sent]
            details["reasoning_tokens"] = round(int(details["reasoning_tokens"]) * reasoning_chars / len(self.reasoning))
        return usage

    def failure(self, *, mid_stream: bool) -> _Failure:
        reply = self.reply
        status = reply.status if reply.status >= 400 else None
        code = reply.error_code or _CODE_FOR_STATUS.get(reply.status, "InternalError")
        message = reply.error_message
        if message is None and mid_stream and code == "DataInspectionFailed":
            message = "Output data may contain inappropriate content."
        failure = _failure(code, self.request_id, status=status, message=message)
        if reply.retry_after is not None:
            failure = _Failure(failure.status, failure.code, failure.message, failure.request_id, reply.retry_after)
        return failure


# --------------------------------------------------------------------------- wire encoders


def _compact(payload: Any, *, ascii_only: bool = False) -> str:
    return json.dumps(payload, ensure_ascii=ascii_only, separators=(",", ":"))


class _NativeEncoder:
    """DashScope native frames: ``id:``/``event:``/``:HTTP_STATUS``/``data:`` events."""

    def __init__(self, answer: _Answer, *, incremental: bool, multimodal: bool) -> None:
        self._answer = answer
        self._incremental = incremental
        self._multimodal = multimodal
        self._event_id = 0

    def _content(self, text: str) -> Any:
        if self._multimodal:
            return [{"text": text}] if text else []
        return text

    def _message(self, text: str, reasoning: str) -> dict[str, Any]:
        message: dict[str, Any] = {"content": self._content(text), "role": "assistant"}
        if self._answer.reasoning:
            message["reasoning_content"] = reasoning
        return message

    def _payload(self, message: dict[str, Any], finish_reason: str, usage: dict[str, Any], *,
                 first: bool = True) -> dict[str, Any]:
        output: dict[str, Any] = {"choices": [{"message": message, "finish_reason": finish_reason}]}
        sources = self._answer.sources
        if sources is not None:
            # The service sends the sources once, in the first frame; later frames, an empty list.
            output["search_info"] = {"search_results": sources if first else []}
        return {"output": output, "usage": usage, "request_id": self._answer.request_id}

    def _event(self, kind: str, status: int, payload: dict[str, Any]) -> bytes:
        return self._raw(kind, status, _compact(payload, ascii_only=self._answer.reply.ascii_json))

    def _raw(self, kind: str, status: int, data: str) -> bytes:
        self._event_id += 1
        return f"id:{self._event_id}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{data}\n\n".encode()

    def raw_frame(self, data: str) -> bytes:
        return self._raw("result", 200, data)

    def frame(self, index: int) -> bytes:
        answer = self._answer
        piece = answer.pieces[index]
        if self._incremental:
            text = "" if piece.reasoning else piece.text
            reasoning = piece.text if piece.reasoning else ""
        else:
            sent = answer.pieces[: index + 1]
            text = "".join(p.text for p in sent if not p.reasoning)
            reasoning = "".join(p.text for p in sent if p.reasoning)
        last = index == len(answer.pieces) - 1
        finish_reason = answer.reply.finish_reason if last else "null"
        payload = self._payload(self._message(text, reasoning), finish_reason, answer.usage_after(index + 1),
                                first=index == 0)
        return self._event("result", 200, payload)

    def closing(self) -> bytes:
        return b""

    def error_event(self, failure: _Failure) -> bytes:
        return self._event("error", failure.status, failure.native_body())

    def whole(self) -> dict[str, Any]:
        answer = self._answer
        message = self._message(answer.text, answer.reasoning)
        return self._payload(message, answer.reply.finish_reason, answer.usage_after(len(answer.pieces)))


def _compatible_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}
    renamed["output_tokens_details"] = "completion_tokens_details"
    return {renamed.get(key, key): value for key, value in usage.items()}


class _CompatibleEncoder:
    """OpenAI-compatible frames: ``data: {chunk}``, a usage chunk, ``data: [DONE]``."""

    def __init__(self, answer: _Answer, *, include_usage: bool) -> None:
        self._answer = answer
        self._include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        answer = self._answer
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{answer.request_id}",
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": answer.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self._include_usage:
            payload["usage"] = None
        payload.update(extra)
        return self.raw_frame(_compact(payload, ascii_only=answer.reply.ascii_json))

    @staticmethod
    def raw_frame(data: str) -> bytes:
        return f"data: {data}\n\n".encode()

    def frame(self, index: int) -> bytes:
        piece = self._answer.pieces[index]
        if piece.reasoning:
            delta: dict[str, Any] = {"content": None, "reasoning_content": piece.text}
        else:
            delta = {"content": piece.text}
        if index == 0:
            delta = {"role": "assistant", **delta}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    def closing(self) -> bytes:
        answer = self._answer
        finish = {"index": 0, "delta": {"content": ""}, "finish_reason": answer.reply.finish_reason, "logprobs": None}
        out = self._chunk([finish])
        if self._include_usage:
            out += self._chunk([], usage=_compatible_usage(answer.usage))
        return out + b"data: [DONE]\n\n"

    def error_event(self, failure: _Failure) -> bytes:
        return f"data: {_compact(failure.compatible_body())}\n\n".encode()

    def whole(self) -> dict[str, Any]:
        answer = self._answer
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        return {
            "id": f"chatcmpl-{answer.request_id}",
            "object": "chat.completion",
            "created": answer.created,
            "model": answer.model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.reply.finish_reason, "logprobs": None}],
            "usage": _compatible_usage(answer.usage),
            "system_fingerprint": None,
        }


# --------------------------------------------------------------------------- shared state


class _Registry:
    """Scripted replies and recorded requests, shared by the handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queue: deque[Reply] = deque()
        self._forever: Reply | None = None
        self._chat: list[RecordedRequest] = []
        self._all: list[RecordedRequest] = []

    def script(self, replies: tuple[Reply, ...], times: int | None) -> None:
        for reply in replies:
            if not isinstance(reply, Reply):
                raise TypeError(f"expected Reply, got {type(reply).__name__}")
        if times is not None and times < 0:
            raise ValueError("times must not be negative")
        with self._lock:
            if times is None:
                if replies:
                    self._queue.extend(replies[:-1])
                    self._forever = replies[-1]
            else:
                self._queue.extend(replies * times)

    def next_reply(self) -> Reply | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            return self._forever

    def record(self, request: RecordedRequest, *, chat: bool) -> None:
        with self._lock:
            self._all.append(request)
            if chat:
                self._chat.append(request)
                self._lock.notify_all()

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._forever = None
            self._chat.clear()
            self._all.clear()

    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._chat)

    def all_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._all)

    def wait_for(self, count: int, timeout: float) -> list[RecordedRequest]:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._chat) >= count, timeout):
                raise TimeoutError(f"expected {count} chat request(s) within {timeout} s, got {len(self._chat)}")
            return list(self._chat)


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests; one instance per connection."""

    protocol_version = "HTTP/1.1"
    server_version = "qwen-magic-gateway"
    sys_version = ""
    disable_nagle_algorithm = True  # frames must leave as soon as they are written
    server: _Server

    # Per-request bookkeeping.
    _status = 0
    _headers_sent = False

    # ---- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the default per-request stderr line is noise (and headers must never be logged)."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def end_headers(self) -> None:
        super().end_headers()
        self._headers_sent = True

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _pause(self, seconds: float) -> bool:
        """Sleep, but wake at once when the gateway stops; False means stop now."""
        if seconds <= 0:
            return not self.server.stopping.is_set()
        return not self.server.stopping.wait(seconds)

    def _abort(self) -> None:
        """End the connection without completing the response, as a dropped link would."""
        self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, *, request_id: str | None = None) -> None:
        headers = {"x-request-id": request_id} if request_id else {}
        body = json.dumps(payload, ensure_ascii=False).encode()
        self._send_bytes(status, body, _JSON_CONTENT_TYPE, headers)

    def _begin_stream(self, request_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", _STREAM_CONTENT_TYPE)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", request_id)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ---- routing

    def _dispatch(self) -> None:
        self._status = 0
        self._headers_sent = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        headers = {name.lower(): value for name, value in self.headers.items()}
        record: RecordedRequest | None = None
        try:
            raw = self._read_body()
            try:
                body = json.loads(raw) if raw.strip() else None
                parsed = True
            except ValueError:
                body, parsed = None, False
            route = _ROUTES.get(path)
            protocol = route[0] if route else _protocol_of(path)
            record = RecordedRequest(self.command, path, headers, body if isinstance(body, dict) else None, protocol)
            self.server.registry.record(record, chat=route is not None and route[2])
            if route is None or route[1] != self.command:
                status = 405 if route else 404
                return self._reject(protocol, _failure("NotFound", _new_request_id(), status=status,
                                                       message=f"No route for {self.command} {path}."))
            if not parsed or (raw.strip() and not isinstance(body, dict)):
                return self._reject(protocol, _failure("InvalidParameter", _new_request_id(),
                                                       message="The request body is not a JSON object."))
            getattr(self, route[3])(record)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self._abort()  # the client went away: nothing to report
        except Exception:  # a bug here must show, and still get the client an answer
            traceback.print_exc(file=sys.stderr)
            if self._headers_sent:
                self._abort()
            else:
                self._reject(record.protocol if record else "native", _failure("InternalError", _new_request_id()))
        finally:
            self.server.gateway._access(self.command, path, record.model if record else None, self._status)

    def _reject(self, protocol: str, failure: _Failure, *, sse: bool = False) -> None:
        """Send an error response before any answer, shaped for the protocol.

        ``sse`` sends it as a one-event stream with the error status, the way
        the service answers a streaming request it refuses.
        """
        headers = {"x-request-id": failure.request_id}
        if failure.retry_after is not None:
            headers["retry-after"] = f"{failure.retry_after:g}"
        if protocol == "openai":
            payload = failure.compatible_body()
            event = f"data: {_compact(payload)}\n\n"
        else:
            payload = failure.native_body()
            event = f"id:1\nevent:error\n:HTTP_STATUS/{failure.status}\ndata:{_compact(payload)}\n\n"
        if sse:
            self._send_bytes(failure.status, event.encode(), _STREAM_CONTENT_TYPE, headers)
        else:
            body = json.dumps(payload, ensure_ascii=False).encode()
            self._send_bytes(failure.status, body, _JSON_CONTENT_TYPE, headers)

    @staticmethod
    def _check_key(record: RecordedRequest, protocol: str, *, required: bool = True) -> _Failure | None:
        """Any non-empty key passes, except :data:`INVALID_API_KEY`; none at all is refused."""
        if "authorization" not in record.headers:
            if not required:
                return None
            return _failure("InvalidApiKey", _new_request_id(), message="No API-key provided.")
        if record.api_key in (None, INVALID_API_KEY):
            message = "Incorrect API key provided." if protocol == "openai" else None
            return _failure("InvalidApiKey", _new_request_id(), message=message)
        return None

    def _gate(self, record: RecordedRequest, protocol: str) -> _Failure | None:
        """The checks the real service makes before any model runs: key, then model."""
        failure = self._check_key(record, protocol, required=self.server.gateway.require_key)
        if failure:
            return failure
        request_id = _new_request_id()
        model = record.model
        if not isinstance(model, str) or not model:
            return _failure("BadRequest.EmptyModel", request_id)
        if model.startswith(MISSING_MODEL_PREFIX):
            if protocol == "openai":
                return _failure("ModelNotFound", request_id,
                                message=f"The model `{model}` does not exist or you do not have access to it.")
            return _failure("InvalidParameter", request_id, message="Model not exist.")
        return None

    # ---- chat

    def _native_chat(self, record: RecordedRequest) -> None:
        failure = self._gate(record, "native")
        if failure:
            return self._reject("native", failure)
        parameters = record.parameters
        answer = _Answer.compose(
            self.server.registry.next_reply(),
            model=str(record.model),
            messages=record.messages,
            thinking=parameters.get("enable_thinking") is True,
            json_mode=(parameters.get("response_format") or {}).get("type") == "json_object",
            parameters=parameters,
        )
        encoder = _NativeEncoder(
            answer,
            incremental=parameters.get("incremental_output") is True,
            multimodal=record.path == _MULTIMODAL_GENERATION,
        )
        self._respond(answer, encoder, protocol="native", streaming=record.stream)

    def _compatible_chat(self, record: RecordedRequest) -> None:
        failure = self._gate(record, "openai")
        if failure:
            return self._reject("openai", failure)
        body = record.body or {}
        answer = _Answer.compose(
            self.server.registry.next_reply(),
            model=str(record.model),
            messages=record.messages,
            thinking=body.get("enable_thinking") is True,
            json_mode=(body.get("response_format") or {}).get("type") == "json_object",
            parameters=record.parameters,
        )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        encoder = _CompatibleEncoder(answer, include_usage=include_usage)
        self._respond(answer, encoder, protocol="openai", streaming=record.stream)

    def _respond(self, answer: _Answer, encoder: _NativeEncoder | _CompatibleEncoder, *, protocol: str,
                streaming: bool) -> None:
        reply = answer.reply
        if reply.body is not None:
            return self._send_bytes(reply.status, reply.body.encode(), reply.content_type, {})
        if reply.is_error and (reply.error_after is None or not streaming):
            if not self._pause(reply.first_token_delay):
                return self._abort()
            return self._reject(protocol, answer.failure(mid_stream=False), sse=streaming and reply.error_as_sse)
        if streaming:
            return self._stream(answer, encoder)
        # A whole answer takes as long as its stream would have.
        delay = reply.first_token_delay + reply.frame_delay * (len(answer.pieces) - 1)
        if reply.stall_after is not None:
            delay += reply.stall
        if not self._pause(delay) or reply.cut_after is not None:
            return self._abort()
        self._send_json(200, encoder.whole(), request_id=answer.request_id)

    def _stream(self, answer: _Answer, encoder: _NativeEncoder | _CompatibleEncoder) -> None:
        reply = answer.reply
        total = len(answer.pieces)

        def clip(count: int | None) -> int | None:
            return None if count is None else min(count, total)

        error_at = clip(reply.error_after) if reply.is_error else None
        cut_at, stall_at = clip(reply.cut_after), clip(reply.stall_after)
        self._begin_stream(answer.request_id)
        for data in reply.raw_frames or ():
            self._write_chunk(encoder.raw_frame(data))
        for sent in range(total + 1):
            if sent == stall_at and not self._pause(reply.stall):
                return self._abort()
            if sent == error_at:
                self._write_chunk(encoder.error_event(answer.failure(mid_stream=sent > 0)))
                return self._end_chunks()
            if sent == cut_at:
                return self._abort()
            if sent == total:
                break
            if not self._pause(reply.first_token_delay if sent == 0 else reply.frame_delay):
                return self._abort()
            self._write_chunk(encoder.frame(sent))
        self._write_chunk(encoder.closing())
        self._end_chunks()

    # ---- other endpoints

    def _tokenizer(self, record: RecordedRequest) -> None:
        failure = self._gate(record, "native")
        if failure:
            return self._reject("native", failure)
        request_id = _new_request_id()
        body_input = (record.body or {}).get("input") or {}
        if isinstance(body_input.get("messages"), list):
            tokens = count_chat_input(body_input["messages"])
        elif isinstance(body_input.get("prompt"), str):
            tokens = count_text(body_input["prompt"])
        else:
            return self._reject("native", _failure("InvalidParameter", request_id,
                                                   message='Either "prompt" or "messages" must exist.'))
        self._send_json(200, {"output": {}, "usage": {"input_tokens": tokens}, "request_id": request_id},
                        request_id=request_id)

    def _models(self, record: RecordedRequest) -> None:
        failure = self._check_key(record, "openai")
        if failure:
            return self._reject("openai", failure)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in LISTED_MODELS]
        self._send_json(200, {"object": "list", "data": data})

    def _control_health(self, record: RecordedRequest) -> None:
        self._send_json(200, {"ok": True})

    def _control_script(self, record: RecordedRequest) -> None:
        body = record.body or {}
        try:
            replies = body.get("replies")
            if not isinstance(replies, list):
                raise ValueError('"replies" must be a list of reply objects')
            times = body.get("times", 1)
            if times is not None and (not isinstance(times, int) or isinstance(times, bool)):
                raise ValueError('"times" must be an integer or null')
            self.server.registry.script(tuple(Reply.from_dict(item) for item in replies), times)
        except (TypeError, ValueError) as exc:
            return self._send_json(400, {"ok": False, "error": str(exc)})
        self._send_json(200, {"ok": True, "queued": len(replies), "times": times})

    def _control_reset(self, record: RecordedRequest) -> None:
        self.server.registry.reset()
        self._send_json(200, {"ok": True})

    def _control_requests(self, record: RecordedRequest) -> None:
        registry = self.server.registry
        everything = "all=1" in (urlsplit(self.path).query or "")
        recorded = registry.all_requests() if everything else registry.chat_requests()
        self._send_json(200, {"requests": [request.to_dict() for request in recorded]})


# path -> (protocol, method, is a chat request, handler method)
_ROUTES: dict[str, tuple[str, str, bool, str]] = {
    _TEXT_GENERATION: ("native", "POST", True, "_native_chat"),
    _MULTIMODAL_GENERATION: ("native", "POST", True, "_native_chat"),
    _TOKENIZER: ("tokenizer", "POST", False, "_tokenizer"),
    _CHAT_COMPLETIONS: ("openai", "POST", True, "_compatible_chat"),
    _MODELS: ("openai", "GET", False, "_models"),
    CONTROL_PREFIX + "/health": ("control", "GET", False, "_control_health"),
    CONTROL_PREFIX + "/script": ("control", "POST", False, "_control_script"),
    CONTROL_PREFIX + "/reset": ("control", "POST", False, "_control_reset"),
    CONTROL_PREFIX + "/requests": ("control", "GET", False, "_control_requests"),
}


def _protocol_of(path: str) -> str:
    if path.startswith(COMPATIBLE_PREFIX):
        return "openai"
    if path.startswith(CONTROL_PREFIX):
        return "control"
    return "native"


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can drop its open connections on stop."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = gateway._registry
        self.stopping = gateway._stopping
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can hang on a
        # machine with broken DNS; a loopback server does not need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def drop_connections(self) -> None:
        """Shut every open connection, waking handlers blocked on reads or writes."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up (or the gateway stopping under a handler) is not an error.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the gateway binds to a loopback IPv4 address only, not {host!r}") from None
    if address.version != 4 or not address.is_loopback:
        raise ValueError(f"the gateway binds to a loopback IPv4 address only, not {host!r}")
    return host


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """A loopback DashScope gateway with scripted replies.

    The socket is bound on construction (so :attr:`url` is known at once, even
    with ``port=0``); :meth:`start` serves it from a daemon thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log: Callable[[str], None] | None = None,
        require_key: bool = True,
    ) -> None:
        # require_key=False serves like a self-hosted vLLM or Ollama, which take no key.
        self.require_key = require_key
        self._registry = _Registry()
        self._stopping = threading.Event()
        self._log = log
        self._server = _Server((_loopback_host(host), port), self)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- addresses

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self.port}"

    @property
    def base_url(self) -> str:
        """Native base URL: ``DASHSCOPE_BASE_URL`` or ``Client(base_url=...)``."""
        return self.url + NATIVE_PREFIX

    @property
    def compatible_base_url(self) -> str:
        """OpenAI-compatible base URL, for ``Client(protocol="openai", base_url=...)``."""
        return self.url + COMPATIBLE_PREFIX

    # ---- life cycle

    def start(self) -> Gateway:
        if self._closed:
            raise RuntimeError("a stopped gateway cannot be started again; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"qwen-magic-gateway:{self.port}",
                daemon=True,
            )
            self._thread.start()
            # Load the tokenizer (~0.4 s) now, not during the first request's headers.
            threading.Thread(target=count_text, args=("warm up",), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving, end streams in progress (stalled ones too) and free the port."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=2)
        self._server.server_close()
        self._server.drop_connections()

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._closed else "serving" if self._thread else "bound"
        return f"<Gateway {self.url} {state}>"

    # ---- scripting and inspection

    def script(self, *replies: Reply, times: int | None = 1) -> None:
        """Queue replies for the next chat requests, in order.

        ``times`` repeats the whole sequence; ``None`` queues it once and then
        repeats its last reply for every later request until :meth:`reset`.
        """
        self._registry.script(replies, times)

    def reset(self) -> None:
        """Forget scripted replies and recorded requests."""
        self._registry.reset()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every chat request received, in order (a copy)."""
        return self._registry.chat_requests()

    @property
    def all_requests(self) -> list[RecordedRequest]:
        """Every request received, tokenizer, model list and control calls included."""
        return self._registry.all_requests()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``n`` chat requests have arrived; raises TimeoutError otherwise."""
        return self._registry.wait_for(n, timeout)

    def _access(self, method: str, path: str, model: str | None, status: int) -> None:
        if self._log is not None:
            self._log(f"{method} {path}{f' [{model}]' if model else ''} -> {status or 'dropped'}")


def serve(host: str = "127.0.0.1", port: int = 8765, *, quiet: bool = False) -> None:
    """Run a gateway in the foreground until Ctrl-C.

    Prints one line saying how to point a notebook at it; unless ``quiet``,
    also one line per request (method, path, model, status; never headers).
    """

    def log(line: str) -> None:
        print(line, flush=True)

    gateway = Gateway(host, port, log=None if quiet else log).start()
    print(
        f"qwen_magic offline gateway at {gateway.base_url} - in a notebook: "
        f"%env DASHSCOPE_BASE_URL={gateway.base_url} and any key, e.g. %env DASHSCOPE_API_KEY=sk-offline "
        f"(compatible mode: {gateway.compatible_base_url}; Ctrl-C stops)",
        flush=True,
    )
    try:
        while True:
            # Short sleeps: Ctrl-C may reach a server thread, and then only a main thread that
            # wakes up notices it.
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
