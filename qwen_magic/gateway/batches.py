"""The Batch File API of the compatible mode: files and batches, as DashScope serves them.

``POST /files`` takes a JSONL of requests (multipart, ``purpose=batch``) and checks it as the
service does; ``POST /batches`` starts a batch over it. A batch moves validating ->
in_progress -> finalizing -> completed, each stage lasting ``stage_seconds`` (a gateway
setting, so that tests take a second, not a day); its lines finish one by one during
in_progress, in an order of their own, and the output and error files list them in that
order, as the service keeps no order either. ``cancel`` moves it through cancelling to
cancelled, keeping the lines finished before.

Every line is answered as a chat request would be: the default answer, or the reply scripted
for its ``custom_id`` (an error reply makes the line fail). The state is computed from the
clock whenever a batch is read, so no thread runs behind the server.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qs, urlsplit

from .frames import _Answer, _CompatibleEncoder
from .replies import (
    COMPATIBLE_PREFIX,
    MISSING_MODEL_PREFIX,
    RecordedRequest,
    Reply,
    _Failure,
    _failure,
    _new_request_id,
)

if TYPE_CHECKING:  # pragma: no cover
    from .server import _Handler

FILES = COMPATIBLE_PREFIX + "/files"
BATCHES = COMPATIBLE_PREFIX + "/batches"
CHAT_ENDPOINT = "/v1/chat/completions"
TEST_ENDPOINT = "/v1/chat/ds-test"
TEST_MODEL = "batch-test-model"

# The service's limits on one input file.
MAX_LINES = 50_000
MAX_FILE_BYTES = 500 * 1024 * 1024
MAX_LINE_BYTES = 6 * 1024 * 1024
WINDOW_HOURS = (24, 336)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

_FILE_PATH = re.compile(re.escape(FILES) + r"(?:/(?P<id>[^/]+)(?P<content>/content)?)?")
_BATCH_PATH = re.compile(re.escape(BATCHES) + r"(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?")


def is_batch_path(path: str) -> bool:
    """Whether the Files and Batches endpoints answer this path."""
    return bool(_FILE_PATH.fullmatch(path) or _BATCH_PATH.fullmatch(path))


def served_in_batch(model: str) -> bool:
    """What the gateway's Batch API serves: the catalog's Beijing batch models, and names it does not know.

    A name the catalog knows without batch support (a retired snapshot, say) is refused, as is
    any ``no-such-`` name; other unknown names pass, as they do for chat.
    """
    from ..catalog import builtin_catalog

    if model == TEST_MODEL:
        return True
    if model.startswith(MISSING_MODEL_PREFIX):
        return False
    info = builtin_catalog().get(model)
    return info is None or "cn-beijing" in info.batch_regions


# --------------------------------------------------------------------------- state


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    # For an input file: its requests, parsed once.
    requests: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class _Line:
    """One request of a batch, answered in advance; it 'finishes' when the clock says so."""

    custom_id: str
    ok: bool
    record: dict[str, Any]


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    lines: list[_Line]  # in the order they finish
    started: float  # monotonic time of creation
    stage: float
    created_at: int
    cancelled_after: float | None = None  # seconds from start when cancel came
    output_file_id: str | None = None
    error_file_id: str | None = None
    timestamps: dict[str, int | None] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def status_and_done(self) -> tuple[str, int]:
        """The status now, and how many lines have finished."""
        elapsed = self.elapsed()
        stage = self.stage
        total = len(self.lines)
        if self.cancelled_after is not None:
            done = self._done_at(self.cancelled_after)
            return ("cancelling" if elapsed < self.cancelled_after + stage else "cancelled"), done
        if elapsed < stage:
            return "validating", 0
        if elapsed < 2 * stage:
            return "in_progress", self._done_at(elapsed)
        if elapsed < 3 * stage:
            return "finalizing", total
        return "completed", total

    def _done_at(self, elapsed: float) -> int:
        if elapsed < self.stage:
            return 0
        fraction = min(1.0, (elapsed - self.stage) / self.stage) if self.stage > 0 else 1.0
        return min(len(self.lines), math.floor(len(self.lines) * fraction))


class BatchService:
    """Files and batches of one gateway, shared by its handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every file and batch, and return the settings to their defaults."""
        with self._lock:
            self._files: dict[str, _File] = {}
            self._batches: dict[str, _Batch] = {}
            self.stage_seconds = 1.0
            self._line_replies: dict[str, Reply] = {}
            self._capacity_refusals = 0
            self._capacity_after = 0

    def configure(self, *, stage_seconds: float | None = None, lines: Mapping[str, Reply] | None = None,
                  capacity_refusals: int | None = None, capacity_after: int = 0) -> None:
        """Set how long each stage lasts, the replies of given ``custom_id``s, and how many batch
        creations to refuse for capacity (429), after accepting ``capacity_after`` more."""
        with self._lock:
            if stage_seconds is not None:
                if not (stage_seconds >= 0 and math.isfinite(stage_seconds)):
                    raise ValueError("stage_seconds must be a finite number >= 0")
                self.stage_seconds = float(stage_seconds)
            if lines is not None:
                for custom_id, reply in lines.items():
                    if not isinstance(reply, Reply):
                        raise TypeError(f"expected Reply for line {custom_id!r}, got {type(reply).__name__}")
                self._line_replies.update({str(key): value for key, value in lines.items()})
            if capacity_refusals is not None:
                if capacity_refusals < 0:
                    raise ValueError("capacity_refusals must not be negative")
                self._capacity_refusals = capacity_refusals
                self._capacity_after = max(0, capacity_after)

    # ---- the endpoints

    def handle(self, handler: "_Handler", record: RecordedRequest, raw: bytes) -> None:
        failure = handler._check_key(record, "openai", required=handler.server.gateway.require_key)
        if failure:
            return handler._reject("openai", failure)
        path, method = record.path, record.method
        found = _FILE_PATH.fullmatch(path)
        if found:
            file_id, content = found.group("id"), found.group("content")
            if file_id is None and method == "POST":
                return self._upload(handler, record, raw)
            if file_id is not None and method == "GET":
                return self._file_content(handler, file_id) if content else self._file(handler, file_id)
            if file_id is not None and not content and method == "DELETE":
                return self._delete_file(handler, file_id)
        found = _BATCH_PATH.fullmatch(path)
        if found:
            batch_id, cancel = found.group("id"), found.group("cancel")
            if batch_id is None and method == "POST":
                return self._create(handler, record)
            if batch_id is None and method == "GET":
                return self._list(handler, handler.path)
            if batch_id is not None and not cancel and method == "GET":
                return self._retrieve(handler, batch_id)
            if batch_id is not None and cancel and method == "POST":
                return self._cancel(handler, batch_id)
        handler._reject("openai", _failure("NotFound", _new_request_id(), status=405,
                                           message=f"No route for {method} {path}."))

    def _upload(self, handler: "_Handler", record: RecordedRequest, raw: bytes) -> None:
        request_id = _new_request_id()
        fields_ = _multipart(record.headers.get("content-type", ""), raw)
        if fields_ is None or "file" not in fields_:
            return handler._reject("openai", _failure(
                "InvalidParameter", request_id, message="The upload must be multipart/form-data with a 'file' part."))
        purpose = fields_.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            return handler._reject("openai", _failure(
                "InvalidParameter", request_id, message=f"purpose must be 'batch', not {purpose[:40]!r}."))
        filename, content = fields_["file"]
        requests, problem = _check_input(content)
        if problem is not None:
            return handler._reject("openai", _failure(problem[0], request_id, status=400, message=problem[1]))
        uploaded = _File(f"file-batch-{uuid.uuid4().hex[:24]}", filename or "input.jsonl", "batch", content,
                         int(time.time()), requests)
        with self._lock:
            self._files[uploaded.id] = uploaded
        handler._send_json(200, uploaded.to_dict(), request_id=request_id)

    def _file(self, handler: "_Handler", file_id: str) -> None:
        with self._lock:
            found = self._files.get(file_id)
        if found is None:
            return handler._reject("openai", _no_such("file", file_id))
        handler._send_json(200, found.to_dict())

    def _file_content(self, handler: "_Handler", file_id: str) -> None:
        with self._lock:
            found = self._files.get(file_id)
        if found is None:
            return handler._reject("openai", _no_such("file", file_id))
        handler._send_bytes(200, found.content, "application/octet-stream", {})

    def _delete_file(self, handler: "_Handler", file_id: str) -> None:
        with self._lock:
            found = self._files.pop(file_id, None)
        if found is None:
            return handler._reject("openai", _no_such("file", file_id))
        handler._send_json(200, {"id": file_id, "object": "file", "deleted": True})

    def _create(self, handler: "_Handler", record: RecordedRequest) -> None:
        request_id = _new_request_id()
        body = record.body or {}
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window", "24h")
        metadata = body.get("metadata")

        def refuse(code: str, message: str, status: int = 400) -> None:
            handler._reject("openai", _failure(code, request_id, status=status, message=message))

        if not isinstance(input_file_id, str) or not input_file_id:
            return refuse("InvalidParameter", "input_file_id is required.")
        if endpoint not in (CHAT_ENDPOINT, TEST_ENDPOINT):
            return refuse("InvalidParameter", f"endpoint must be {CHAT_ENDPOINT} (or {TEST_ENDPOINT} for the test model).")
        if not _window_ok(window):
            return refuse("InvalidParameter", "completion_window must be between 24h and 336h (or 1d to 14d).")
        if metadata is not None and not isinstance(metadata, dict):
            return refuse("InvalidParameter", "metadata must be an object.")
        with self._lock:
            source = self._files.get(input_file_id)
            refusing = False
            if source is not None and self._capacity_refusals > 0:
                if self._capacity_after > 0:
                    self._capacity_after -= 1
                else:
                    refusing = True
                    self._capacity_refusals -= 1
        if source is None:
            return handler._reject("openai", _no_such("file", input_file_id))
        if refusing:
            return refuse("Throttling", "Batch requests are being throttled due to system capacity limits.", 429)
        mismatched = [request for request in source.requests if request.get("url") != endpoint]
        if mismatched:
            return refuse("InvalidParameter",
                          f"The url of line custom_id={mismatched[0].get('custom_id')} does not match the endpoint {endpoint}.")
        model = str(source.requests[0]["body"]["model"])
        if not served_in_batch(model):
            return refuse("ModelNotFound", f"The model `{model}` is not supported by the batch API.", 404)
        with self._lock:
            replies = dict(self._line_replies)
            stage = self.stage_seconds
        lines = [_answer_line(request, replies.get(str(request["custom_id"]))) for request in source.requests]
        random.shuffle(lines)  # lines finish, and are written out, in no guaranteed order
        batch = _Batch(f"batch_{uuid.uuid4()}", input_file_id, endpoint, str(window), metadata, lines,
                       time.monotonic(), stage, int(time.time()))
        with self._lock:
            self._batches[batch.id] = batch
            payload = self._object(batch)
        handler._send_json(200, payload, request_id=request_id)

    def _retrieve(self, handler: "_Handler", batch_id: str) -> None:
        with self._lock:
            batch = self._batches.get(batch_id)
            payload = self._object(batch) if batch else None
        if payload is None:
            return handler._reject("openai", _no_such("batch", batch_id))
        handler._send_json(200, payload)

    def _list(self, handler: "_Handler", raw_path: str) -> None:
        query = parse_qs(urlsplit(raw_path).query)
        after = (query.get("after") or [None])[0]
        try:
            limit = max(1, min(100, int((query.get("limit") or ["20"])[0])))
        except ValueError:
            return handler._reject("openai", _failure("InvalidParameter", _new_request_id(),
                                                      message="limit must be a whole number."))
        with self._lock:
            # Newest first, as the service lists them.
            ordered = sorted(self._batches.values(), key=lambda batch: batch.started, reverse=True)
            ids = [batch.id for batch in ordered]
            start = ids.index(after) + 1 if after in ids else 0
            page = [self._object(batch) for batch in ordered[start:start + limit]]
            more = start + limit < len(ordered)
        handler._send_json(200, {
            "object": "list", "data": page, "has_more": more,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
        })

    def _cancel(self, handler: "_Handler", batch_id: str) -> None:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None:
                status, _ = batch.status_and_done()
                if status not in TERMINAL and batch.cancelled_after is None:
                    batch.cancelled_after = batch.elapsed()
                    batch.timestamps["cancelling_at"] = int(time.time())
            payload = self._object(batch) if batch else None
        if payload is None:
            return handler._reject("openai", _no_such("batch", batch_id))
        handler._send_json(200, payload)

    # ---- the batch object (called with the lock held)

    def _object(self, batch: _Batch) -> dict[str, Any]:
        status, done = batch.status_and_done()
        now = int(time.time())
        stamps = batch.timestamps
        reached = {
            "in_progress_at": status != "validating",
            "finalizing_at": status in ("finalizing", "completed"),
            "completed_at": status == "completed",
            "cancelled_at": status == "cancelled",
        }
        if batch.cancelled_after is not None:
            reached["in_progress_at"] = batch.cancelled_after >= batch.stage
        for name, now_reached in reached.items():
            if now_reached and stamps.get(name) is None:
                stamps[name] = now
        if status in ("completed", "cancelled") and batch.output_file_id is None:
            self._write_results(batch, done)
        finished = batch.lines[:done]
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "in_progress_at": stamps.get("in_progress_at"),
            "expires_at": batch.created_at + _window_hours(batch.completion_window) * 3600,
            "finalizing_at": stamps.get("finalizing_at"),
            "completed_at": stamps.get("completed_at"),
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": stamps.get("cancelling_at"),
            "cancelled_at": stamps.get("cancelled_at"),
            "request_counts": {
                "total": len(batch.lines),
                "completed": sum(1 for line in finished if line.ok),
                "failed": sum(1 for line in finished if not line.ok),
            },
            "metadata": batch.metadata,
        }

    def _write_results(self, batch: _Batch, done: int) -> None:
        finished = batch.lines[:done]
        now = int(time.time())
        for ok, attribute in ((True, "output_file_id"), (False, "error_file_id")):
            chosen = [line.record for line in finished if line.ok is ok]
            if not chosen:
                continue
            content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in chosen).encode()
            kind = "output" if ok else "error"
            written = _File(f"file-batch_{kind}-{uuid.uuid4().hex[:24]}", f"{batch.id}_{kind}.jsonl",
                            f"batch_{kind}", content, now)
            self._files[written.id] = written
            setattr(batch, attribute, written.id)


# --------------------------------------------------------------------------- input checks


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """The parts of a multipart/form-data body by name: (filename, bytes); None if it is not one."""
    if "multipart/form-data" not in content_type.lower():
        return None
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        return None
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True)
            parts[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return parts


def _check_input(content: bytes) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """The file's requests, or the (code, message) the service refuses it with."""
    if len(content) > MAX_FILE_BYTES:
        return [], ("InvalidParameter", f"The file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB.")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return [], ("InvalidParameter", "The file is not UTF-8 encoded.")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return [], ("InvalidParameter", "The file has no requests.")
    if len(lines) > MAX_LINES:
        return [], ("InvalidParameter", f"The file has {len(lines):,} lines; at most {MAX_LINES:,} are allowed.")
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if len(line.encode()) > MAX_LINE_BYTES:
            return [], ("InvalidParameter", f"Line {number} is larger than {MAX_LINE_BYTES // (1024 * 1024)} MB.")
        try:
            request = json.loads(line)
        except ValueError:
            return [], ("InvalidParameter", f"Line {number} is not valid JSON.")
        body = request.get("body") if isinstance(request, dict) else None
        if not isinstance(body, dict) or not isinstance(request.get("custom_id"), str) or not request["custom_id"]:
            return [], ("InvalidParameter", f"Line {number} needs a custom_id string and a body object.")
        if request.get("method") != "POST":
            return [], ("InvalidParameter", f"Line {number}: method must be POST.")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return [], ("InvalidParameter", f"Line {number}: the body has no model.")
        if request["custom_id"] in seen:
            return [], ("duplicate_custom_id", f"custom_id {request['custom_id'][:60]!r} appears more than once.")
        seen.add(request["custom_id"])
        models.add(body["model"])
        if len(models) > 1:
            return [], ("mismatched_model", f"Line {number} uses another model than the lines before it; "
                                            "one file takes one model.")
        requests.append(request)
    urls = {request.get("url") for request in requests}
    if len(urls) > 1:
        return [], ("InvalidParameter", "Every line must have the same url.")
    return requests, None


