"""DashScope's Batch File API: a job over rows at half the real-time price.

A job is one cell's rows sent as JSONL (one chat request per row, ``custom_id`` = the row's
key) to the OpenAI-compatible Files and Batches endpoints: upload (``purpose=batch``), create
the batch, poll it with backoff, download the output and error files, and match their lines
back to rows by ``custom_id`` (the service keeps no order). Over 50,000 rows or 500 MB the job
is split into several batches. Every job is recorded in the history store before anything is
submitted, so running its cell again attaches to it, also after a kernel restart.

The HTTP side is in ``batch_api`` (httpx, which dashscope 2.x already depends on). Failures
become one ``QwenAPIError`` line, and the API key never appears in any of them.

The API the cell magic uses::

    job = submit_job(connection, lines, store=store, notebook=nb, cell_key=key)
    refresh(connection, job, store)          # one poll; True if anything changed
    wait(connection, job, store)             # until a terminal status, with backoff
    outcomes = collect(connection, job, store)   # {custom_id: BatchOutcome}
    cancel(connection, job, store)
    find_job(store, nb, key)                 # the cell's job, to attach to
    JobRefresher(connection, job, store_path, on_change=...).start()   # in the background
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from IPython.core.error import UsageError

from ..catalog import Catalog, load_catalog
from ..client import Connection, QwenAPIError, Usage, _shortened
from ..i18n import N_, _
from ..pricing import batch_line_cost
from ..store import Store
from .batch_api import ENDPOINT, BatchAPIError, BatchClient, batch_client

__all__ = ["BatchAPIError", "BatchJob", "BatchLine", "BatchOutcome", "BatchPart", "JobRefresher", "PollPolicy",
           "batch_client", "cancel", "check_model", "collect", "find_job", "load_job", "refresh", "submit_job",
           "wait"]

DEFAULT_WINDOW = "24h"
# The service's limits on one input file (DashScope's Batch File API).
MAX_LINES = 50_000
MAX_BYTES = 500 * 1024 * 1024
MAX_LINE_BYTES = 6 * 1024 * 1024
WINDOW_HOURS = (24, 336)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Where a job is, from the least to the most advanced; a job is where its least advanced batch is.
_STAGES = ("submitting", "validating", "in_progress", "finalizing", "cancelling")

REGION_NAMES = {"cn-beijing": N_("Beijing"), "ap-southeast-1": N_("Singapore")}

# --------------------------------------------------------------------------- messages

BAD_WINDOW = N_("The batch completion window must be whole hours from 24h to 336h (or days, 1d to 14d), "
              "not {window!r}.")
MIXED_MODELS = N_("One batch job takes one model, and these rows ask for {count}: {models}. Run one job per model.")
NOT_IN_CATALOG = N_("The catalog does not say whether DashScope's Batch API serves {model!r}; if it does, add "
                  "batch_regions = [\"cn-beijing\"] to its entry (%config QwenMagic.models), or run without --batch.")
NOT_SERVED = N_("DashScope's Batch API does not serve {model} in {region}; there it serves {served}. "
              "Pick one of those with -m, or run without --batch.")
NO_BATCH_REGION = N_("DashScope's Batch API is offered in Beijing and Singapore only, not in {region}; "
                   "run without --batch, or use a key and base URL of one of those regions.")
NO_ROWS = N_("A batch job needs at least one row.")
DUPLICATE_KEY = N_("Two rows share the key {key!r}; every row of a batch job needs a key of its own.")
LINE_TOO_LARGE = N_("Row {key!r} makes a request of {size:,} bytes; a batch request may be at most 6 MB.")
NOT_FINISHED = N_("Job {job} is still {status}; its results can be read once it has finished (%qwen jobs wait {job}).")

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class BatchLine:
    """One row's request: its key (``custom_id``), the model, the messages and the parameters
    (OpenAI-compatible names: ``temperature``, ``max_tokens``, ``enable_thinking``...)."""

    custom_id: str
    model: str
    messages: tuple[Mapping[str, Any], ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def encoded(self) -> bytes:
        """The JSONL line, newline included."""
        body = {"model": self.model, "messages": list(self.messages), **dict(self.parameters)}
        line = {"custom_id": str(self.custom_id), "method": "POST", "url": ENDPOINT, "body": body}
        return json.dumps(line, ensure_ascii=False).encode() + b"\n"


@dataclass
class BatchPart:
    """One batch of a job (a job over 50,000 rows or 500 MB has several)."""

    batch_id: str
    input_file_id: str
    rows: int
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class BatchJob:
    """A cell's batch job, as recorded in the history store."""

    id: str
    notebook: str
    cell_key: str
    template_digest: str
    model: str
    rows: int
    window: str
    parts: list[BatchPart] = field(default_factory=list)
    status: str = "submitting"
    submitted_at: float = field(default_factory=time.time)
    cost: float | None = None
    finished_at: float | None = None

    @property
    def batch_ids(self) -> list[str]:
        return [part.batch_id for part in self.parts]

    @property
    def completed(self) -> int:
        return sum(part.completed for part in self.parts)

    @property
    def failed(self) -> int:
        return sum(part.failed for part in self.parts)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def state(self) -> str:
        """Where the job is: ``in_progress, 40/100 done, 2 failed`` (the status as the service names it)."""
        done = f"{self.completed + self.failed:,}/{self.rows:,}"
        if self.failed:
            return _("{status}, {done} done, {failed} failed").format(status=self.status, done=done,
                                                                      failed=f"{self.failed:,}")
        return _("{status}, {done} done").format(status=self.status, done=done)

    def progress(self) -> str:
        """One line: the job and where it is (``job-…: in_progress, 40/100 done, 2 failed``)."""
        return f"{self.id}: {self.state()}"

    def _settle_status(self) -> None:
        """The job's status from its batches': the least advanced while any runs."""
        statuses = [part.status for part in self.parts]
        if not statuses:
            return
        running = [status for status in statuses if status not in TERMINAL]
        if running:
            self.status = min(running, key=lambda status: _STAGES.index(status) if status in _STAGES else 0)
            return
        for status in ("cancelled", "failed", "expired"):
            if status in statuses:
                self.status = status
                break
        else:
            self.status = "completed"
        if self.finished_at is None:
            self.finished_at = time.time()

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id, "notebook": self.notebook, "cell_key": self.cell_key,
            "template_digest": self.template_digest, "model": self.model, "rows": self.rows,
            "batch_ids": self.batch_ids, "status": self.status, "completed": self.completed,
            "failed": self.failed, "submitted_at": self.submitted_at, "cost": self.cost,
            "finished_at": self.finished_at,
            "record": {"window": self.window, "parts": [dataclasses.asdict(part) for part in self.parts]},
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> BatchJob:
        record = row.get("record") or {}
        parts = [BatchPart(**part) for part in record.get("parts", [])]
        return cls(
            id=row["id"], notebook=row["notebook"], cell_key=row["cell_key"],
            template_digest=row["template_digest"], model=row["model"], rows=row["rows"],
            window=record.get("window", DEFAULT_WINDOW), parts=parts, status=row["status"],
            submitted_at=row["submitted_at"], cost=row["cost"], finished_at=row["finished_at"],
        )


