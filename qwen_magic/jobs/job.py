"""One ``--map`` job's flow, as plain code the magic (and ``qwen_magic.map``) delegates to.

rows -> resume (which rows have a result) -> plan (count, cost range, budget) -> runner
(concurrent, rate-limited, retried) -> each finished row written to the history as it
comes -> progress -> one ledger line -> a result aligned with the input.
"""

from __future__ import annotations

import queue
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from IPython.core.error import UsageError

from ..client import NO_KEY_HELP, QwenAPIError, Usage
from ..formats import check_capabilities, parse_answer
from ..limits import RetryPolicy
from ..options import CellOptions
from ..result import COMPLETE, FAILED, INTERRUPTED
from ..store import QUICK_LOCK_WAIT, StoreError, describe
from .plan import JobDryRun, JobPlan, check_job_cost, plan_job
from .progress import JobSummary, Progress, ProgressView, TerminalProgress
from .results import NOT_RUN, MapResult, RowResult
from .resume import done_rows, job_key, record_rows, stored_rows
from .rows import Row, build_rows, check_template, collection_of
from .runner import Runner, RowCall

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import QwenSession, Settings

# Finished rows are written in batches: one commit per batch, not per row.
WRITE_EVERY = 0.25  # seconds
WRITE_BATCH = 500  # rows
# After ■, rows in flight get this long to finish (and be kept) before the job returns.
INTERRUPT_GRACE = 0.5
# How long the loop waits for a finished row before it looks at the view and the writes again.
UPDATE_WAIT = 0.05

RESUMED = "resumed: {done:,} done, {left:,} to go"
INTERRUPTED_LINE = ("stopped: {done:,} of {total:,} rows are done and kept ({abandoned}); run the cell again to "
                    "send only the other {left:,}.")
STOPPED_LINE = ("The job stopped: {error} {done:,} of {total:,} rows are done and kept; run the cell again once "
                "this is fixed to send only the other {left:,}.")


class MapInterrupted(KeyboardInterrupt):
    """■ stopped the job; the finished rows are kept (in ``.result`` and the history)."""

    def __init__(self, message: str, result: MapResult) -> None:
        super().__init__(message)
        self.result = result

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class MapStopped(Exception):
    """An account error stopped the job: one line, the rows done are kept."""

    def __init__(self, message: str, result: MapResult) -> None:
        super().__init__(message)
        self.result = result

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def run_map(
    session: "QwenSession",
    template: str,
    options: CellOptions,
    settings: "Settings",
    *,
    namespace: Mapping[str, Any],
    cell_label: str,
    in_kernel: bool,
    display: Callable[..., Any],
    items: Any = None,
) -> MapResult | JobDryRun:
    """Run ``template`` over the collection ``options.map`` names (or ``items``)."""
    name = options.map or "items"
    if items is None:
        if name not in namespace:
            raise UsageError(f"--map {name}: the notebook has no variable {name!r}.")
        items = namespace[name]
    template = template.strip("\n").rstrip()
    if not template.strip():
        raise UsageError("The %%qwen cell is empty: write the prompt for each row below the %%qwen line, with {item}.")
    check_template(template, options.images)
    collection = collection_of(name, items)

    fmt = options.format or "text"
    model_name = options.model or settings.model
    catalog = session.catalog(settings)
    model = catalog.get(settings.model_aliases.get(model_name, model_name))
    check_capabilities(model_name, model, catalog, thinking=options.thinking, images=bool(options.images))
    if model is not None and model.max_output and options.max_tokens and options.max_tokens > model.max_output:
        raise UsageError(f"--max-tokens {options.max_tokens:,} is more than {model_name} can write: "
                         f"at most {model.max_output:,} tokens (%qwen models).")
    system = options.system or settings.system
    parameters = options.parameters()
    rows = build_rows(template, collection, namespace, system=system, fmt=fmt, images=options.images)

    job = job_key(notebook=session.notebook, template=template, model=model_name, system=system, fmt=fmt,
                  parameters=parameters, images=options.images)
    notes: list[str] = []
    # --fresh: every row is sent again (the new answers replace the stored ones as they come;
    # nothing is deleted first, so a refused or stopped --fresh run loses nothing).
    done = set() if options.fresh else _stored_rows(session, settings, job, notes=notes)
    plan = plan_job(model_name, model, rows, done, max_tokens=options.max_tokens, thinking=options.thinking,
                    thinking_budget=options.thinking_budget)
    if options.dry_run:
        return JobDryRun(plan, name)
    check_job_cost(plan, spent=session.ledger.total_cost, budget=session.effective_budget(settings),
                   max_cost=options.max_cost)

    connection = session.connection(settings, options)
    sdk = session.client.sdk_client(connection)
    if connection.protocol == "native" and not sdk.config.api_key:
        raise UsageError(NO_KEY_HELP)
    thinking = options.thinking or (model is not None and model.thinking == "only")
    call = RowCall(session.client, sdk, connection, model_name, model, parameters,
                   stream=thinking, fmt=fmt)  # a whole answer per row, unless thinking needs a stream
    concurrency = options.concurrency or settings.concurrency
    runner = Runner(call, session.limiter, concurrency=concurrency,
                    retry=RetryPolicy(settings.max_retries, base_delay=session.retry_base_delay))
    view = (TerminalProgress() if settings.display == "text" or not in_kernel else ProgressView(display))
    return _run(session, settings, runner, plan, job, view, cell_label=cell_label, notes=notes,
                input_index=collection.index)


