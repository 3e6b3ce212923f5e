"""The ``%qwen`` line magic's subcommands."""

from __future__ import annotations

import getpass
import math
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from IPython.core.error import StdinNotImplementedError, UsageError

from .catalog import ModelInfo, PriceTier, user_catalog_path
from .conversation import RecordError, Turn
from .i18n import N_, _
from .history import ChatHistory, chat_to_json, chat_to_markdown, shortened, turns_from_notebook
from .client import key_source, mask_key
from .ledger import UsageReport
from .preflight import prepare
from .store import Store, StoreError, check, repair
from .pricing import format_money, format_yuan
from .tables import Table
from .tokens import count_text

if TYPE_CHECKING:  # pragma: no cover
    from .client import Connection
    from .jobs.batch import BatchJob
    from .account import AccountUsage
    from .magics import QwenMagic
    from .regions import Currency

T = TypeVar("T")


HELP_TITLE = N_("%qwen commands")
HELP_ROWS = (
    ("%%qwen [options]", N_("ask the model the cell's text (%%qwen? lists the options)")),
    ("%qwen models [NAME]", N_("the catalog: limits, prices, rate limits, free quota")),
    ("%qwen usage [--all]", N_("every call of this session with its tokens and cost; --all: across notebooks, "
                               "today, this month, limits, per model and notebook, free quota, a 30-day chart")),
    ("%qwen chats", N_("the notebook's chats: turns, tokens, cost")),
    ("%qwen history [CHAT]", N_("a chat, turn by turn, with tokens and cost")),
    ("%qwen reset [CHAT]", N_("empty a chat (memory and history file)")),
    ("%qwen undo [CHAT]", N_("remove a chat's last turn")),
    ("%qwen export [CHAT] PATH", N_("write a chat as Markdown (.md) or JSON (.json)")),
    ("%qwen resume [CHAT] [--from NB.ipynb]", N_("bring back a chat from the history file, or from a saved notebook")),
    ("%qwen repair", N_("move a damaged history file aside (kept, dated) and start a fresh one with what can be read")),
    ("%qwen jobs [cancel ID | wait [ID]]", N_("batch jobs (--batch): list them, cancel one, or wait for one to finish")),
    ("%qwen budget [AMOUNT|off]", N_("show, set or remove the session's budget (in the region's currency)")),
    ("%qwen limit [daily|monthly AMOUNT|off]", N_("show, set or remove your spending limits across all kernels "
                                                  "and notebooks (in the region's currency)")),
    ("%qwen count TEXT", N_("tokens of TEXT, and of a one-message request, with its cost")),
    ("%qwen config", N_("the effective settings, the key masked")),
    ("%qwen login", N_("type the API key at a hidden prompt; kept in memory for this session")),
    ("%qwen fix [-m MODEL] [-c CHAT] [-o VAR] [--dry-run] [WORDS]",
     N_("send the last error (cell, message, traceback): its cause, and a corrected cell below")),
    ("%qwen help", N_("this list")),
)


def help_table() -> Table:
    """The ``%qwen help`` table, in the current language."""
    return Table(_(HELP_TITLE), tuple((usage, _(what)) for usage, what in HELP_ROWS))


def _help(magics: "QwenMagic", args: list[str]) -> Table:
    return help_table()


def _config(magics: "QwenMagic", args: list[str]) -> Table:
    settings = magics.settings()
    connection = magics.session.connection(settings)
    client = magics.session.client
    key, source = key_source(magics.session.session_key)
    timeout = client.sdk_client(connection).config.timeout
    region = magics.session.region(settings)
    rows = (
        ("model", settings.model),
        ("system", settings.system or _("(the model's default)")),
        ("display", settings.display),
        ("protocol", settings.protocol),
        ("base_url", client.resolved_base_url(connection)),
        ("region", _("{region}: prices, budgets and limits in {currency}").format(
            region=_(region.name), currency=_(region.currency.name))),
        ("timeout", _("{seconds} s").format(seconds=f"{timeout:g}")),
        (_("api key"), f"{mask_key(key)} ({source})"),
    )
    return Table(_("qwen_magic settings (change with %config QwenMagic.<name> = ...)"), rows)


NO_STDIN_LOGIN = N_(
    "This front end cannot ask for input, so %qwen login cannot work here. Set the environment "
    "variable DASHSCOPE_API_KEY before starting Jupyter, or put api_key = \"sk-...\" in "
    "~/.dashscope/config.toml."
)