@dataclass(frozen=True)
class BatchOutcome:
    """One row's result from the output or error file."""

    custom_id: str
    ok: bool
    text: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost: float | None = 0.0  # failed lines are free; None: the model's price is unknown
    request_id: str | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None


# --------------------------------------------------------------------------- checks


def window_hours(window: str) -> int:
    """Hours of a completion window (``24h``, ``7d``); a ``UsageError`` outside 24h–336h."""
    found = re.fullmatch(r"\s*(\d{1,4})\s*([hd])\s*", str(window).lower())
    hours = int(found.group(1)) * (24 if found.group(2) == "d" else 1) if found else 0
    if not WINDOW_HOURS[0] <= hours <= WINDOW_HOURS[1]:
        raise UsageError(_(BAD_WINDOW).format(window=_shortened(str(window), 40)))
    return hours


def check_model(lines: Sequence[BatchLine], catalog: Catalog, region: str) -> str:
    """The job's one model, if the Batch API serves it in ``region``; else a ``UsageError`` line."""
    models = sorted({line.model for line in lines})
    if len(models) > 1:
        shown = ", ".join(models[:5]) + (", …" if len(models) > 5 else "")
        raise UsageError(_(MIXED_MODELS).format(count=len(models), models=shown))
    model = models[0]
    if region not in REGION_NAMES:
        raise UsageError(_(NO_BATCH_REGION).format(region=region))
    info = catalog.get(model)
    if info is None:
        raise UsageError(_(NOT_IN_CATALOG).format(model=_shortened(model, 60)))
    if region not in info.batch_regions:
        served = sorted(m.name for m in catalog.models.values() if region in m.batch_regions and not m.retired)
        raise UsageError(_(NOT_SERVED).format(model=model, region=_(REGION_NAMES[region]),
                                              served=", ".join(served) or _("no model the catalog knows")))
    return model