def _stored_rows(session: "QwenSession", settings: "Settings", job: str, *, notes: list[str]) -> set[str]:
    """The rows of this job with a result in the history (none if it cannot be read: a note says so)."""
    try:
        store = session.store(settings)
        with store.waiting_at_most(QUICK_LOCK_WAIT):
            return done_rows(store, job)
    except (StoreError, sqlite3.Error) as error:
        notes.append(f"History not read: {_reason(session, settings, error)} Every row is sent.")
        return set()


def _stored_records(session: "QwenSession", settings: "Settings", job: str, notes: list[str]) -> dict[str, Any]:
    """The records of the rows resumed, read once the new rows are under way."""
    try:
        store = session.store(settings)
        with store.waiting_at_most(QUICK_LOCK_WAIT):
            return stored_rows(store, job)
    except (StoreError, sqlite3.Error) as error:
        notes.append(f"History not read: {_reason(session, settings, error)} The rows done before are not in the result.")
        return {}


def _reason(session: "QwenSession", settings: "Settings", error: Exception) -> Any:
    return describe(error, session.store_path(settings)) if isinstance(error, sqlite3.Error) else error


def _run(session: "QwenSession", settings: "Settings", runner: Runner, plan: JobPlan, job: str,
         view: ProgressView | TerminalProgress, *, cell_label: str, notes: list[str], input_index: Any) -> MapResult:
    from ..engine import _interrupts_held

    results: dict[int, RowResult] = {}
    by_position = {row.position: row for row in plan.todo}
    progress = Progress(plan.model_name, len(plan.rows), resumed=plan.resumed)
    note = RESUMED.format(done=plan.resumed, left=len(plan.todo)) if plan.resumed else None
    unsaved: list[tuple[str, RowResult]] = []
    last_write = time.monotonic()
    started = time.monotonic()

    def write(*, last: bool = False) -> None:
        nonlocal last_write
        last_write = time.monotonic()
        if not unsaved:
            return
        with _interrupts_held() as held:  # a batch is written whole: ■ waits for its commit
            batch = unsaved[:]
            unsaved.clear()
            notes.extend(session.persist(settings, lambda store: record_rows(store, job, batch), wait=QUICK_LOCK_WAIT))
        if held and not last:  # the last write is made while the job ends anyway
            raise KeyboardInterrupt

    def take(result: RowResult) -> None:
        results[result.position] = result
        progress.add(result)
        if result.status == COMPLETE:
            unsaved.append((by_position[result.position].digest, result))

    interrupted = False
    view.update(progress, note=note, force=True)
    runner.start(plan.todo, plan.tokens)
    try:
        while len(results) < len(plan.todo):
            try:
                take(runner.results.get(timeout=UPDATE_WAIT))
            except queue.Empty:
                if not runner.running and runner.results.empty():
                    break
            if len(unsaved) >= WRITE_BATCH or time.monotonic() - last_write >= WRITE_EVERY:
                write()
            view.update(progress, note=note)
    except KeyboardInterrupt:
        interrupted = True
    with _interrupts_held():
        runner.stop.set()
        if interrupted:
            runner.join(INTERRUPT_GRACE)
        else:
            runner.join(2.0)
        while not runner.results.empty():
            take(runner.results.get_nowait())
        write(last=True)
        records = _stored_records(session, settings, job, notes) if plan.resumed else {}
        result = _result(plan, results, records, runner, input_index, elapsed=time.monotonic() - started)
        in_flight = runner.pace.in_flight if interrupted else 0  # requests sent, their answers not read
        if interrupted:
            abandoned = (f"{in_flight:,} requests in flight were left to finish unread: they may be billed"
                         if in_flight else "no request was left in flight")
            result.stopped = INTERRUPTED_LINE.format(done=result.done, total=len(result), abandoned=abandoned,
                                                     left=len(result) - result.done)
        elif runner.fatal is not None:
            result.stopped = STOPPED_LINE.format(error=runner.fatal.line(), done=result.done, total=len(result),
                                                 left=len(result) - result.done)
        _account(session, settings, result, cell_label=cell_label, interrupted=interrupted)
        view.finish(JobSummary.of(result, tuple(dict.fromkeys(notes))))
    if interrupted:
        raise MapInterrupted(result.stopped or "stopped", result)
    if runner.fatal is not None:
        raise MapStopped(result.stopped or runner.fatal.line(), result)
    return result


