"""The HTTP side: routing, the chat endpoints, control calls, the server and its life cycle."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from ..tokens import count_chat_input, count_text
from .batches import BatchService, is_batch_path
from .cache import ContextCache
from .frames import _Answer, _compact, _CompatibleEncoder, _NativeEncoder
from .replies import (
    _CHAT_COMPLETIONS,
    _JSON_CONTENT_TYPE,
    _MODELS,
    _MULTIMODAL_GENERATION,
    _STREAM_CONTENT_TYPE,
    _TEXT_GENERATION,
    _TOKENIZER,
    COMPATIBLE_PREFIX,
    CONTROL_PREFIX,
    INVALID_API_KEY,
    LISTED_MODELS,
    MISSING_MODEL_PREFIX,
    NATIVE_PREFIX,
    RecordedRequest,
    Reply,
    _Failure,
    _failure,
    _last_user_text,
    _new_request_id,
    tool_message_problem,
)

# --------------------------------------------------------------------------- shared state


class _Registry:
    """Scripted replies and recorded requests, shared by the handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queue: deque[Reply] = deque()
        self._forever: Reply | None = None
        self._chat: list[RecordedRequest] = []
        self._all: list[RecordedRequest] = []
        self._load = _Load()
        self.context_cache = ContextCache()  # explicit-cache prefixes the requests marked

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
            self._load = _Load()
        self.context_cache.reset()

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

    # ---- load, for jobs over many rows (kept apart from the scripted queue above)

    def reply_for(self, record: RecordedRequest) -> Reply | None:
        """The reply to one chat request: throttled at the load's rate, else the first reply
        scripted for text the request's last user message holds, else the queue, else an
        unscripted answer after the load's delay."""
        with self._lock:
            load = self._load
            if load.throttle_rate and load.random.random() < load.throttle_rate:
                load.throttled += 1
                return Reply(error_code="Throttling.RateQuota")
            if load.matching:
                said = _last_user_text(record.messages)
                for needle, reply in load.matching:
                    if needle in said:
                        return reply
        reply = self.next_reply()
        if reply is None and load.delay:
            return Reply(first_token_delay=load.delay)
        return reply

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Count a chat request as being answered, for the peak of requests at once."""
        with self._lock:
            load = self._load
            load.in_flight += 1
            load.peak = max(load.peak, load.in_flight)
        try:
            yield
        finally:
            with self._lock:
                load.in_flight -= 1

    def set_load(self, *, delay: float = 0.0, throttle_rate: float = 0.0, seed: int = 0) -> None:
        load = _Load(delay, throttle_rate, seed)
        with self._lock:
            load.matching = self._load.matching
            self._load = load

    def script_matching(self, contains: str, reply: Reply) -> None:
        if not isinstance(reply, Reply):
            raise TypeError(f"expected Reply, got {type(reply).__name__}")
        with self._lock:
            self._load.matching.append((contains, reply))


class _Load:
    """How the gateway behaves under load, for jobs over many rows: a delay for every
    unscripted answer, a share of requests throttled, replies chosen by what a request asks,
    and the most chat requests seen answering at once."""

    def __init__(self, delay: float = 0.0, throttle_rate: float = 0.0, seed: int = 0) -> None:
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 600:
            raise ValueError('"delay" must be a number of seconds from 0 to 600')
        if not isinstance(throttle_rate, (int, float)) or isinstance(throttle_rate, bool) or not 0 <= throttle_rate < 1:
            raise ValueError('"throttle_rate" must be a fraction from 0 up to (not including) 1')
        self.delay = float(delay)
        self.throttle_rate = float(throttle_rate)
        self.random = random.Random(seed)
        self.matching: list[tuple[str, Reply]] = []
        self.in_flight = 0
        self.peak = 0
        self.throttled = 0


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

    def do_DELETE(self) -> None:
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
            if is_batch_path(path):  # files and batches: multipart uploads, ids in the path
                record = RecordedRequest(self.command, path, headers, body if isinstance(body, dict) else None, "openai")
                self.server.registry.record(record, chat=False)
                return self.server.gateway._batches.handle(self, record, raw)
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
            if route[2]:
                with self.server.registry.answering():
                    getattr(self, route[3])(record)
            else:
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

    def _answer_for(self, record: RecordedRequest, options: Mapping[str, Any]) -> _Answer:
        """The reply to a chat request (scripted, matched by content, or the default one), with the
        context cache applied; ``options`` are where the protocol puts them (native parameters,
        the compatible body)."""
        registry = self.server.registry
        return _Answer.compose(
            registry.context_cache.applied(registry.reply_for(record), str(record.model), record.messages),
            model=str(record.model),
            messages=record.messages,
            thinking=options.get("enable_thinking") is True,
            json_mode=_json_mode(options),
            parameters=record.parameters,
            schema=_answer_schema(options),
        )

    def _native_chat(self, record: RecordedRequest) -> None:
        failure = self._gate(record, "native") or _tools_problem(record)
        if failure:
            return self._reject("native", failure)
        parameters = record.parameters
        answer = self._answer_for(record, parameters)
        encoder = _NativeEncoder(
            answer,
            incremental=parameters.get("incremental_output") is True,
            multimodal=record.path == _MULTIMODAL_GENERATION,
        )
        self._respond(answer, encoder, protocol="native", streaming=record.stream)

    def _compatible_chat(self, record: RecordedRequest) -> None:
        failure = self._gate(record, "openai") or _tools_problem(record)
        if failure:
            return self._reject("openai", failure)
        body = record.body or {}
        answer = self._answer_for(record, body)
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
        self.server.gateway._batches.reset()
        self._send_json(200, {"ok": True})

    def _control_batches(self, record: RecordedRequest) -> None:
        body = record.body or {}
        try:
            unknown = sorted(set(body) - {"stage_seconds", "lines", "capacity_refusals", "capacity_after"})
            if unknown:
                raise ValueError(f"unknown batch setting(s): {', '.join(unknown)}")
            lines = body.get("lines")
            if lines is not None and not isinstance(lines, dict):
                raise ValueError('"lines" must map custom_id to a reply object')
            self.server.gateway.configure_batches(
                stage_seconds=body.get("stage_seconds"),
                lines={key: Reply.from_dict(value) for key, value in lines.items()} if lines else None,
                capacity_refusals=body.get("capacity_refusals"),
                capacity_after=body.get("capacity_after") or 0,
            )
        except (TypeError, ValueError) as exc:
            return self._send_json(400, {"ok": False, "error": str(exc)})
        self._send_json(200, {"ok": True})

    def _control_requests(self, record: RecordedRequest) -> None:
        registry = self.server.registry
        everything = "all=1" in (urlsplit(self.path).query or "")
        recorded = registry.all_requests() if everything else registry.chat_requests()
        self._send_json(200, {"requests": [request.to_dict() for request in recorded]})


    def _control_load(self, record: RecordedRequest) -> None:
        body = record.body or {}
        try:
            self.server.registry.set_load(delay=body.get("delay", 0.0), throttle_rate=body.get("throttle_rate", 0.0),
                                          seed=body.get("seed", 0))
        except (TypeError, ValueError) as exc:
            return self._send_json(400, {"ok": False, "error": str(exc)})
        self._send_json(200, {"ok": True})


def _json_mode(parameters: Mapping[str, Any]) -> bool:
    """Whether the request asks for JSON (json_object, or a json_schema)."""
    response_format = parameters.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def _answer_schema(parameters: Mapping[str, Any]) -> Any:
    """The JSON Schema a json_schema request asks the answer to match, or None."""
    response_format = parameters.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    described = response_format.get("json_schema")
    return described.get("schema", {}) if isinstance(described, dict) else {}


def _tools_problem(record: RecordedRequest) -> _Failure | None:
    """The service's 400 for a tool message that answers no call before it."""
    problem = tool_message_problem(record.messages)
    return _failure("InvalidParameter", _new_request_id(), message=problem) if problem else None


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
    CONTROL_PREFIX + "/load": ("control", "POST", False, "_control_load"),


    CONTROL_PREFIX + "/batches": ("control", "POST", False, "_control_batches"),
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
        self._batches = BatchService()
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
            # Load the tokenizer (~0.4 s) now, not during the first request's headers. Its package
            # is imported here first: imported by two threads at once (this one and a caller's),
            # dashscope's circular imports can see each other half done.
            import dashscope  # noqa: F401

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
        """Forget scripted replies and recorded requests (and the Batch API's files, batches and settings)."""
        self._registry.reset()
        self._batches.reset()

    def configure_batches(
        self,
        *,
        stage_seconds: float | None = None,
        lines: Mapping[str, Reply] | None = None,
        capacity_refusals: int | None = None,
        capacity_after: int = 0,
    ) -> None:
        """Script the Batch API: seconds per stage (validating, in_progress, finalizing; 1 s unless
        set), the reply of given ``custom_id``s (an error reply fails that line), and how many batch
        creations to refuse with 429 for capacity (after accepting ``capacity_after`` more)."""
        self._batches.configure(stage_seconds=stage_seconds, lines=lines, capacity_refusals=capacity_refusals,
                                capacity_after=capacity_after)

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

    # ---- load, for jobs over many rows

    def load(self, *, delay: float = 0.0, throttle_rate: float = 0.0, seed: int = 0) -> None:
        """Answer every unscripted request after ``delay`` seconds, and ``throttle_rate`` of all
        chat requests (drawn with ``seed``) with 429 Throttling.RateQuota, as a busy service does."""
        self._registry.set_load(delay=delay, throttle_rate=throttle_rate, seed=seed)

    def script_matching(self, contains: str, reply: Reply) -> None:
        """Answer every request whose last user message contains ``contains`` with ``reply``
        (until :meth:`reset`), whatever order concurrent requests arrive in."""
        self._registry.script_matching(contains, reply)

    @property
    def peak_in_flight(self) -> int:
        """The most chat requests answered at once since the last :meth:`reset`."""
        return self._registry._load.peak

    @property
    def throttled(self) -> int:
        """Chat requests answered 429 by the load's throttle rate since the last :meth:`reset`."""
        return self._registry._load.throttled

    def _access(self, method: str, path: str, model: str | None, status: int) -> None:
        if self._log is not None:
            self._log(f"{method} {path}{f' [{model}]' if model else ''} -> {status or 'dropped'}")


def banner(gateway: Gateway) -> str:
    """The line ``serve`` prints: where the gateway is, and how to point a notebook at it."""
    return (
        f"qwen_magic offline gateway at {gateway.base_url} - in a notebook: "
        f"%env DASHSCOPE_BASE_URL={gateway.base_url} and any key, e.g. %env DASHSCOPE_API_KEY=sk-offline "
        f"(compatible mode: {gateway.compatible_base_url}; Ctrl-C stops)"
    )


def serve(host: str = "127.0.0.1", port: int = 8765, *, quiet: bool = False,
          announce: Callable[[Gateway], str] = banner) -> None:
    """Run a gateway in the foreground until Ctrl-C.

    Prints one line saying how to point a notebook at it (``announce``: the command line
    gives it in the user's language); unless ``quiet``, also one line per request (method,
    path, model, status; never headers).
    """

    def log(line: str) -> None:
        print(line, flush=True)

    gateway = Gateway(host, port, log=None if quiet else log).start()
    print(announce(gateway), flush=True)
    try:
        while True:
            # Short sleeps: Ctrl-C may reach a server thread, and then only a main thread that
            # wakes up notices it.
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