def split(encoded: Sequence[bytes], *, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> list[list[bytes]]:
    """Lines grouped into files of at most ``max_lines`` lines and ``max_bytes`` bytes, in order."""
    files: list[list[bytes]] = [[]]
    size = 0
    for line in encoded:
        if files[-1] and (len(files[-1]) >= max_lines or size + len(line) > max_bytes):
            files.append([])
            size = 0
        files[-1].append(line)
        size += len(line)
    return files if files[0] else []


# --------------------------------------------------------------------------- the job


def submit_job(
    connection: Connection,
    lines: Sequence[BatchLine],
    *,
    store: Store,
    notebook: str,
    cell_key: str,
    template_digest: str = "",
    window: str = DEFAULT_WINDOW,
    catalog: Catalog | None = None,
    max_lines: int = MAX_LINES,
    max_bytes: int = MAX_BYTES,
) -> BatchJob:
    """Check, record, upload and start a job over ``lines``; return it at once (validating).

    Everything that can be refused is refused before any upload, with one ``UsageError``
    line: no rows, a bad window, two rows with one key, several models, a model the Batch API
    does not serve in this region, a request over 6 MB. The job is written to ``store``
    before the first upload, and after every batch created, so that no re-run submits twice.
    If a later batch of a split job cannot be created, those created are cancelled and the
    ``BatchAPIError`` is raised.
    """
    if not lines:
        raise UsageError(_(NO_ROWS))
    window_hours(window)
    keys: set[str] = set()
    for line in lines:
        if str(line.custom_id) in keys:
            raise UsageError(_(DUPLICATE_KEY).format(key=_shortened(str(line.custom_id), 60)))
        keys.add(str(line.custom_id))
    client, region = batch_client(connection)
    model = check_model(lines, catalog or load_catalog(), region)
    encoded = [line.encoded() for line in lines]
    for line, data in zip(lines, encoded):
        if len(data) > MAX_LINE_BYTES:
            raise UsageError(_(LINE_TOO_LARGE).format(key=_shortened(str(line.custom_id), 60), size=len(data)))
    files = split(encoded, max_lines=max_lines, max_bytes=max_bytes)

    job = BatchJob(id=f"job-{uuid.uuid4().hex[:10]}", notebook=notebook, cell_key=cell_key,
                   template_digest=template_digest, model=model, rows=len(lines), window=window.strip().lower())
    store.save_batch_job(job.to_row())
    try:
        for number, content in enumerate(files, start=1):
            file_id = client.upload(b"".join(content), f"{job.id}-{number}.jsonl")
            created = client.create(file_id, job.window, {"ds_name": job.id,
                                                          "ds_description": f"{notebook} {cell_key}"[:200]})
            part = BatchPart(batch_id=str(created["id"]), input_file_id=file_id, rows=len(content))
            _read_batch(part, created)
            job.parts.append(part)
            job._settle_status()
            store.save_batch_job(job.to_row())
    except QwenAPIError:
        _abandon(client, job, store)
        raise
    return job


def _abandon(client: BatchClient, job: BatchJob, store: Store) -> None:
    """A submission that failed part-way: nothing left running, and the record says so."""
    if not job.parts:
        store.delete_batch_job(job.id)  # nothing was submitted: the next run starts afresh
        return
    for part in job.parts:
        try:
            _read_batch(part, client.cancel(part.batch_id))
        except QwenAPIError:
            pass  # the record still names it: %qwen jobs cancel tries again
    job._settle_status()
    store.save_batch_job(job.to_row())


def _read_batch(part: BatchPart, answer: Mapping[str, Any]) -> None:
    part.status = str(answer.get("status") or part.status)
    counts = answer.get("request_counts") or {}
    part.completed = int(counts.get("completed") or 0)
    part.failed = int(counts.get("failed") or 0)
    part.output_file_id = answer.get("output_file_id") or part.output_file_id
    part.error_file_id = answer.get("error_file_id") or part.error_file_id


def find_job(store: Store, notebook: str, cell_key: str, template_digest: str | None = None) -> BatchJob | None:
    """The cell's latest job (of this template, when given), whatever its status: what a re-run
    attaches to instead of submitting again. The store outlives the kernel, so this works after
    a restart too."""
    row = store.batch_job_for_cell(notebook, cell_key, template_digest)
    return None if row is None else BatchJob.from_row(row)


def load_job(store: Store, job_or_batch_id: str) -> BatchJob | None:
    """A job by its id, or by the id of one of its batches."""
    row = store.batch_job(job_or_batch_id)
    return None if row is None else BatchJob.from_row(row)


def refresh(connection: Connection, job: BatchJob, store: Store | None = None) -> bool:
    """Ask the service where the job's running batches are; return True if anything changed."""
    before = (job.status, [dataclasses.astuple(part) for part in job.parts])
    client, _region = batch_client(connection)
    for part in job.parts:
        if not part.terminal:
            _read_batch(part, client.retrieve(part.batch_id))
    job._settle_status()
    changed = before != (job.status, [dataclasses.astuple(part) for part in job.parts])
    if changed and store is not None:
        store.save_batch_job(job.to_row())
    return changed


def cancel(connection: Connection, job: BatchJob, store: Store | None = None) -> BatchJob:
    """Cancel the job's running batches (cancelling -> cancelled); finished lines are kept and billed."""
    client, _region = batch_client(connection)
    for part in job.parts:
        if not part.terminal:
            _read_batch(part, client.cancel(part.batch_id))
    job._settle_status()
    if store is not None:
        store.save_batch_job(job.to_row())
    return job


@dataclass(frozen=True)
class PollPolicy:
    """How often to ask: every ``first`` seconds at first, ``growth`` times longer each time,
    never more often than ``first`` nor less often than every ``most`` seconds."""

    first: float = 2.0
    most: float = 60.0
    growth: float = 1.5

    def intervals(self) -> Iterable[float]:
        interval = self.first
        while True:
            yield interval
            interval = min(self.most, max(self.first, interval * self.growth))


#: The policy ``wait``, ``JobRefresher`` and ``%qwen jobs wait`` use unless given another.
DEFAULT_POLL = PollPolicy()


def wait(
    connection: Connection,
    job: BatchJob,
    store: Store | None = None,
    *,
    on_change: Callable[[BatchJob], None] | None = None,
    poll: PollPolicy | None = None,
    stop: threading.Event | None = None,
) -> BatchJob:
    """Poll until the job reaches a terminal status (or ``stop`` is set); return it.

    ``on_change`` is called after every change. A rate limit, a server error or a dropped
    connection while polling is waited out (the next poll asks again); any other failure is
    raised. KeyboardInterrupt passes through: the job goes on at DashScope.
    """
    stop = stop or threading.Event()
    for interval in (poll or DEFAULT_POLL).intervals():
        if job.terminal or stop.is_set():
            return job
        try:
            changed = refresh(connection, job, store)
        except QwenAPIError as error:
            if not error.retryable:
                raise
            changed = False
        if changed and on_change is not None:
            on_change(job)
        if job.terminal or stop.wait(interval):
            return job
    return job  # pragma: no cover - the intervals never end


def collect(
    connection: Connection,
    job: BatchJob,
    store: Store | None = None,
    *,
    catalog: Catalog | None = None,
) -> dict[str, BatchOutcome]:
    """Download a finished job's output and error files: one outcome per ``custom_id``.

    Lines are matched by ``custom_id``, whatever their order. Each successful line is priced
    at the batch price (half the real-time one); failed lines cost nothing. The job's cost is
    recorded. A job still running is a ``UsageError``.
    """
    if not job.terminal:
        raise UsageError(_(NOT_FINISHED).format(job=job.id, status=job.status))
    client, _region = batch_client(connection)
    info = (catalog or load_catalog()).get(job.model)
    outcomes: dict[str, BatchOutcome] = {}
    for part in job.parts:
        for file_id in (part.output_file_id, part.error_file_id):
            if file_id:
                for line in client.content(file_id).decode("utf-8", "replace").splitlines():
                    outcome = parse_line(line, info)
                    if outcome is not None:
                        outcomes[outcome.custom_id] = outcome
    costs = [outcome.cost for outcome in outcomes.values() if outcome.ok]
    job.cost = None if any(cost is None for cost in costs) else sum(cost or 0.0 for cost in costs)
    if store is not None:
        store.save_batch_job(job.to_row())
    return outcomes


def parse_line(line: str, model: Any = None) -> BatchOutcome | None:
    """One line of an output or error file as an outcome (None for a line that is not one).

    ``model`` is the catalog's ``ModelInfo``, to price a successful line.
    """
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("custom_id") is None:
        return None
    custom_id = str(data["custom_id"])
    response = data.get("response") if isinstance(data.get("response"), dict) else {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    request_id = response.get("request_id") or body.get("request_id")
    error = data.get("error") if isinstance(data.get("error"), dict) else None
    if error is None and isinstance(body.get("error"), dict):
        error = body["error"]
    if error is not None or (response.get("status_code") or 200) >= 400:
        error = error or {}
        return BatchOutcome(custom_id, ok=False, request_id=request_id,
                            error_code=str(error.get("code") or f"HTTP{response.get('status_code')}"),
                            error_message=str(error.get("message") or _("no message")))
    choices = body.get("choices") if isinstance(body.get("choices"), list) else []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = first.get("message") if isinstance(first.get("message"), dict) else {}
    usage = Usage.from_sdk(body.get("usage") if isinstance(body.get("usage"), dict) else None)
    content = message.get("content")
    return BatchOutcome(custom_id, ok=True, text=content if isinstance(content, str) else "", usage=usage,
                        cost=batch_line_cost(model, usage), request_id=request_id,
                        finish_reason=first.get("finish_reason"))


# --------------------------------------------------------------------------- in the background


class JobRefresher:
    """Polls one job in a daemon thread until it finishes or :meth:`stop` is called.

    ``on_change(job)`` is called after every change of status or counts, ``on_done(job)`` once
    when it reaches a terminal status; both run in the refresher's thread. A failure that more
    polling cannot mend (a wrong key, say) ends the thread and is kept in :attr:`error`. With a
    ``store_path`` it writes what it learns to the history store through a connection of its own.
    """

    def __init__(
        self,
        connection: Connection,
        job: BatchJob,
        store_path: Path | None = None,
        *,
        on_change: Callable[[BatchJob], None] | None = None,
        on_done: Callable[[BatchJob], None] | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        self.job = job
        self.error: Exception | None = None
        self._connection = connection
        self._store_path = store_path
        self._on_change = on_change
        self._on_done = on_done
        self._poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"qwen-magic-batch:{job.id}", daemon=True)

    def start(self) -> JobRefresher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop polling (the job goes on at DashScope) and wait for the thread to end."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        # SQLite connections are not shared between threads here: this thread has its own.
        store: Store | None = None
        try:
            store = Store(self._store_path) if self._store_path is not None else None
            wait(self._connection, self.job, store, on_change=self._on_change, poll=self._poll, stop=self._stop)
            if self.job.terminal and self._on_done is not None:
                self._on_done(self.job)
        except Exception as error:  # kept for the view to show; a thread has no one to raise to
            self.error = error
        finally:
            if store is not None:
                store.close()