def _result(plan: JobPlan, results: dict[int, RowResult], records: dict[str, Any], runner: Runner,
            input_index: Any, *, elapsed: float) -> MapResult:
    fmt = runner.call.fmt
    rows: list[RowResult] = []
    for row in plan.rows:
        stored = records.get(row.digest) if row.digest in plan.done else None
        if stored is not None:
            rows.append(_resumed(row, stored, fmt))
        else:
            rows.append(results.get(row.position) or RowResult(row.position, row.key, status=NOT_RUN))
    return MapResult(rows, plan.model_name, elapsed=elapsed, requests=runner.requests, resumed=plan.resumed,
                     input_index=input_index)


def _resumed(row: Row, record: dict[str, Any], fmt: str) -> RowResult:
    result = RowResult.from_record(row.position, row.key, record)
    if fmt == "json":  # the value is the text's, parsed again
        parsed = parse_answer("json", result.text)
        result.value, result.format_error = parsed.value, parsed.error
    return result


def _account(session: "QwenSession", settings: "Settings", result: MapResult, *, cell_label: str,
             interrupted: bool) -> None:
    """The job as one line of the session's ledger and of the history's calls (none if it sent nothing)."""
    ran = [row for row in result.rows if not row.resumed and row.status != NOT_RUN]
    if not result.requests:
        result.session_cost = session.ledger.total_cost
        return
    totals = dict.fromkeys(Usage.__dataclass_fields__, 0)
    for row in ran:
        for field_name in totals:
            totals[field_name] += getattr(row.usage, field_name)
    usage = Usage(**totals)
    costs = [row.cost for row in ran]
    cost = None if any(c is None for c in costs) and usage.total_tokens else sum(c or 0.0 for c in costs)
    status = INTERRUPTED if interrupted else FAILED if result.failed or result.not_run else COMPLETE
    session.ledger.add(cell=cell_label, chat=None, model=result.model, usage=usage, cost=cost, status=status,
                       elapsed=result.elapsed, rows=len(result))
    result.session_cost = session.ledger.total_cost
    notebook = session.notebook
    session.persist(settings, lambda store: store.add_call(notebook, None, result.model, usage.input_tokens,
                                                           usage.output_tokens, cost, status), wait=QUICK_LOCK_WAIT)


_standalone: "QwenSession | None" = None  # outside IPython: one session for the process


def map_from_code(template: str, items: Any, **given: Any) -> MapResult | JobDryRun:
    """``qwen_magic.map``: the job a ``%%qwen --map`` cell runs, from Python code."""
    global _standalone
    from IPython import get_ipython

    from .. import _registered, load_ipython_extension
    from ..engine import QwenSession, Settings
    from ..magics import _display

    fields = {name: value for name, value in given.items() if value is not None and value is not False}
    options = CellOptions(map="items", **fields)
    options.validate()
    options.validate_job()
    shell = get_ipython()
    if shell is None:
        _standalone = _standalone or QwenSession()
        return run_map(_standalone, template, options, Settings(), namespace={}, cell_label="map()",
                       in_kernel=False, display=_display, items=items)
    load_ipython_extension(shell)
    magics: Any = _registered[id(shell)]
    magics.session.notebook = magics.notebook_key()
    return run_map(magics.session, template, options, magics.settings(), namespace=shell.user_ns,
                   cell_label=f"In [{magics._prompt_number()}]",
                   in_kernel=getattr(shell, "kernel", None) is not None, display=_display, items=items)
