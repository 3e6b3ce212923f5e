"""``--map NAME --batch``: a job's rows sent as one DashScope Batch job, at half the price.

The rows are those of ``--map`` (``rows``); the ones without a stored result go out as one
``BatchLine`` each, ``custom_id`` = the row's digest (identical rows are asked once). The job
is recorded in the history file under the job's key before anything is uploaded, so running
the cell again (in this kernel or the next) attaches to it instead of submitting twice. The
cell returns at once: its output shows the job's status, refreshed in the background with
backoff, and ``-o``'s ``MapResult`` fills in when the job ends. Then the outcomes are matched
to rows by ``custom_id``, priced at the batch price, stored as ``--map`` stores its rows (so
either way of running the job resumes from the other), and counted once: one line of the
session's ledger and of the history's calls, the job's reservation settled with it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.error import UsageError

from ..client import Connection, QwenAPIError, Usage
from ..i18n import N_, _
from ..markdown import escape
from ..regions import BEIJING
from ..result import COMPLETE, FAILED, INTERRUPTED, QUIET_STYLE
from ..spending import Hold, reserve_job
from ..store import QUICK_LOCK_WAIT, Store, StoreError
from . import batch
from .job import JobSetup, resumed_row, summed_usage
from .plan import BATCH_PRICE_RATE, BatchSplit, JobDryRun, check_job_cost
from .progress import JobSummary, ProgressView, TerminalProgress
from .results import NOT_RUN, PENDING, MapResult, RowResult
from .resume import is_collected, mark_collected, record_rows, stored_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import QwenSession, Settings
    from ..options import CellOptions

SUBMITTED = N_("Batch job {job}: {rows} rows on {model} · {state} · submitted {at}")
FILLS_IN = N_("{out} fills in when the job ends; {out}.wait() waits for it. ■ does not cancel it: "
              "%qwen jobs cancel {job} does.")
KEPT_WHEN_DONE = N_("The answers are kept in the history file when the job ends; %qwen jobs wait {job} waits for it, "
                    "and running this cell again shows them.")
ATTACHED = N_("attached to batch job {job}, submitted {at}: nothing was submitted again")
ENDED = N_("Batch job {job} ended {status}: the rows without an answer are not run; run the cell again to send "
           "only them.")
NOT_READ = N_("The batch job's answers could not be read yet: {error} {wait} tries again.")
WAIT_STOPPED = N_("Stopped waiting: batch job {job} goes on at DashScope ({state}); {out}.wait() waits again, "
                  "%qwen jobs cancel {job} cancels it.")

# The kernel's batch runs with a cell's result to fill in, by job id: %qwen jobs wait fills them too.
_runs: "weakref.WeakKeyDictionary[QwenSession, dict[str, BatchRun]]" = weakref.WeakKeyDictionary()


class BatchWaitStopped(KeyboardInterrupt):
    """■ stopped the waiting; the job goes on at DashScope."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


