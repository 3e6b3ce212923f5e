"""One ``--map`` job's flow, as plain code the magic (and ``qwen_magic.map``) delegates to.

rows -> resume (which rows have a result) -> plan (count, cost range, budget) -> runner
(concurrent, rate-limited, retried) -> each finished row written to the history as it
comes -> progress -> one ledger line -> a result aligned with the input.
"""

from __future__ import annotations

import queue
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from IPython.core.error import UsageError

from ..catalog import Catalog, ModelInfo
from ..client import NO_KEY_HELP, Usage
from ..formats import check_capabilities
from ..i18n import N_, _, ngettext
from ..limits import RetryPolicy
from ..options import CellOptions
from ..regions import Region
from ..result import COMPLETE, FAILED, INTERRUPTED
from ..spending import Hold, reserve_job
from ..store import QUICK_LOCK_WAIT, Store, StoreError, describe
from .plan import JobDryRun, JobPlan, check_job_cost, plan_job
from .progress import JobSummary, Progress, ProgressView, TerminalProgress
from .results import NOT_RUN, MapResult, RowResult
from .resume import done_rows, job_key, record_rows, stored_rows
from .rows import Collection, Row, build_rows, check_template, collection_of
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

RESUMED = N_("resumed: {done} done, {left} to go")
INTERRUPTED_LINE = N_("stopped: {done} of {total} rows are done and kept ({abandoned}); run the cell again to "
                      "send only the other {left}.")
STOPPED_LINE = N_("The job stopped: {error} {done} of {total} rows are done and kept; run the cell again once "
                  "this is fixed to send only the other {left}.")


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


@dataclass
class JobSetup:
    """A job ready to run: its rows filled and counted, the rows done before, what it may cost."""

    name: str
    collection: Collection
    fmt: str
    model_name: str
    model: ModelInfo | None
    catalog: Catalog
    region: Region
    parameters: dict[str, Any]
    rows: list[Row]
    job: str  # the job's key in the history
    plan: JobPlan
    schema: Any = None  # --schema's AnswerSchema
    notes: list[str] = field(default_factory=list)

    @property
    def currency(self) -> str:
        return self.region.currency.code

    def result(self, rows: list[RowResult], **given: Any) -> MapResult:
        """A result of this job's rows, in the region's currency, with the schema's fields."""
        fields = tuple(self.schema.schema.get("properties", {})) if self.schema is not None else None
        return MapResult(rows, self.model_name, input_index=self.collection.index, currency=self.currency,
                         fields=fields, **given)