def _login(magics: "QwenMagic", args: list[str]) -> None:
    if args:
        raise UsageError(_("%qwen login takes no argument: it asks for the key at a hidden prompt."))
    try:
        key = getpass.getpass(_("DashScope API key (kept in memory for this session only): ")).strip()
    except StdinNotImplementedError:
        raise UsageError(_(NO_STDIN_LOGIN)) from None
    if not key:
        raise UsageError(_("No key entered; nothing changed."))
    magics.session.session_key = key
    print(_("Key {key} set for this session. It is not saved anywhere.").format(key=mask_key(key)))


def _models(magics: "QwenMagic", args: list[str]) -> Table:
    region = magics.session.region(magics.settings())
    catalog = magics.session.catalog(magics.settings(), region)
    sign = region.currency.symbol
    if len(args) > 1:
        raise UsageError(_("%qwen models takes at most one model name."))
    if args:
        model = catalog.get(args[0])
        if model is None:
            raise UsageError(_("{model} is not in the catalog; %qwen models lists the known models.").format(
                model=repr(shortened(args[0]))))
        return model_details(model, sign)
    header = (_("model"), _("context"), _("max in"), _("max out"), _("{sign}/1K in→out").format(sign=sign),
              _("{sign}/1M in→out").format(sign=sign), "QPM", "TPM", _("free"), _("cache"), "")
    rows = tuple(
        (
            m.name, _count(m.context), _count(m.max_input), _count(m.max_output),
            _prices(m.tiers[0], 1_000), _prices(m.tiers[0], 1) + (_(" (tiered)") if len(m.tiers) > 1 else ""),
            _count(m.qpm, "—"), _count(m.tpm, "—"), _count(m.free_quota, "—"), _cache_kinds(m),
            _("retired") if m.retired else "",
        )
        for m in sorted(catalog.models.values(), key=lambda m: (m.retired, m.name))
    )
    return Table(
        _("Qwen models, {region} (prices in {currency}; first tier shown, %qwen models NAME for all)").format(
            region=_(region.name), currency=_(region.currency.name)),
        rows,
        header,
        (_("Figures from: {sources}. Override: {path} or %config QwenMagic.models.").format(
            sources=", ".join(catalog.sources), path=user_catalog_path()),),
    )


def model_details(model: ModelInfo, sign: str = "¥") -> Table:
    rows: list[tuple[str, str]] = [
        (_("context"), _count(model.context)),
        (_("max input"), _count(model.max_input)),
        (_("max output"), _count(model.max_output)),
        (_("thinking"), model.thinking),
        (_("vision"), _("yes") if model.vision else _("no")),
    ]
    lower = 0
    for tier in model.tiers:
        if tier.up_to:
            span = _("input {low}–{high}").format(low=f"{lower + 1:,}", high=f"{tier.up_to:,}")
        else:
            span = _("input over {low}").format(low=f"{lower:,}") if lower else _("any input")
        if tier.thinking_output is not None:
            price = _("{sign}{input} in → {sign}{output} out per 1M (thinking out {sign}{thinking})").format(
                sign=sign, input=f"{tier.input:g}", output=f"{tier.output:g}", thinking=f"{tier.thinking_output:g}")
        else:
            price = _("{sign}{input} in → {sign}{output} out per 1M").format(
                sign=sign, input=f"{tier.input:g}", output=f"{tier.output:g}")
        rows.append((_("price, {span}").format(span=span),
                     _("{price}; per 1K: {prices}").format(price=price, prices=_prices(tier, 1_000))))
        lower = tier.up_to or lower
    if model.free_quota and model.free_quota_days:
        free = _("{tokens} tokens for {days} days").format(tokens=f"{model.free_quota:,}", days=model.free_quota_days)
    elif model.free_quota:
        free = _("{tokens} tokens").format(tokens=f"{model.free_quota:,}")
    else:
        free = _("none known")
    rows += [
        (_("rate limit"), _("{requests} requests / {tokens} tokens per minute").format(
            requests=_count(model.qpm, _("no published")), tokens=_count(model.tpm, _("no published")))),
        (_("free quota"), free),
        (_("context cache"), _cache_kinds(model) or _("none known")),
        (_("status"), _("retired snapshot") if model.retired else _("current")),
        (_("source"), f"{model.source} ({model.as_of})" if model.source
         else _("your figures (QwenMagic.models or models.toml)")),
    ]
    return Table(model.name, tuple(rows))