def run_batch(session: "QwenSession", setup: JobSetup, options: "CellOptions", settings: "Settings", *,
              cell_label: str, in_kernel: bool, display: Callable[..., Any]) -> MapResult | JobDryRun:
    """Submit the job's rows without a result as one Batch job, or attach to the one running."""
    plan = setup.plan
    window = options.batch_window or batch.DEFAULT_WINDOW
    batch.window_hours(window)
    lines = _lines(setup)
    if options.dry_run:
        encoded = [line.encoded() for line in lines]
        files = batch.split(encoded, max_lines=batch.MAX_LINES, max_bytes=batch.MAX_BYTES)
        return JobDryRun(plan, setup.name, BatchSplit(len(lines), sum(map(len, encoded)), len(files)))
    connection = session.connection(settings, options)
    try:
        store = session.store(settings)
        found = batch.find_job(store, session.notebook, setup.job)
        attach = found is not None and not is_collected(store, setup.job, found.id)
    except StoreError as error:  # the record is what keeps a re-run from submitting twice
        raise UsageError(_("A batch job needs the history file, which cannot be used: {error}").format(
            error=error)) from None
    runs = _runs.setdefault(session, {})
    view = _view(settings, in_kernel, display, options.out)
    if attach:
        assert found is not None
        run = runs.get(found.id)
        if run is not None and run.setup.job == setup.job:  # this kernel follows it already
            run.out = options.out or run.out
            run.show_in(view)
            return run.result
        run = BatchRun(session, settings, setup, found, Hold(None, 0.0, setup.currency), connection,
                       cell_label=cell_label, out=options.out, note=_(ATTACHED).format(job=found.id, at=_when(found.submitted_at)))
        runs[found.id] = run
        run.show_in(view)
        if found.terminal:  # it ended while no kernel watched: its answers are read now
            run.finish(found)
            if run.error is not None:
                raise run.error
        else:
            run.start()
        return run.result
    if not plan.todo:  # every row has its answer (from a batch or a real-time run): shown as they are
        result = setup.result(_rows(setup, store, session, settings), resumed=plan.resumed, job=None)
        result.session_cost = session.ledger.total_in(setup.currency)
        result.notes = list(dict.fromkeys(setup.notes))
        shown = TerminalProgress() if settings.display == "text" or not in_kernel else ProgressView(display)
        shown.finish(result.summary())
        return result

    client, region = batch.batch_client(connection)  # no key: one line, before anything
    batch_catalog = session.catalog(settings, BEIJING)  # where the Batch API serves each model
    batch.check_model(lines, batch_catalog, region)
    check_job_cost(plan, spent=session.ledger.total_in(setup.currency), budget=session.effective_budget(settings),
                   max_cost=options.max_cost, rate=BATCH_PRICE_RATE)
    worst = None if plan.worst_cost is None else plan.worst_cost * BATCH_PRICE_RATE
    hold = reserve_job(session, settings, worst, setup.region, model=setup.model_name,
                       what=_("--map {name} --batch ({rows} rows)").format(name=setup.name,
                                                                          rows=f"{len(plan.todo):,}"))
    setup.notes.extend(hold.notes)
    try:
        job = batch.submit_job(connection, lines, store=store, notebook=session.notebook, cell_key=setup.job,
                               template_digest=setup.job, window=window, catalog=batch_catalog,
                               max_lines=batch.MAX_LINES, max_bytes=batch.MAX_BYTES)
    except BaseException:
        session.persist(settings, hold.settle, wait=QUICK_LOCK_WAIT)
        raise
    run = BatchRun(session, settings, setup, job, hold, connection, cell_label=cell_label, out=options.out)
    runs[job.id] = run
    run.show_in(view)
    run.start()
    return run.result


def _lines(setup: JobSetup) -> list[batch.BatchLine]:
    """One request per row still to send; identical rows (one digest) are asked once."""
    lines: dict[str, batch.BatchLine] = {}
    for row in setup.plan.todo:
        if row.digest not in lines:
            lines[row.digest] = batch.BatchLine(row.digest, setup.model_name, row.messages, setup.parameters)
    return list(lines.values())


def _rows(setup: JobSetup, store: Store | None, session: "QwenSession", settings: "Settings") -> list[RowResult]:
    """The rows with a stored answer as they were kept; the others still pending."""
    records: dict[str, Any] = {}
    if setup.plan.resumed and store is not None:
        try:
            with store.waiting_at_most(QUICK_LOCK_WAIT):
                records = stored_rows(store, setup.job)
        except (StoreError, sqlite3.Error) as error:
            setup.notes.append(_("History not read: {reason} The rows done before are not in the result.").format(
                reason=error))
    rows = []
    for row in setup.plan.rows:
        record = records.get(row.digest) if row.digest in setup.plan.done else None
        rows.append(resumed_row(row, record, setup) if record is not None
                    else RowResult(row.position, row.key, status=PENDING))
    return rows


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