def prepare_job(session: "QwenSession", template: str, options: CellOptions, settings: "Settings", *,
                namespace: Mapping[str, Any], items: Any = None) -> JobSetup:
    """Everything a job does before it sends: rows filled and counted, stored rows read, the plan."""
    name = options.map or "items"
    if items is None:
        if name not in namespace:
            raise UsageError(_("--map {name}: the notebook has no variable {quoted}.").format(name=name,
                                                                                           quoted=repr(name)))
        items = namespace[name]
    template = template.strip("\n").rstrip()
    if not template.strip():
        raise UsageError(_("The %%qwen cell is empty: write the prompt for each row below the %%qwen line, "
                           "with {item}."))
    check_template(template, options.images)
    collection = collection_of(name, items)

    schema = None
    if options.schema:
        from ..schema import schema_from

        schema = schema_from(options.schema, namespace)
    fmt = "json" if schema is not None else options.format or "text"
    model_name = options.model or settings.model
    region = session.region(settings, options)
    catalog = session.catalog(settings, region)
    model = catalog.get(settings.model_aliases.get(model_name, model_name))
    check_capabilities(model_name, model, catalog, thinking=options.thinking, images=bool(options.images))
    if model is not None and model.max_output and options.max_tokens and options.max_tokens > model.max_output:
        raise UsageError(_("--max-tokens {tokens} is more than {model} can write: at most {most} tokens "
                           "(%qwen models).").format(tokens=f"{options.max_tokens:,}", model=model_name,
                                                     most=f"{model.max_output:,}"))
    system = options.system or settings.system
    parameters = options.parameters()
    if schema is not None:
        if model is not None and model.thinking == "only":
            raise UsageError(_("{model} always thinks, and thinking has no JSON mode: --schema needs another "
                               "model.").format(model=model_name))
        strict = model is not None and model.json_schema
        parameters["response_format"] = schema.response_format(strict)
        if not strict:  # json_object: the schema is said in the system prompt
            system = "\n\n".join(filter(None, [system, schema.system_line()]))
    rows = build_rows(template, collection, namespace, system=system, fmt=fmt, images=options.images)

    job = job_key(notebook=session.notebook, template=template, model=model_name, system=system, fmt=fmt,
                  parameters=parameters, images=options.images)
    notes: list[str] = []
    # --fresh: every row is sent again (the new answers replace the stored ones as they come;
    # nothing is deleted first, so a refused or stopped --fresh run loses nothing).
    done = set() if options.fresh else _stored_rows(session, settings, job, notes=notes)
    plan = plan_job(model_name, model, rows, done, max_tokens=options.max_tokens, thinking=options.thinking,
                    thinking_budget=options.thinking_budget, currency=region.currency.code)
    return JobSetup(name, collection, fmt, model_name, model, catalog, region, parameters, rows, job, plan,
                    schema=schema, notes=notes)


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
    setup = prepare_job(session, template, options, settings, namespace=namespace, items=items)
    if options.batch:
        from .batched import run_batch

        return run_batch(session, setup, options, settings, cell_label=cell_label, in_kernel=in_kernel,
                         display=display)
    plan = setup.plan
    if options.dry_run:
        return JobDryRun(plan, setup.name)
    check_job_cost(plan, spent=session.ledger.total_in(setup.currency), budget=session.effective_budget(settings),
                   max_cost=options.max_cost)

    connection = session.connection(settings, options)
    sdk = session.client.sdk_client(connection)
    if connection.protocol == "native" and not sdk.config.api_key:
        raise UsageError(_(NO_KEY_HELP))
    model = setup.model
    thinking = options.thinking or (model is not None and model.thinking == "only")
    call = RowCall(session.client, sdk, connection, setup.model_name, model, setup.parameters,
                   stream=thinking, fmt=setup.fmt, schema=setup.schema)  # a whole answer per row, unless thinking
    concurrency = options.concurrency or settings.concurrency
    runner = Runner(call, session.limiter, concurrency=concurrency,
                    retry=RetryPolicy(settings.max_retries, base_delay=session.retry_base_delay))
    view = (TerminalProgress() if settings.display == "text" or not in_kernel else ProgressView(display))
    # The user's spending limits, across kernels: the whole job's worst case is held before anything is sent.
    hold = (reserve_job(session, settings, plan.worst_cost, setup.region, model=setup.model_name,
                        what=_("--map {name} ({rows} rows)").format(name=setup.name, rows=f"{len(plan.todo):,}"))
            if plan.todo else Hold(None, 0.0, setup.currency))
    setup.notes.extend(hold.notes)
    try:
        return _run(session, settings, runner, setup, view, hold, cell_label=cell_label)
    finally:
        if hold.id is not None:  # the job's costs are written: what is still held goes
            session.persist(settings, hold.settle, wait=QUICK_LOCK_WAIT)


def _stored_rows(session: "QwenSession", settings: "Settings", job: str, *, notes: list[str]) -> set[str]:
    """The rows of this job with a result in the history (none if it cannot be read: a note says so)."""
    try:
        store = session.store(settings)
        with store.waiting_at_most(QUICK_LOCK_WAIT):
            return done_rows(store, job)
    except (StoreError, sqlite3.Error) as error:
        notes.append(_("History not read: {reason} Every row is sent.").format(reason=_reason(session, settings, error)))
        return set()


def _stored_records(session: "QwenSession", settings: "Settings", job: str, notes: list[str]) -> dict[str, Any]:
    """The records of the rows resumed, read once the new rows are under way."""
    try:
        store = session.store(settings)
        with store.waiting_at_most(QUICK_LOCK_WAIT):
            return stored_rows(store, job)
    except (StoreError, sqlite3.Error) as error:
        notes.append(_("History not read: {reason} The rows done before are not in the result.").format(
            reason=_reason(session, settings, error)))
        return {}


def _reason(session: "QwenSession", settings: "Settings", error: Exception) -> Any:
    return describe(error, session.store_path(settings)) if isinstance(error, sqlite3.Error) else error