def _cache_kinds(model: ModelInfo) -> str:
    kinds = ((N_("implicit"), model.implicit_cache), (N_("explicit"), model.explicit_cache))
    return ", ".join(_(kind) for kind, has in kinds if has)


def _count(value: int | None, missing: str = "?") -> str:
    return missing if value is None else f"{value:,}"


def _prices(tier: PriceTier, per: int) -> str:
    scale = per / 1_000_000 if per > 1 else 1
    return f"{tier.input * scale:g}→{tier.output * scale:g}"


def _usage(magics: "QwenMagic", args: list[str]) -> UsageReport | Table:
    if args == ["--all"]:
        return _usage_all(magics)
    if args:
        raise UsageError(_("Use %qwen usage, or %qwen usage --all for all-time totals across notebooks."))
    return UsageReport(magics.session.ledger)


def _usage_all(magics: "QwenMagic") -> "AccountUsage":
    from .account import account_usage
    from .spending import standings

    settings = magics.settings()
    session = magics.session
    store = _store(magics)
    region = session.region(settings)
    return _reading(lambda: account_usage(
        store, region, session.catalog(settings, region),
        standings(store, region.currency.code, owner=session.owner, timeout=settings.reservation_timeout)))


def _store(magics: "QwenMagic") -> Store:
    try:
        return magics.session.store(magics.settings())
    except StoreError as error:
        raise UsageError(str(error)) from None


MAX_CHAT_NAME = 200


def _reading(read: Callable[..., T], *args: Any) -> T:
    """A read of the history file; a damaged or locked file is one line saying what to do."""
    try:
        return read(*args)
    except StoreError as error:
        raise UsageError(_capitalized(str(error))) from None


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _one_chat_name(args: list[str], command: str) -> str:
    if len(args) > 1:
        raise UsageError(_("%qwen {command} takes at most one chat name.").format(command=command))
    name = args[0] if args else "default"
    if not name.isprintable():
        raise UsageError(_("A chat name cannot hold control characters (such as NUL): {name}.").format(
            name=repr(shortened(name))))
    if len(name) > MAX_CHAT_NAME:
        raise UsageError(_("A chat name is at most {most} characters; this one has {length}.").format(
            most=MAX_CHAT_NAME, length=f"{len(name):,}"))
    return name


def _chats(magics: "QwenMagic", args: list[str]) -> Table:
    if args:
        raise UsageError(_("%qwen chats takes no argument."))
    session = magics.session
    rows = []
    for chat in session.chats.values():
        tokens_in, tokens_out, cost = chat.totals()
        rows.append((chat.name, str(len(chat.turns)), f"{tokens_in:,}", f"{tokens_out:,}", format_yuan(cost),
                     chat.system or ""))
    notes = []
    try:
        stored = [name for name in _store(magics).chat_names(session.notebook) if name not in session.chats]
    except (UsageError, StoreError) as error:  # the chats in memory are still worth showing
        stored = []
        notes.append(_capitalized(str(error)))
    if stored:
        notes.append(_("In the history file, not loaded: {chats} (%qwen resume NAME).").format(
            chats=", ".join(stored)))
    if not rows and not notes:
        notes.append(_("No chats yet: every %%qwen cell continues the chat 'default' (-c NAME for another)."))
    header = (_("chat"), _("turns"), _("in"), _("out"), _("cost"), _("system"))
    return Table(_("Chats of {notebook}").format(notebook=session.notebook), tuple(rows), header, tuple(notes))


def _history(magics: "QwenMagic", args: list[str]) -> ChatHistory:
    name = _one_chat_name(args, "history")
    chat = magics.session.chats.get(name)
    if chat is None:
        raise UsageError(_("No chat {chat} in this kernel; %qwen chats lists them (%qwen resume {name} loads a "
                           "stored one).").format(chat=repr(name), name=name))
    return ChatHistory(chat)


def _reset(magics: "QwenMagic", args: list[str]) -> Message:
    name = _one_chat_name(args, "reset")
    session = magics.session
    chat = session.chat(name)
    removed = len(chat.turns)
    chat.reset()
    chat.system = None
    notes = session.persist(magics.settings(), lambda store: session.forget_chat(store, chat))
    said = _("Chat {chat} reset: {removed} turn(s) removed.").format(chat=repr(name), removed=removed)
    return Message(" ".join([said, *notes]))