class BatchRun:
    """One batch job with a cell's result to fill in: followed in the background, finished once."""

    def __init__(self, session: "QwenSession", settings: "Settings", setup: JobSetup, job: batch.BatchJob,
                 hold: Hold, connection: Connection, *, cell_label: str, out: str | None,
                 note: str | None = None) -> None:
        self.session, self.settings, self.setup, self.job = session, settings, setup, job
        self.out = out or "result"
        self.hold, self.connection, self.cell_label = hold, connection, cell_label
        self.store_path = session.store_path(settings)
        if note:
            setup.notes.insert(0, note)
        store = session.store(settings)
        self.result = setup.result(_rows(setup, store, session, settings), resumed=setup.plan.resumed, job=job.id)
        self.result._waiter = self
        self.error: Exception | None = None
        self._views: list[Any] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._refresher: batch.JobRefresher | None = None

    # ---- showing

    def show_in(self, view: Any) -> None:
        self._views.append(view)
        view.update(self)

    def state(self) -> str:
        return _(SUBMITTED).format(job=self.job.id, rows=f"{len(self.result):,}", model=self.setup.model_name,
                                   state=self.job.state(), at=_when(self.job.submitted_at))

    def _changed(self, job: batch.BatchJob) -> None:
        for view in self._views:
            view.update(self)

    def _summary(self) -> JobSummary:
        self.result.notes = list(dict.fromkeys(self.setup.notes))
        return self.result.summary()

    # ---- following

    def start(self) -> None:
        self._refresher = batch.JobRefresher(self.connection, self.job, self.store_path, on_change=self._changed,
                                             on_done=self.finish).start()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Block until the job has ended and its rows are filled in; a progress line meanwhile."""
        shown = ""
        try:
            while not self._done.wait(0.1):
                state = self.job.progress()
                if state != shown:
                    sys.stdout.write("\r" + state)
                    sys.stdout.flush()
                    shown = state
                if self._refresher is None or not self._refresher.running:
                    # No one follows it (its refresher stopped on an error): follow it here.
                    with _own_store(self.store_path) as store:
                        batch.wait(self.connection, self.job, store, on_change=self._changed)
                    self.finish(self.job)
                    if self.error is not None:
                        raise self.error
        except KeyboardInterrupt:
            if shown:
                sys.stdout.write("\n")
            raise BatchWaitStopped(_(WAIT_STOPPED).format(job=self.job.id, state=self.job.state(),
                                                          out=self.out)) from None
        if shown:
            sys.stdout.write("\r" + self.job.progress() + "\n")
            sys.stdout.flush()
        summary = self._summary()  # again, from this cell: a front end that missed the update gets it
        for view in self._views:
            view.finish(summary)

    def finish(self, job: batch.BatchJob) -> None:
        """The job has ended: read its answers, fill the rows in, store and count them (once)."""
        with self._lock:
            if self._done.is_set():
                return
            try:
                outcomes = batch.collect(self.connection, job, None, catalog=self.setup.catalog)
                self._fill(outcomes, job)
                with _own_store(self.store_path) as store:
                    first = settle_outcomes(self.session, store, self.setup.job, job, outcomes,
                                            rows=self._kept_rows(), count=len(self.result),
                                            currency=self.setup.currency, region=self.setup.region.key,
                                            hold=self.hold, cell_label=self.cell_label)
                if not first:
                    self.result.requests = 0
            except (QwenAPIError, StoreError, sqlite3.Error, UsageError, OSError) as error:
                self.error = error
                line = _(NOT_READ).format(error=str(error).rstrip("."), wait=f"{self.out}.wait()")
                for view in self._views:
                    view.problem(self, line)
                return
            self.error = None
            self.result.session_cost = self.session.ledger.total_in(self.setup.currency)
            summary = self._summary()
            for view in self._views:
                view.finish(summary)
            self._done.set()

    def _fill(self, outcomes: dict[str, batch.BatchOutcome], job: batch.BatchJob) -> None:
        by_position = {row.position: row for row in self.setup.plan.rows}
        seen: set[str] = set()  # identical rows were asked once: billed once
        for position, row in enumerate(self.result.rows):
            if row.status != PENDING:
                continue
            digest = by_position[position].digest
            outcome = outcomes.get(digest)
            if outcome is not None and digest in seen:
                outcome = dataclasses.replace(outcome, usage=Usage(), cost=0.0)
            seen.add(digest)
            if outcome is None:
                self.result.rows[position] = RowResult(row.position, row.key, status=NOT_RUN)
            elif outcome.ok:
                self.result.rows[position] = RowResult(
                    row.position, row.key, text=outcome.text or "", usage=outcome.usage, cost=outcome.cost,
                    status=COMPLETE, request_id=outcome.request_id).judge(self.setup.fmt, self.setup.schema)
            else:
                self.result.rows[position] = RowResult(
                    row.position, row.key, status=FAILED, error=outcome.error_code, message=outcome.error_message,
                    request_id=outcome.request_id)
        self.result.elapsed = max((job.finished_at or time.time()) - job.submitted_at, 0.0)
        if job.status != "completed":
            self.setup.notes.append(_(ENDED).format(job=job.id, status=job.status))

    def _kept_rows(self) -> list[tuple[str, RowResult]]:
        digests = {row.position: row.digest for row in self.setup.plan.rows}
        kept = {digests[row.position]: row for row in self.result.rows if row.ok and not row.resumed}
        return list(kept.items())


class _own_store:
    """A connection of the calling thread's own (the background refresher's, or the cell's)."""

    def __init__(self, path: Any) -> None:
        self._path = path

    def __enter__(self) -> Store:
        self._store = Store(self._path)
        return self._store

    def __exit__(self, *exc: Any) -> None:
        self._store.close()