def _run(session: "QwenSession", settings: "Settings", runner: Runner, setup: JobSetup,
         view: ProgressView | TerminalProgress, hold: Hold, *, cell_label: str) -> MapResult:
    from ..engine import _interrupts_held

    plan, job, notes = setup.plan, setup.job, setup.notes
    results: dict[int, RowResult] = {}
    by_position = {row.position: row for row in plan.todo}
    # The hold shrinks as rows finish: what they cost, and the worst case of the rows still to come.
    worst = dict(zip((row.position for row in plan.todo), plan.row_worst_costs()))
    held = [sum(worst.values())]
    progress = Progress(plan.model_name, len(plan.rows), resumed=plan.resumed, currency=setup.currency)
    note = _(RESUMED).format(done=f"{plan.resumed:,}", left=f"{len(plan.todo):,}") if plan.resumed else None
    unsaved: list[tuple[str, RowResult]] = []
    last_write = time.monotonic()
    started = time.monotonic()

    def save(batch: list[tuple[str, RowResult]]) -> Callable[[Store], None]:
        def write_rows(store: Store) -> None:
            with store.transaction():
                record_rows(store, job, batch)
                hold.lower(store, held[0])

        return write_rows

    def write(*, last: bool = False) -> None:
        nonlocal last_write
        last_write = time.monotonic()
        if not unsaved:
            return
        with _interrupts_held() as interrupted_meanwhile:  # a batch is written whole: ■ waits for its commit
            batch = unsaved[:]
            unsaved.clear()
            notes.extend(session.persist(settings, save(batch), wait=QUICK_LOCK_WAIT))
        if interrupted_meanwhile and not last:  # the last write is made while the job ends anyway
            raise KeyboardInterrupt

    def take(result: RowResult) -> None:
        results[result.position] = result
        progress.add(result)
        if worst and result.status != NOT_RUN:
            held[0] += (result.cost or 0.0) - worst.get(result.position, 0.0)
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
        result = _result(setup, results, records, runner, elapsed=time.monotonic() - started)
        in_flight = runner.pace.in_flight if interrupted else 0  # requests sent, their answers not read
        if interrupted:
            abandoned = (ngettext("{count} request in flight was left to finish unread: it may be billed",
                                  "{count} requests in flight were left to finish unread: they may be billed",
                                  in_flight).format(count=f"{in_flight:,}")
                         if in_flight else _("no request was left in flight"))
            result.stopped = _(INTERRUPTED_LINE).format(done=f"{result.done:,}", total=f"{len(result):,}",
                                                        abandoned=abandoned, left=f"{len(result) - result.done:,}")
        elif runner.fatal is not None:
            result.stopped = _(STOPPED_LINE).format(error=runner.fatal.line(), done=f"{result.done:,}",
                                                    total=f"{len(result):,}", left=f"{len(result) - result.done:,}")
        _account(session, settings, result, setup, hold, cell_label=cell_label, interrupted=interrupted)
        result.notes = list(dict.fromkeys(notes))
        view.finish(result.summary())
    if interrupted:
        raise MapInterrupted(result.stopped or _("stopped"), result)
    if runner.fatal is not None:
        raise MapStopped(result.stopped or runner.fatal.line(), result)
    return result


def _result(setup: JobSetup, results: dict[int, RowResult], records: dict[str, Any], runner: Runner, *,
            elapsed: float) -> MapResult:
    plan = setup.plan
    rows: list[RowResult] = []
    for row in plan.rows:
        stored = records.get(row.digest) if row.digest in plan.done else None
        if stored is not None:
            rows.append(resumed_row(row, stored, setup))
        else:
            rows.append(results.get(row.position) or RowResult(row.position, row.key, status=NOT_RUN))
    return setup.result(rows, elapsed=elapsed, requests=runner.requests, resumed=plan.resumed)


def resumed_row(row: Row, record: dict[str, Any], setup: JobSetup) -> RowResult:
    """A row's result kept from an earlier run (real time or batch): its value parsed again."""
    return RowResult.from_record(row.position, row.key, record).judge(setup.fmt, setup.schema)


def _account(session: "QwenSession", settings: "Settings", result: MapResult, setup: JobSetup, hold: Hold, *,
             cell_label: str, interrupted: bool) -> None:
    """The job as one line of the session's ledger and of the history's calls (none if it sent nothing);
    the reservation goes in the transaction that writes its cost."""
    currency = setup.currency
    if not result.requests:
        result.session_cost = session.ledger.total_in(currency)
        return
    ran = [row for row in result.rows if not row.resumed and row.status != NOT_RUN]
    usage = summed_usage(ran)
    cost = job_cost(ran, usage)
    status = INTERRUPTED if interrupted else FAILED if result.failed or result.not_run else COMPLETE
    session.ledger.add(cell=cell_label, chat=None, model=result.model, usage=usage, cost=cost, status=status,
                       elapsed=result.elapsed, rows=len(result), currency=currency)
    result.session_cost = session.ledger.total_in(currency)
    notebook, region = session.notebook, setup.region.key

    def save(store: Store) -> None:
        store.add_call(notebook, None, result.model, usage.input_tokens, usage.output_tokens, cost, status,
                       currency=currency, region=region, cached_tokens=usage.cached_tokens,
                       cache_creation_tokens=usage.cache_creation_tokens, searches=usage.searches)

    setup.notes.extend(session.persist(settings, hold.settling(save), wait=QUICK_LOCK_WAIT))


def summed_usage(rows: list[RowResult]) -> Usage:
    totals = dict.fromkeys(Usage.__dataclass_fields__, 0)
    for row in rows:
        for field_name in totals:
            totals[field_name] += getattr(row.usage, field_name)
    return Usage(**totals)


def job_cost(rows: list[RowResult], usage: Usage) -> float | None:
    """The rows' cost together (None if any priced row's price is unknown)."""
    costs = [row.cost for row in rows]
    return None if any(c is None for c in costs) and usage.total_tokens else sum(c or 0.0 for c in costs)


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