def _window_hours(window: str) -> int:
    found = re.fullmatch(r"(\d+)([hd])", str(window))
    if not found:
        return 0
    return int(found.group(1)) * (24 if found.group(2) == "d" else 1)


def _window_ok(window: Any) -> bool:
    return isinstance(window, str) and WINDOW_HOURS[0] <= _window_hours(window) <= WINDOW_HOURS[1]


def _no_such(kind: str, name: str) -> _Failure:
    return _failure("NotFound", _new_request_id(), status=404, message=f"No {kind} with id {name[:80]!r}.")


def _answer_line(request: Mapping[str, Any], reply: Reply | None) -> _Line:
    """One line's result, shaped as the service writes it to the output or error file."""
    body = request["body"]
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    answer = _Answer.compose(
        reply,
        model=str(body["model"]),
        messages=messages,
        thinking=body.get("enable_thinking") is True,
        json_mode=(body.get("response_format") or {}).get("type") == "json_object",
        parameters={key: value for key, value in body.items() if key not in ("model", "messages")},
    )
    line_id = f"batch_req_{uuid.uuid4().hex[:24]}"
    custom_id = str(request["custom_id"])
    if answer.reply.is_error:
        failure = answer.failure(mid_stream=False)
        return _Line(custom_id, False, {
            "id": line_id,
            "custom_id": custom_id,
            "response": {"status_code": failure.status, "request_id": failure.request_id,
                         "body": failure.compatible_body()},
            "error": {"code": failure.code, "message": failure.message},
        })
    whole = _CompatibleEncoder(answer, include_usage=True).whole()
    return _Line(custom_id, True, {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": answer.request_id, "body": whole},
        "error": None,
    })