def settle_outcomes(session: "QwenSession", store: Store, job_key: str, job: batch.BatchJob,
                    outcomes: dict[str, batch.BatchOutcome], *, rows: list[tuple[str, RowResult]], count: int,
                    currency: str, region: str, hold: Hold | None, cell_label: str) -> bool:
    """Store the job's answered rows and its cost, once across kernels; True if this call did.

    One transaction: the rows, the call in the history, the mark that it was collected and the
    settled reservation. The session's ledger gets its line only when this call wrote them.
    """
    answered = [outcome for outcome in outcomes.values() if outcome.ok or outcome.usage.total_tokens]
    usage = summed_usage([RowResult(0, None, usage=outcome.usage) for outcome in answered])
    status = (COMPLETE if job.status == "completed" and job.failed == 0 else
              INTERRUPTED if job.status == "cancelled" else FAILED)
    with store.transaction():
        if is_collected(store, job_key, job.id):
            first = False
        else:
            first = True
            record_rows(store, job_key, rows)
            if answered:
                store.add_call(session.notebook, None, job.model, usage.input_tokens, usage.output_tokens, job.cost,
                               status, currency=currency, region=region, cached_tokens=usage.cached_tokens)
            mark_collected(store, job_key, job.id, {"cost": job.cost, "lines": len(outcomes), "at": time.time()})
        if hold is not None:
            hold.settle(store)
        store.save_batch_job(job.to_row())
    if first and answered:
        session.ledger.add(cell=cell_label, chat=None, model=job.model, usage=usage, cost=job.cost, status=status,
                           elapsed=max((job.finished_at or time.time()) - job.submitted_at, 0.0), rows=count,
                           currency=currency, batch=True)
    return first


def settle_job(session: "QwenSession", settings: "Settings", connection: Connection, job: batch.BatchJob) -> None:
    """``%qwen jobs wait``: the ended job's rows stored and its cost counted (once); a cell's
    result waiting for it is filled in too."""
    run = _runs.get(session, {}).get(job.id)
    if run is not None:
        run.finish(job)
        if run.error is not None:
            raise run.error
        job.cost = run.job.cost if job.cost is None else job.cost  # read by the run's own copy of the job
        return
    region = session.region(settings)
    outcomes = batch.collect(connection, job, None, catalog=session.catalog(settings, region))
    kept = [(digest, RowResult(0, None, text=outcome.text or "", usage=outcome.usage, cost=outcome.cost,
                               status=COMPLETE, request_id=outcome.request_id))
            for digest, outcome in outcomes.items() if outcome.ok]
    store = session.store(settings)
    settle_outcomes(session, store, job.cell_key, job, outcomes, rows=kept, count=job.rows,
                    currency=region.currency.code, region=region.key, hold=None, cell_label="%qwen jobs wait")


# ---- the cell's output while the job runs


def _view(settings: "Settings", in_kernel: bool, display: Callable[..., Any], out: str | None) -> Any:
    if settings.display == "text" or not in_kernel:
        return TerminalBatchView(out)
    return BatchView(display, out)


class BatchView:
    """The cell's output: the job's status and counts, replaced by the summary when it ends."""

    def __init__(self, display: Callable[..., Any], out: str | None) -> None:
        self._display = display
        self._out = out
        self._handle: Any = None
        self._lock = threading.Lock()

    def _show(self, bundle: dict[str, str], **kwargs: Any) -> None:
        with self._lock:
            if self._handle is None:
                self._handle = self._display(bundle, raw=True, display_id=True, **kwargs)
            else:
                self._handle.update(bundle, raw=True, **kwargs)

    def _note(self, run: BatchRun) -> str:
        if self._out:
            return _(FILLS_IN).format(out=self._out, job=run.job.id)
        return _(KEPT_WHEN_DONE).format(job=run.job.id)

    def update(self, run: BatchRun, problem: str | None = None) -> None:
        if run.finished:
            return
        line, note = run.state(), problem or self._note(run)
        notes = [line for line in run.setup.notes if line]
        quiet = "".join(f'<div style="{QUIET_STYLE}"><small>{escape(text)}</small></div>' for text in [*notes, note])
        html = f'<div class="qwen-batch-progress"><small>{escape(line)}</small>{quiet}</div>'
        self._show({"text/plain": "\n".join([line, *notes, note]), "text/html": html})

    def problem(self, run: BatchRun, line: str) -> None:
        self.update(run, line)

    def finish(self, summary: JobSummary) -> None:
        bundle, metadata = summary.bundle()
        self._show(bundle, metadata=metadata)


class TerminalBatchView:
    """Terminal IPython: one line when the job is submitted; ``.wait()`` shows the rest."""

    def __init__(self, out: str | None) -> None:
        self._out = out
        self._said = False

    def update(self, run: BatchRun) -> None:
        if self._said:
            return
        self._said = True
        note = (_(FILLS_IN).format(out=self._out, job=run.job.id) if self._out
                else _(KEPT_WHEN_DONE).format(job=run.job.id))
        print("\n".join([run.state(), *(f"[{line}]" for line in run.setup.notes), f"[{note}]"]))

    def problem(self, run: BatchRun, line: str) -> None:
        pass  # said by .wait(), which raises it

    def finish(self, summary: JobSummary) -> None:
        pass  # from the background, nothing is printed into the terminal's prompt: .wait() shows it