def _undo(magics: "QwenMagic", args: list[str]) -> Message:
    name = _one_chat_name(args, "undo")
    session = magics.session
    chat = session.chats.get(name)
    if chat is None or not chat.turns:
        raise UsageError(_("Chat {chat} has no turn to undo.").format(chat=repr(name)))
    position = len(chat.turns)
    turn = chat.undo()
    assert turn is not None
    notes = session.persist(magics.settings(), lambda store: session.write_chat(
        store, chat, lambda stored: store.delete_position(session.notebook, stored, position)))
    preview = turn.prompt if len(turn.prompt) <= 60 else turn.prompt[:57] + "…"
    return Message(" ".join([_("Removed turn {position} of chat {chat}: {preview}.").format(
        position=position, chat=repr(name), preview=repr(preview)), *notes]))


def _export(magics: "QwenMagic", args: list[str]) -> Message:
    if len(args) == 1:
        name, target = "default", args[0]
    elif len(args) == 2:
        name, target = args
    else:
        raise UsageError(_("Use %qwen export [CHAT] PATH, with PATH ending in .md or .json."))
    chat = magics.session.chats.get(name)
    if chat is None or not chat.turns:
        raise UsageError(_("Chat {chat} has no turns to export.").format(chat=repr(name)))
    path = Path(target).expanduser()
    if path.suffix.lower() == ".json":
        text = chat_to_json(chat, magics.session.notebook)
    elif path.suffix.lower() in (".md", ".markdown"):
        text = chat_to_markdown(chat)
    else:
        raise UsageError(_("{path}: the format comes from the extension, .md or .json.").format(
            path=shortened(target)))
    try:
        path.write_text(text, encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise UsageError(_("Cannot write {path}: {error}").format(
            path=shortened(path), error=getattr(error, "strerror", None) or error)) from None
    return Message(_("Wrote chat {chat} ({turns} turns) to {path}.").format(
        chat=repr(name), turns=len(chat.turns), path=path))


def _resume(magics: "QwenMagic", args: list[str]) -> Message:
    source: str | None = None
    if "--from" in args:
        at = args.index("--from")
        if at + 1 >= len(args):
            raise UsageError(_("--from needs a notebook file, e.g. %qwen resume --from analysis.ipynb"))
        source = args[at + 1]
        args = args[:at] + args[at + 2:]
    name = _one_chat_name(args, "resume")
    session = magics.session
    if source is not None:
        turns = turns_from_notebook(Path(source).expanduser(), name)
        where = source
    else:
        store = _store(magics)
        try:
            turns = [Turn.from_record(record) for record in _reading(store.turns, session.notebook, name)]
        except RecordError as error:
            raise UsageError(_("Chat {chat} in {path} cannot be resumed: {error}; nothing was changed.").format(
                chat=repr(name), path=store.path, error=error)) from None
        where = str(store.path)
        if turns:  # this kernel now holds that copy's turns: its next write carries it on
            session.stored_names[(store.path, session.notebook, name)] = name
    if not turns:
        raise UsageError(_("Nothing to resume: no turns of chat {chat} for {notebook} in {where}.").format(
            chat=repr(name), notebook=session.notebook, where=where))
    chat = session.chat(name)
    chat.turns = turns
    chat.system = turns[-1].system
    notes: list[str] = []
    if source is not None:
        notes = session.persist(magics.settings(), lambda store: session.write_chat(
            store, chat, lambda stored: store.replace_chat(
                session.notebook, stored, [(t.cell_id, t.to_record()) for t in turns])))
    tokens_in, tokens_out, cost = chat.totals()
    return Message(" ".join([
        _("Restored chat {chat}: {turns} turn(s), {input} in / {output} out tokens, {cost}, from {where}.").format(
            chat=repr(name), turns=len(turns), input=f"{tokens_in:,}", output=f"{tokens_out:,}",
            cost=format_yuan(cost), where=where), *notes]))


def _repair(magics: "QwenMagic", args: list[str]) -> Message:
    if args:
        raise UsageError(_("%qwen repair takes no argument: it repairs the history file in use."))
    session = magics.session
    path = session.store_path(magics.settings())
    if not path.exists():
        return Message(_("There is no history file at {path} yet; nothing to repair.").format(path=path))
    if path.is_dir():
        raise UsageError(_("{path} is a directory, not a history file; set QwenMagic.store_path to a file.").format(
            path=path))
    problem = check(path)
    if problem is None:
        return Message(_("The history file {path} reads whole; nothing was changed.").format(path=path))
    session.close_store(path)
    try:
        aside, turns, calls = repair(path)
    except (OSError, StoreError) as error:
        raise UsageError(_("Cannot repair {path}: {error}").format(
            path=path, error=getattr(error, "strerror", None) or error)) from None
    return Message(
        _("The history file {path} was damaged ({problem}). It is kept as {aside}; a fresh one was started "
          "with the {turns} turn(s) and {calls} call(s) that could still be read.").format(
            path=path, problem=problem, aside=aside, turns=f"{turns:,}", calls=f"{calls:,}")
    )


def _budget(magics: "QwenMagic", args: list[str]) -> Message:
    session = magics.session
    if len(args) > 1:
        raise UsageError(_("Use %qwen budget, %qwen budget YUAN or %qwen budget off."))
    currency = session.region(magics.settings()).currency
    money = lambda amount: format_money(amount, currency.code)  # noqa: E731
    if args:
        if args[0].lower() == "off":
            session.budget, session.budget_off = None, True
        else:
            amount = _amount(args[0], currency, _("A budget"))
            session.budget, session.budget_off = amount, False
    spent = session.ledger.total_in(currency.code)
    budget = session.effective_budget(magics.settings())
    if budget is None:
        return Message(_("No budget set; spent {spent} this session. Set one with %qwen budget AMOUNT "
                         "(in {currency}).").format(spent=money(spent), currency=_(currency.name)))
    return Message(
        _("Budget {budget}: spent {spent}, {left} left.").format(
            budget=money(budget), spent=money(spent), left=money(max(budget - spent, 0)))
    )


class Message(str):
    """A sentence a command answers with, shown without quotes."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _count_command(magics: "QwenMagic", args: list[str]) -> Table:
    text = " ".join(args)
    if not text:
        raise UsageError(_("%qwen count needs some text, e.g. %qwen count 你好，世界"))
    settings = magics.settings()
    region = magics.session.region(settings)
    model = magics.session.catalog(settings, region).get(settings.model)
    preflight = prepare(settings.model, model, [{"role": "user", "content": text}], max_tokens=None, thinking=False,
                        currency=region.currency.code)
    return Table(
        _("Tokens ({model}'s tokenizer)").format(model=settings.model),
        (
            (_("as text"), f"{count_text(text):,}"),
            (_("as a one-message request"), _("{tokens} (chat template and default system prompt)").format(
                tokens=f"{preflight.input_tokens:,}")),
            (_("that request's input cost"), preflight.money(preflight.estimate.input_cost)),
        ),
    )


# ---- %qwen jobs: batch jobs (DashScope's Batch API)

JOBS_USAGE = N_("Use %qwen jobs, %qwen jobs cancel ID or %qwen jobs wait [ID] (ID: a job or batch id from %qwen jobs).")
NO_SUCH_JOB = N_("No batch job {job!r} in the history file; %qwen jobs lists them.")
NO_RUNNING_JOB = N_("No batch job of this notebook is running; %qwen jobs lists them all.")
JOB_ALREADY_FINISHED = N_("Job {job} has already finished ({status}); nothing to cancel.")
JOB_CANCELLING = N_("Cancelling job {job} ({batches} batch(es)): the rows finished so far are kept and billed at the "
                    "batch price; %qwen jobs shows when it is cancelled.")
JOB_WAIT_STOPPED = N_("Stopped waiting: job {job} goes on at DashScope ({progress}). "
                      "%qwen jobs wait {job} picks it up again.")
JOB_FINISHED = N_("Job {job} {status}: {completed:,} row(s) answered, {failed:,} failed, {cost} at the batch price.")
JOB_REFRESH_FAILED = N_("The status shown is the last one recorded: asking DashScope failed ({error}).")


def _jobs(magics: "QwenMagic", args: list[str]) -> Table | Message:
    from .jobs import batch

    if not args:
        return _jobs_table(magics)
    if args[0] == "cancel" and len(args) == 2:
        job = _job_named(magics, args[1])
        if job.terminal:
            raise UsageError(_(JOB_ALREADY_FINISHED).format(job=job.id, status=job.status))
        _reading(batch.cancel, _jobs_connection(magics), job, _store(magics))
        return Message(_(JOB_CANCELLING).format(job=job.id, batches=len(job.parts)))
    if args[0] == "wait" and len(args) <= 2:
        job = _job_named(magics, args[1]) if len(args) == 2 else _running_job(magics)
        return _wait_for_job(magics, job)
    raise UsageError(_(JOBS_USAGE))


def _jobs_connection(magics: "QwenMagic") -> "Connection":
    return magics.session.connection(magics.settings())


def _job_named(magics: "QwenMagic", name: str) -> "BatchJob":
    from .jobs import batch

    job = _reading(batch.load_job, _store(magics), name)
    if job is None:
        raise UsageError(_(NO_SUCH_JOB).format(job=shortened(name)))
    return job


def _running_job(magics: "QwenMagic") -> "BatchJob":
    from .jobs import batch

    rows = _reading(_store(magics).batch_jobs, magics.session.notebook)
    running = [batch.BatchJob.from_row(row) for row in rows if row["status"] not in batch.TERMINAL]
    if not running:
        raise UsageError(_(NO_RUNNING_JOB))
    return running[0]


def _wait_for_job(magics: "QwenMagic", job: "BatchJob") -> Message:
    """Block with a progress line until the job finishes; ■ stops waiting, not the job."""
    import sys

    from .jobs import batch

    connection, store = _jobs_connection(magics), _store(magics)

    def show(current: "BatchJob") -> None:
        sys.stdout.write("\r" + current.progress())
        sys.stdout.flush()

    show(job)
    try:
        _reading(lambda: batch.wait(connection, job, store, on_change=show))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return Message(_(JOB_WAIT_STOPPED).format(job=job.id, progress=job.state()))
    sys.stdout.write("\n")
    from .jobs.batched import settle_job

    # The rows are stored and the cost counted (once), as when the cell's own result fills in.
    _reading(lambda: settle_job(magics.session, magics.settings(), connection, job))
    currency = magics.session.region(magics.settings()).currency.code
    return Message(_(JOB_FINISHED).format(job=job.id, status=job.status, completed=job.completed, failed=job.failed,
                                       cost=format_money(job.cost, currency)))


def _jobs_table(magics: "QwenMagic") -> Table:
    from .client import QwenAPIError
    from .jobs import batch

    store = _store(magics)
    jobs = [batch.BatchJob.from_row(row) for row in _reading(store.batch_jobs)]
    notes: list[str] = []
    running = [job for job in jobs if not job.terminal]
    if running:
        try:
            connection = _jobs_connection(magics)
            for job in running:
                batch.refresh(connection, job, store)
        except (QwenAPIError, UsageError, StoreError) as error:
            notes.append(_(JOB_REFRESH_FAILED).format(error=str(error).rstrip(".")))
    currency = magics.session.region(magics.settings()).currency.code
    rows = tuple(
        (
            job.id,
            f"{job.notebook} · {shortened(job.cell_key, 24)}",
            f"{job.rows:,}",
            job.status,
            _("{completed} done, {failed} failed").format(completed=f"{job.completed:,}", failed=f"{job.failed:,}"),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(job.submitted_at)),
            format_money(job.cost, currency) if job.cost is not None else "—",
        )
        for job in jobs
    )
    if not rows:
        notes.append(_("No batch jobs yet."))
    header = (_("job"), _("notebook · cell"), _("rows"), _("status"), _("counts"), _("submitted"), _("cost"))
    return Table(_("Batch jobs (newest first)"), rows, header, tuple(notes))


COMMANDS: dict[str, Callable[["QwenMagic", list[str]], Any]] = {
    "models": _models,
    "usage": _usage,
    "budget": _budget,
    "count": _count_command,
    "chats": _chats,
    "history": _history,
    "reset": _reset,
    "undo": _undo,
    "export": _export,
    "resume": _resume,
    "help": _help,
    "config": _config,
    "login": _login,
    "repair": _repair,
    "jobs": _jobs,
}


# ---- %qwen fix

_FIX_OPTIONS_WITH_VALUE = ("-m", "--model", "-c", "--chat", "-o", "--out")


def _fix(magics: "QwenMagic", args: list[str]) -> Any:
    """%qwen fix [-m MODEL] [-c CHAT] [-o VAR] [--dry-run] [words]: as a %%qwen --fix cell of those words."""
    options = ["--fix"]
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option in _FIX_OPTIONS_WITH_VALUE:
            if not args:
                raise UsageError(_("%qwen fix: {option} needs a value, e.g. %qwen fix {option} NAME.").format(
                    option=option))
            options += [option, args.pop(0)]
        elif option == "--dry-run":
            options.append(option)
        else:
            raise UsageError(
                _("%qwen fix takes -m MODEL, -c CHAT, -o VAR and --dry-run, then any words to add to the question; "
                  "not {option} (%%qwen --fix takes every cell option).").format(option=repr(shortened(option)))
            )
    return magics.qwen(shlex.join(options), " ".join(args))


COMMANDS["fix"] = _fix


def run_command(magics: "QwenMagic", line: str) -> Any:
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise UsageError(f"%qwen: {error}") from None
    if not words:
        return help_table()
    name, args = words[0], words[1:]
    command = COMMANDS.get(name)
    if command is None:
        raise UsageError(_("%qwen has no command {name}; try one of: {commands}.").format(
            name=repr(shortened(name)), commands=", ".join(COMMANDS)))
    return command(magics, args)


# ---- spending limits across kernels (spending.py)

LIMIT_USE = N_("Use %qwen limit, %qwen limit daily AMOUNT, %qwen limit monthly AMOUNT, or %qwen limit daily off.")


def _amount(text: str, currency: "Currency", what: str) -> float:
    """An amount typed by the user, in the region's currency (its sign may be given)."""
    from .regions import CURRENCIES

    signs = {c.symbol: c for c in CURRENCIES.values()}
    given = signs.get(text[:1])
    if given is not None and given != currency:
        raise UsageError(_("{what} is in the region's currency, {currency} ({symbol}), not {given}: write {number} "
                           "or {symbol}{number}, or set QwenMagic.region.").format(
            what=what, currency=_(currency.name), symbol=currency.symbol, given=_(given.name), number=text[1:]))
    try:
        amount = float(text[1:] if given else text)
    except ValueError:
        raise UsageError(_("{what} needs an amount in {currency} or 'off', not {text}.").format(
            what=what, currency=_(currency.name), text=repr(shortened(text)))) from None
    if not (amount > 0 and math.isfinite(amount)):
        raise UsageError(_("{what} must be a positive, finite amount of {currency}, not {text}.").format(
            what=what, currency=_(currency.name), text=repr(shortened(text))))
    return amount


def _limit(magics: "QwenMagic", args: list[str]) -> Message:
    from .spending import PERIODS, current_user, local_zone, standings

    settings = magics.settings()
    session = magics.session
    currency = session.region(settings).currency
    money = lambda amount: format_money(amount, currency.code)  # noqa: E731
    store = _store(magics)
    if args:
        if len(args) != 2 or args[0].lower() not in PERIODS:
            raise UsageError(_(LIMIT_USE))
        period = args[0].lower()
        what = _("A daily limit") if period == "daily" else _("A monthly limit")
        amount = None if args[1].lower() == "off" else _amount(args[1], currency, what)
        _reading(store.set_limit, current_user(), period, currency.code, amount)
    found = _reading(lambda: standings(store, currency.code, owner=session.owner,
                                       timeout=settings.reservation_timeout))
    if not found:
        none = _("No spending limit in {currency} is set. Set one for all your kernels and notebooks with "
                 "%qwen limit daily AMOUNT or %qwen limit monthly AMOUNT (in {currency}).").format(
            currency=_(currency.name))
        if args:
            removed = _("Daily limit removed.") if args[0].lower() == "daily" else _("Monthly limit removed.")
            return Message(f"{removed} {none}")
        return Message(none)
    shown = [
        (_(DAILY_STANDING) if s.period == "daily" else _(MONTHLY_STANDING)).format(
            limit=money(s.limit), spent=money(s.spent), reserved=money(s.reserved), left=money(s.left))
        for s in found
    ]
    return Message(" ".join([*shown, _("Limits hold for all your kernels and notebooks; days and months are "
                                       "local time ({zone}).").format(zone=local_zone())]))


DAILY_STANDING = N_("Daily limit {limit}: {spent} spent today, {reserved} reserved by calls in flight, {left} left.")
MONTHLY_STANDING = N_("Monthly limit {limit}: {spent} spent this month, {reserved} reserved by calls in flight, "
                      "{left} left.")


COMMANDS["limit"] = _limit
