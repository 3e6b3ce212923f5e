"""One cell's flow, as plain code the magic delegates to.

options -> chat context -> preflight (tokens, limit, cost, budget) -> rate limit -> client
stream (retried before any text) -> view -> turn and ledger. The kernel-wide state (the SDK
client, the session's key, the chats, the ledger) lives in one ``QwenSession`` per shell.
"""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from IPython.core.error import UsageError

from .cache import check_explicit_cache, with_cache_markers
from .catalog import Catalog, ModelInfo, load_catalog
from .client import (
    NO_KEY_HELP,
    CallState,
    ChatRequest,
    Connection,
    QwenAPIError,
    QwenClient,
    ReasoningDelta,
    Usage,
    mend,
)
from .context import NotebookContext
from .conversation import Chat, Turn, Window, fit_window, messages_for
from .formats import check_capabilities, parse_answer, protocol_for, question, with_json_hint
from .i18n import N_, _
from .ledger import Ledger
from .limits import RateLimiter, RetryPolicy
from .options import CellOptions
from .preflight import DryRun, Preflight, check_cost, check_input_limit, prepare
from .prompt import fill
from .pricing import UNKNOWN_PRICE_HINT, call_cost
from .regions import Region, resolve_region
from .result import COMPLETE, FAILED, INTERRUPTED, QwenResult
from .spending import DEFAULT_RESERVATION_TIMEOUT, Hold, reserve_call, reserve_job
from .store import QUICK_LOCK_WAIT, Owner, Store, StoreError, default_store_path, describe, expanded_path
from .tokens import count_chat_input, count_text
from .view import LiveWidgets, View, make_view

if TYPE_CHECKING:  # pragma: no cover
    # Imported when a cell asks for them: a plain cell never loads them.
    from .schema import AnswerSchema
    from .tools import Tool, ToolCall


STORE_REPLACED = N_(
    "The history file {path} was deleted or replaced while this kernel ran: a new one was started, "
    "and each chat is written to it whole with its next turn."
)
NO_STDIN = N_(
    "--confirm asks before each call, but this front end takes no input (nbconvert, papermill or "
    "a piped run); run the cell in Jupyter or IPython, or leave --confirm out."
)
ROUND_LIMIT = N_(
    "Stopped after {rounds} requests (--max-rounds {rounds}): the model still asked for {names}, "
    "which did not run. Raise --max-rounds to let it go on."
)
NEXT_ROUND_REFUSED = N_("The exchange stopped before its request {number}: {reason}")
SCHEMA_RETRY = N_("This answer does not match {schema} ({error}): asking again (try {attempt} of {tries}).")
SHARED_CHAT = N_(
    "Another kernel is writing chat {chat!r} of this notebook (is it open twice?): this kernel's turns "
    "are kept as {name!r}, and %qwen resume '{name}' brings them back."
)


class QwenInterrupted(KeyboardInterrupt):
    """The user interrupted the stream; the partial answer is kept, and Run All stops here."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class QwenFormatError(Exception):
    """The answer did not fit -f json / -f code; it is shown as it came and kept."""

    def __init__(self, reason: str, *, kept_in: str | None) -> None:
        reason = f"{reason[0].upper()}{reason[1:]}"
        if kept_in:
            said = _("{reason}; the raw answer is shown above and in {variable}.text.").format(
                reason=reason, variable=kept_in)
        else:
            said = _("{reason}; the raw answer is shown above.").format(reason=reason)
        super().__init__(said)

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


@dataclass(frozen=True)
class Settings:
    """The magic's settings for one call (traits, after the cell's options)."""

    model: str = "qwen-plus"
    system: str | None = None
    display: str = "auto"
    timeout: float | None = None
    base_url: str | None = None
    protocol: str = "native"
    budget: float | None = None
    max_retries: int = 3
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_history_tokens: int | None = None
    store_path: str | None = None
    stream: bool = True
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    max_value_tokens: int = 2000
    concurrency: int = 8  # --map: requests in flight
    region: str | None = None  # None: from the base URL's host or DASHSCOPE_REGION
    cache: bool = False  # --cache by default
    reservation_timeout: float = DEFAULT_RESERVATION_TIMEOUT


class _Ticker:
    """Says how long the first text is taking, then keeps pending updates flowing.

    One timer thread per session, started with the first answer and idle between answers
    (starting a thread for every cell would cost more than the cell's own bookkeeping).
    """

    # Often enough that the views' paced updates (one message per 60 ms at most) go out on
    # time: the stream only hands text over, the updates are sent from here.
    PERIOD = 0.02
    # A first text that comes sooner is shown without a waiting line flashing before it.
    WAIT_SHOWN_AFTER = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while the view is ticked: release() waits for it
        self._active = threading.Event()
        self._woken = threading.Event()  # a new view to watch: the sleep ends at once
        self._closed = False
        self._thread: threading.Thread | None = None
        self._view: View | None = None
        self._model = ""
        self._since = 0.0
        self._shown_second = -1
        self.text_started = False

    def watch(self, view: View, model: str, started: float) -> None:
        with self._lock:
            self._view, self._model, self._since = view, model, started
            self._shown_second = -1
            self.text_started = False
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="qwen-magic-ticker", daemon=True)
            self._thread.start()
        self._woken.set()
        self._active.set()

    def release(self) -> None:
        """Stop ticking the view; once this returns, the view is never called again."""
        self._active.clear()
        with self._lock:
            self._view = None

    def close(self) -> None:
        self._closed = True
        self.release()
        self._woken.set()
        self._active.set()

    def _run(self) -> None:
        delay = self.PERIOD
        while not self._closed:
            self._active.wait()
            if self._woken.wait(delay):
                self._woken.clear()  # a new view (or close): ticked at once
            delay = self.PERIOD
            with self._lock:
                if self._view is not None and not self._closed:
                    try:
                        delay = self._tick(self._view)
                    except Exception:  # the live view is best effort; the answer's own
                        self._view = None  # output is written by the cell, which reports failures

    def _tick(self, view: View) -> float:
        """Tick ``view``; return the seconds to sleep before the next tick."""
        view.tick()
        if self.text_started:
            # The views pace their updates: waking before one is due would only take the
            # interpreter from the stream (a fast answer's frames leave it no idle time).
            return max(self.PERIOD, view.next_update_in())
        waited = time.monotonic() - self._since
        if waited < self.WAIT_SHOWN_AFTER:
            return self.PERIOD
        second = int(waited)
        if second != self._shown_second:
            self._shown_second = second
            view.waiting(_("Waiting for {model}… {seconds} s").format(model=self._model, seconds=second))
        return self.PERIOD


@contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Hold Ctrl-C while the answer is written, so that no output or turn is left half-done.

    Yields a list that records the interrupts held back; the caller raises once done.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield []
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Plan:
    """One cell's request before it is sent."""

    prompt: str
    fmt: str
    model_name: str
    model: ModelInfo | None
    chat: Chat
    system: str | None
    window: Window
    messages: list[dict[str, Any]]
    preflight: Preflight
    region: Region
    notes: list[str] = field(default_factory=list)  # values summarised, context shortened
    tools: dict[str, Tool] = field(default_factory=dict)
    schema: AnswerSchema | None = None
    strict: bool = False  # --schema sent as json_schema (the model supports it)
    explicit_cache: bool = False  # the stable prefix is marked (--cache): reads cost 10%

    def parameters(self, options: CellOptions) -> dict[str, Any]:
        """The request's parameters: the options', the tools, the answer's format."""
        parameters = options.parameters()
        if self.tools:
            parameters["tools"] = [tool.definition() for tool in self.tools.values()]
            parameters["parallel_tool_calls"] = True
        if self.schema is not None:
            parameters["response_format"] = self.schema.response_format(self.strict)
        return parameters


@dataclass
class _Exchange:
    """What the rounds of one cell added up to: the calls run and the messages they made."""

    calls: list[ToolCall] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    usages: list[Usage] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)  # the later rounds' reservations against the limits


class QwenSession:
    """What one kernel keeps between cells."""

    def __init__(self) -> None:
        self.client = QwenClient()
        self.session_key: str | None = None
        self.chats: dict[str, Chat] = {}
        self.ledger = Ledger()
        self.limiter = RateLimiter()
        self.budget: float | None = None  # set by %qwen budget; None falls back to the trait
        self.budget_off = False
        self.retry_base_delay = 1.0
        self.notebook = "ipython"  # the magic sets the notebook's key (its path) before each cell
        self._stores: dict[Path, Store] = {}
        self._store_notes: list[str] = []  # said once, under the next answer or command
        self.owner = Owner()  # this kernel, as the writer of the chats it claims in the history
        # (history file, notebook, chat) -> the name its turns are stored under, once known
        self.stored_names: dict[tuple[Path, str, str], str] = {}
        self.ticker = _Ticker()
        self.widgets = LiveWidgets()  # the finished answers' widgets kept open

    def chat(self, name: str = "default") -> Chat:
        return self.chats.setdefault(name, Chat(name))

    def store_path(self, settings: Settings) -> Path:
        return expanded_path(settings.store_path) if settings.store_path else default_store_path()

    def store(self, settings: Settings) -> Store:
        """The history file (opened once per path); ``StoreError`` says why it cannot be used.

        A file deleted or replaced while the kernel runs is opened afresh (writes to the old
        one would be lost with it), and the next answer says so.
        """
        path = self.store_path(settings)
        store = self._stores.get(path)
        if store is not None and store.replaced():
            self.close_store(path)
            self._store_notes.append(_(STORE_REPLACED).format(path=path))
        if path not in self._stores:
            self._stores[path] = Store(path)
        return self._stores[path]

    def close_store(self, path: Path) -> None:
        store = self._stores.pop(path, None)
        if store is not None:
            store.close()

    def persist(self, settings: Settings, action: Callable[[Store], None], *,
                wait: float | None = None) -> list[str]:
        """Write to the history; a failure is a note under the answer, never a lost answer.

        ``wait``: the most seconds to wait for another program's lock. Return the notes to
        show (why the history was not saved, or that the file was started afresh).
        """
        said = len(self._store_notes)
        try:
            store = self.store(settings)
            said = len(self._store_notes)  # notes of the write itself: said only if it is kept
            with store.waiting_at_most(wait):
                action(store)
        except (StoreError, sqlite3.Error) as error:
            reason = describe(error, self.store_path(settings)) if isinstance(error, sqlite3.Error) else error
            del self._store_notes[said:]
            self._store_notes.append(_("History not saved: {reason}").format(reason=reason))
        notes, self._store_notes = self._store_notes, []
        return notes

    def write_chat(self, store: Store, chat: Chat, write: Callable[[str], None]) -> None:
        """Claim the chat's stored name and ``write(name)``, in one transaction (joined if open)."""
        with store.transaction():
            name, notes = self.claim(store, chat)
            write(name)
        self._store_notes.extend(notes)

    def claim(self, store: Store, chat: Chat) -> tuple[str, list[str]]:
        """The name this kernel writes ``chat`` under in the history, and what to tell the user.

        Claimed in the caller's transaction. When the name is newly claimed, the chat's turns
        in memory are written whole, so the stored copy can be resumed on its own (a second
        kernel's ``chat@2``, or a history file started afresh).
        """
        key = (store.path, self.notebook, chat.name)
        claim = store.claim(self.notebook, chat.name, self.owner, holds=self.stored_names.get(key))
        self.stored_names[key] = claim.name
        notes = []
        if claim.new:
            for position, turn in enumerate(chat.turns, start=1):
                store.save_turn(self.notebook, claim.name, position, turn.cell_id, turn.to_record())
            if claim.name != chat.name:
                notes.append(_(SHARED_CHAT).format(chat=chat.name, name=claim.name))
        if claim.kept:
            notes.append(_("This chat's turns from an earlier kernel are kept as {kept!r}: "
                           "%qwen resume '{kept}' brings them back.").format(kept=claim.kept))
        return claim.name, notes

    def forget_chat(self, store: Store, chat: Chat) -> None:
        """Empty the stored copy of the chat this kernel writes (never another kernel's)."""
        self.write_chat(store, chat, lambda name: store.delete_chat(self.notebook, name))

    def connection(self, settings: Settings, options: CellOptions | None = None) -> Connection:
        cell_base_url = options.base_url if options else None
        protocol = protocol_for(options.protocol if options else None, cell_base_url, settings.protocol)
        return Connection(api_key=self.session_key, base_url=cell_base_url or settings.base_url, protocol=protocol,
                          timeout=settings.timeout, base_url_as_given=cell_base_url is not None)

    def region(self, settings: Settings, options: CellOptions | None = None) -> Region:
        """The region the call goes to: its price sheet and currency."""
        return resolve_region(settings.region, (options.base_url if options else None) or settings.base_url)

    def catalog(self, settings: Settings, region: Region | None = None) -> Catalog:
        from .catalog import CatalogError

        try:
            return load_catalog(settings.models, (region or self.region(settings)).sheet)
        except CatalogError as error:
            raise UsageError(_("The model catalog cannot be used: {error}").format(error=error)) from None

    def effective_budget(self, settings: Settings) -> float | None:
        if self.budget_off:
            return None
        return self.budget if self.budget is not None else settings.budget

    def ask(
        self,
        prompt: str,
        options: CellOptions,
        settings: Settings,
        *,
        cell_id: str | None,
        cell_label: str,
        in_kernel: bool,
        display: Callable[..., Any],
        namespace: Mapping[str, Any] | None = None,
        context: NotebookContext | None = None,
    ) -> QwenResult | DryRun:
        """Send one cell, stream the answer into its view, record the turn."""
        plan = self._plan(prompt, options, settings, cell_id=cell_id, namespace=namespace, context=context)
        if options.dry_run:
            return DryRun(plan.preflight, plan.window.note(), tuple(plan.notes))
        check_input_limit(plan.preflight)
        check_cost(plan.preflight, spent=self.ledger.total_in(plan.preflight.currency),
                   budget=self.effective_budget(settings), max_cost=options.max_cost)
        # The user's spending limits, across kernels: the worst case is held until the call is settled.
        spending = reserve_call(self, settings, plan.preflight, plan.region)
        connection = self.connection(settings, options)
        sdk = self.client.sdk_client(connection)  # resolved once: the key check and the call
        if connection.protocol == "native" and not sdk.config.api_key:
            raise UsageError(_(NO_KEY_HELP))
        if options.confirm and not _stdin_available(in_kernel):
            raise UsageError(_(NO_STDIN))

        request = ChatRequest(
            model=plan.model_name,
            messages=tuple(plan.messages),
            parameters=plan.parameters(options),
            stream=settings.stream if options.stream is None else options.stream,
        )
        def new_view() -> View:
            # A front end that shows widgets sends the cell's id; nbconvert and papermill do not.
            return make_view(settings.display, in_kernel=in_kernel, display=display, fmt=plan.fmt,
                             front_end=cell_id is not None, widgets=self.widgets)

        view = new_view()
        early_notes: list[str] = list(spending.notes)
        if options.new:
            plan.chat.reset()
            early_notes += self.persist(settings, lambda store: self.forget_chat(store, plan.chat),
                                        wait=QUICK_LOCK_WAIT)
        if not options.no_history:
            plan.chat.system = plan.system
        retry = RetryPolicy(settings.max_retries, base_delay=self.retry_base_delay)
        if plan.tools or plan.schema is not None:
            result, error, exchange, view = self._converse(request, plan, options, settings, connection, view, retry,
                                                           sdk, new_view)
        else:
            result, error = self._send(request, plan.preflight, connection, view, retry, sdk)
            exchange = None

        with _interrupts_held() as held:
            record, save = self._settle(plan, result, options, settings, cell_id=cell_id, cell_label=cell_label,
                                        exchange=exchange)
            for hold in [spending, *(exchange.holds if exchange else [])]:
                save = hold.settling(save)  # the reservation goes when the billed cost is written
            view.finish(result, record)  # the whole answer first: the history may have to wait
            notes = list(dict.fromkeys(early_notes + self.persist(settings, save, wait=QUICK_LOCK_WAIT)))
            if notes:
                result.notes.extend(notes)
                view.update_footer(result, record)
        if held and result.status == COMPLETE:
            late = QwenInterrupted(_("stopped as the answer was being saved; it is complete and kept."))
            late.result = result
            raise late
        if result.status == INTERRUPTED:
            interrupted = QwenInterrupted(
                _("the answer was interrupted; its partial text is kept above.") if options.no_history
                else _("the answer was interrupted; its partial text is kept above and in the chat."))
            interrupted.result = result
            raise interrupted
        if error is not None:
            error.result = result  # so that -o still gets the partial answer
            raise error
        return result

    def _send(self, request: ChatRequest, preflight: Preflight, connection: Connection, view: View,
              retry: RetryPolicy, sdk: Any, state: CallState | None = None) -> tuple[QwenResult, QwenAPIError | None]:
        """One request under the rate limits, streamed into ``view``."""
        try:
            self._wait_for_rate_limit(preflight, view)
        except KeyboardInterrupt:
            raise QwenInterrupted(_("stopped while waiting for the rate limit; nothing was sent.")) from None
        # Windows are per catalog entry: an aliased name shares its entry's limits.
        model = preflight.model
        sent = self.limiter.record(model.name if model else preflight.model_name, preflight.input_tokens)
        result, error = self._stream(request, connection, view, retry, preflight, sdk=sdk, state=state)
        self.limiter.settle(sent, result.usage.total_tokens)
        return result, error

    def _converse(self, request: ChatRequest, plan: "_Plan", options: CellOptions, settings: Settings,
                  connection: Connection, view: View, retry: RetryPolicy, sdk: Any, new_view: Callable[[], View],
                  ) -> tuple[QwenResult, QwenAPIError | None, _Exchange, View]:
        """Requests until the model answers in text: its tool calls run and answered, an answer
        that fails --schema asked again (in a view of its own). Return the last round's result
        with the usage of all of them, what the exchange holds, and the view the answer is in."""
        exchange = _Exchange()
        shown: list[str] = []  # text of earlier rounds, still in the view
        tries = 1 + (options.retries if plan.schema is not None else 0)
        attempt = rounds = 0
        preflight = plan.preflight
        result: QwenResult | None = None
        error: QwenAPIError | None = None
        text = ""
        try:
            while True:
                rounds += 1
                state = CallState(answer=list(shown))
                result, error = self._send(request, preflight, connection, view, retry, sdk, state)
                exchange.usages.append(result.usage)
                text = mend("".join(state.answer[len(shown):]))
                calls = state.merged_tool_calls() if result.status == COMPLETE and plan.tools else []
                if calls and rounds >= options.max_rounds:
                    names = ", ".join(dict.fromkeys(call["function"]["name"] for call in calls))
                    result.notes.append(_(ROUND_LIMIT).format(rounds=rounds, names=names))
                elif calls:
                    exchange.messages.append({"role": "assistant", "content": text, "tool_calls": calls})
                    if not self._run_calls(calls, plan.tools, options, view, exchange):
                        result.status, text = INTERRUPTED, ""
                        break
                    request = dataclasses.replace(request, messages=request.messages + tuple(exchange.messages[-len(calls) - 1:]))
                    shown = list(state.answer) + (["\n\n"] if text else [])
                    preflight, refusal = self._next_round(request, plan, options, settings, exchange)
                    if refusal is None:
                        continue
                    result.notes.append(refusal)
                    text = ""
                    break
                attempt += 1
                problem = _schema_problem(plan, result) if result.status == COMPLETE else None
                if problem is None or attempt >= tries:
                    break
                # The failed answer stays shown as it came; the next one gets a view of its own.
                result.cost = call_cost(plan.model, result.usage, explicit_cache=plan.explicit_cache)
                result.format, result.format_error = plan.fmt, problem
                result.notes.append(_(SCHEMA_RETRY).format(schema=plan.schema.name, error=problem, attempt=attempt + 1,
                                                        tries=tries))
                request = dataclasses.replace(request, messages=request.messages + (
                    {"role": "assistant", "content": result.text},
                    {"role": "user", "content": schema_retry_prompt(problem)},
                ))
                preflight, refusal = self._next_round(request, plan, options, settings, exchange)
                if refusal is not None:
                    result.notes[-1] = refusal
                    break
                view.finish(result, {})
                view = new_view()
        except KeyboardInterrupt:
            # ■ between two steps (the next round's count, a view made, the rate limit's wait):
            # what the earlier rounds showed and ran is kept, as in an interrupted stream.
            if result is None:
                raise
            result.status, error = INTERRUPTED, None
            if exchange.messages and exchange.messages[-1]["role"] == "tool":
                text = ""  # the round's text went with its calls
        if exchange.messages:
            exchange.messages.append({"role": "assistant", "content": text})
        result.tool_calls = exchange.calls
        result.usage = _summed(exchange.usages)
        return result, error, exchange, view

    def _next_round(self, request: ChatRequest, plan: "_Plan", options: CellOptions, settings: Settings,
                    exchange: _Exchange) -> tuple[Preflight, str | None]:
        """The next request's count and cost, and why it may not be sent (the cell's --max-cost,
        the budget, counting what the cell has spent already, or the spending limits), or None.

        Sent, its worst case is reserved against the limits (in ``exchange.holds``) as the first
        request's was, until the cell's costs are written."""
        from .tools import calls_tokens, tools_tokens

        preflight = prepare(plan.model_name, plan.model, request.messages, max_tokens=options.max_tokens,
                            thinking=options.thinking, thinking_budget=options.thinking_budget,
                            extra_tokens=tools_tokens(plan.tools) + calls_tokens(request.messages),
                            currency=plan.region.currency.code, cache_marked=plan.explicit_cache)
        spent = sum(call_cost(plan.model, usage, explicit_cache=plan.explicit_cache) or 0.0 for usage in exchange.usages)
        try:
            check_input_limit(preflight)
            check_cost(preflight, spent=self.ledger.total_in(plan.preflight.currency) + spent,
                       budget=self.effective_budget(settings),
                       max_cost=None if options.max_cost is None else options.max_cost - spent)
            exchange.holds.append(reserve_job(self, settings, preflight.estimate.worst_cost, plan.region,
                                              what=f"{plan.model_name} call", model=plan.model_name))
        except UsageError as refused:
            return preflight, _(NEXT_ROUND_REFUSED).format(number=len(exchange.usages) + 1, reason=refused)
        return preflight, None

    def _run_calls(self, calls: list[dict[str, Any]], tools: Mapping[str, Tool], options: CellOptions, view: View,
                   exchange: _Exchange) -> bool:
        """Run the round's calls in order, each shown as it starts and ends; every call gets its
        tool message (those not run say why). False if ■ stopped them."""
        from .tools import prepare_call, run_call

        pending = [prepare_call(call["id"], call["function"]["name"], call["function"]["arguments"], tools)
                   for call in calls]
        stopped = False
        for call, runner in pending:
            exchange.calls.append(call)
            if stopped:
                call.error = "not run: the user stopped the exchange"
                continue
            try:
                view.notice(call.shown())
                if runner is not None and options.confirm and not _confirmed(call):
                    call.error = "the user declined to run this call"
                elif runner is not None:
                    run_call(call, runner)
                view.notice(call.outcome())
            except KeyboardInterrupt:
                stopped = True
                if call.result is None and call.error is None:
                    call.error = "interrupted by the user"
        exchange.messages.extend(call.message() for call, _runner in pending)
        return not stopped

    def _plan(
        self,
        prompt: str,
        options: CellOptions,
        settings: Settings,
        *,
        cell_id: str | None,
        namespace: Mapping[str, Any] | None,
        context: NotebookContext | None = None,
    ) -> "_Plan":
        """What the request will carry: the filled prompt, the chat's window, the count."""
        # Blank lines around the cell's text are not part of the question (and cost tokens).
        prompt = prompt.strip("\n").rstrip()
        if not prompt.strip() and not options.fix:
            raise UsageError(_("The %%qwen cell is empty: write a question below the %%qwen line."))
        notes: list[str] = []
        if options.interpolate and namespace is not None:
            prompt = fill(prompt, namespace, value_tokens=settings.max_value_tokens, notes=notes)
        # Both named from the notebook, and refused before anything is sent.
        tools: dict[str, Tool] = {}
        schema: AnswerSchema | None = None
        tool_tokens = 0
        if options.tools:
            from .tools import tools_from, tools_tokens

            tools = tools_from(options.tools, namespace or {})
            tool_tokens = tools_tokens(tools)
        if options.schema:
            from .schema import schema_from

            schema = schema_from(options.schema, namespace or {})
        fmt = "json" if schema is not None else options.format or ("code" if options.fix else "markdown")
        model_name = options.model or settings.model
        region = self.region(settings, options)
        catalog = self.catalog(settings, region)
        model = catalog.get(settings.model_aliases.get(model_name, model_name))
        attached = None
        if context is not None and (options.fix or options.cells is not None or options.files):
            # Placed around the filled question: the cells' and files' own braces are not filled.
            attached = context.attach(options, max_input=model.max_input if model else None, model_name=model_name,
                                      value_tokens=settings.max_value_tokens)
            prompt = attached.around(prompt)
            notes += attached.notes
        # A value read with errors="surrogateescape" brings lone surrogates, which no request,
        # output or history can carry: they are sent as U+FFFD, as the answer's would be.
        prompt = mend(prompt)
        check_capabilities(model_name, model, catalog, thinking=options.thinking, images=bool(options.images))
        explicit_cache = settings.cache if options.cache is None else options.cache
        if explicit_cache:
            check_explicit_cache(model_name, model, catalog)
        if model is not None and model.max_output and options.max_tokens and options.max_tokens > model.max_output:
            raise UsageError(_(
                "--max-tokens {max_tokens:,} is more than {model} can write: at most {limit:,} tokens (%qwen models)."
            ).format(max_tokens=options.max_tokens, model=model_name, limit=model.max_output))
        chat = self.chat(options.chat)
        # -n: afresh, without the old turns or system prompt (the chat itself is emptied
        # only once the call is really sent: a refused call changes nothing).
        system = (options.system or (attached.system if attached else None)
                  or (None if options.new else chat.system) or settings.system)
        system = mend(system) if system else system
        strict = schema is not None and model is not None and model.json_schema
        if schema is not None and model is not None and model.thinking == "only":
            raise UsageError(_("{model} always thinks, and thinking has no JSON mode: --schema needs another model.").format(
                model=model_name))
        request_system = system
        if schema is not None and not strict:  # json_object: the schema is said in the prompt
            request_system = "\n\n".join(filter(None, [system, schema.system_line()]))
        request_system = with_json_hint(request_system, prompt) if fmt == "json" else request_system
        user_content = question(prompt, options.images)
        # The tools' definitions are input too (the server puts them in the prompt).
        extra = (model.extra_input_tokens(options.thinking) if model else 0) + tool_tokens
        window = fit_window(
            [] if options.no_history or options.new else chat.context_for(cell_id),
            fixed_tokens=count_chat_input(messages_for(request_system, [], user_content), extra_tokens=extra),
            input_limit=model.max_input if model else None,
            max_turns=options.max_history,
            max_history_tokens=settings.max_history_tokens,
            model_name=model_name,
        )
        messages = messages_for(request_system, window.turns, user_content)
        if explicit_cache:
            messages = with_cache_markers(messages)
        preflight = prepare(model_name, model, messages, max_tokens=options.max_tokens, thinking=options.thinking,
                            thinking_budget=options.thinking_budget, extra_tokens=tool_tokens,
                            currency=region.currency.code, cache_marked=explicit_cache)
        return _Plan(prompt, fmt, model_name, model, chat, system, window, messages, preflight, region, notes=notes,
                     tools=tools, schema=schema, strict=strict, explicit_cache=explicit_cache)

    def _settle(
        self,
        plan: "_Plan",
        result: QwenResult,
        options: CellOptions,
        settings: Settings,
        *,
        cell_id: str | None,
        cell_label: str,
        exchange: _Exchange | None = None,
    ) -> tuple[dict[str, Any], Callable[[Store], None]]:
        """The answer's format, cost, notes, ledger entry and turn, in memory.

        Return the turn's record, and the write that keeps the call and the turn in the
        history (run once the answer is shown).
        """
        result.format = plan.fmt
        if result.status == COMPLETE:
            parsed = parse_answer(plan.fmt, result.text)
            result.value, result.code, result.format_error = parsed.value, parsed.code, parsed.error
            if plan.fmt == "code" and parsed.code is None:
                result.notes.append(_("The answer has no code block: no cell was added."))
            if plan.schema is not None and parsed.error is None:
                result.value, result.format_error = plan.schema.validate(parsed.value)
                if result.format_error:
                    result.format_error = _("the answer does not match {schema}: {error}").format(
                        schema=plan.schema.name, error=result.format_error)
        # Each request is billed at its own tier: a cell of several requests costs their sum.
        rounds = exchange.usages if exchange and len(exchange.usages) > 1 else [result.usage]
        costs = [call_cost(plan.model, usage, explicit_cache=plan.explicit_cache) for usage in rounds]
        result.cost = None if None in costs else sum(costs)
        result.currency = plan.region.currency.code
        if result.cost is None:
            result.notes.append(_(UNKNOWN_PRICE_HINT).format(model=plan.model_name))
        if plan.window.note():
            result.notes.append(plan.window.note())
        result.notes.extend(plan.notes)
        chat_name = None if options.no_history else plan.chat.name
        self.ledger.add(cell=cell_label, chat=chat_name, model=plan.model_name, usage=result.usage,
                        cost=result.cost, status=result.status, elapsed=result.elapsed, currency=result.currency)
        result.session_cost = self.ledger.total_in(result.currency)
        turn = Turn(prompt=plan.prompt, result=result, cell_id=cell_id, system=plan.system,
                    exchange=exchange.messages if exchange else [])
        result.chat = chat_name
        # The chat's first write in this kernel claims its stored copy: turns left by an earlier
        # kernel (not resumed) are set aside under another name, not mixed in.
        recorded = not options.no_history and plan.chat.accepts(turn)
        if recorded:
            result.turn = plan.chat.record(turn)
        elif not options.no_history:
            result.turn = plan.chat.position_for(cell_id)
            result.notes.append(_("The cell's earlier answer stays in the chat: this one failed."))
        else:
            result.turn = None
        record = turn.to_record()
        notebook = self.notebook

        def save(store: Store) -> None:
            with store.transaction():  # the call and its turn: one commit
                store.add_call(notebook, result.chat, result.model, result.usage.input_tokens,
                               result.usage.output_tokens, result.cost, result.status,
                               currency=result.currency, region=plan.region.key,
                               cached_tokens=result.usage.cached_tokens,
                               cache_creation_tokens=result.usage.cache_creation_tokens,
                               searches=result.usage.searches)
                if recorded:
                    self.write_chat(store, plan.chat,
                                    lambda name: store.save_turn(notebook, name, result.turn, cell_id, record))

        return record, save

    def _wait_for_rate_limit(self, preflight: Preflight, view: View) -> None:
        """Wait, saying so, until the model's QPM and TPM windows have room for this call."""
        model = preflight.model
        if model is not None and model.tpm is not None and preflight.input_tokens > model.tpm:
            raise UsageError(_(
                "Refused, nothing sent: {tokens:,} input tokens is more than {model}'s whole limit of "
                "{tpm:,} tokens per minute."
            ).format(tokens=preflight.input_tokens, model=model.name, tpm=model.tpm))
        announced = False
        while True:
            wait, reason = self.limiter.wait_needed(model, preflight.input_tokens)
            if wait <= 0:
                return
            message = _("Rate limit of {model} ({reason}): waiting {seconds:.1f} s before sending.").format(
                model=preflight.model_name, reason=reason, seconds=wait)
            if announced:
                view.waiting(message)
            else:
                view.notice(message)
                announced = True
            time.sleep(min(wait, 0.5))

    def _stream(
        self,
        request: ChatRequest,
        connection: Connection,
        view: View,
        retry: RetryPolicy,
        preflight: Preflight,
        *,
        sdk: Any = None,
        state: CallState | None = None,
    ) -> tuple[QwenResult, QwenAPIError | None]:
        """Drive the view from the stream; an interrupt or a failure keeps the partial text."""
        state = state if state is not None else CallState()
        reasoning: list[str] = []
        started = time.monotonic()
        first_text_after: float | None = None
        status, failure = COMPLETE, None

        def on_retry(error: QwenAPIError, delay: float, attempt: int) -> None:
            view.notice(_("{code} from the server: retrying in {delay:.1f} s (try {attempt} of {tries}).").format(
                code=error.code, delay=delay, attempt=attempt + 1, tries=retry.max_retries + 1))

        ticker = self.ticker
        ticker.watch(view, request.model, started)
        self.widgets.trim()  # earlier answers' widgets past the bound: closed while the request waits
        events = self.client.stream(connection, request, state, retry=retry, on_retry=on_retry, sdk=sdk)
        try:
            # Events are few: the thinking, and the answer's start. The answer itself goes into
            # state.answer, where the view reads it (at once, then on the timer thread's ticks).
            for event in events:
                if type(event) is ReasoningDelta:
                    reasoning.append(event.text)
                    view.add_reasoning(event.text)
                else:
                    first_text_after = time.monotonic() - started
                    ticker.text_started = True
                    view.show_answer(state.answer)
        except KeyboardInterrupt:
            status = INTERRUPTED
        except QwenAPIError as error:
            status, failure = FAILED, error
        finally:
            events.close()  # an interrupt outside the stream's own code: it still reads its last frame
            ticker.release()
        # The answer's pieces come as the frames had them: joined, a surrogate pair split between
        # two frames is whole again, and a stray half is replaced, so that nothing can fail the
        # output, the history or the count of a billed call.
        answer, thought = mend("".join(state.answer)), mend("".join(reasoning))
        usage = state.usage
        if status != COMPLETE and (answer or thought or state.request_id) and not usage.input_tokens:
            # Cut off before the server reported usage (compatible mode reports it last): it
            # still bills what it read and wrote. A call refused or never answered costs nothing.
            thought_tokens = count_text(thought)
            usage = Usage(input_tokens=preflight.input_tokens, output_tokens=count_text(answer) + thought_tokens,
                          reasoning_tokens=thought_tokens)
        result = QwenResult(
            text=answer,
            model=request.model,
            usage=usage,
            request_id=state.request_id,
            elapsed=time.monotonic() - started,
            first_text_after=first_text_after,
            status=status,
            finish_reason=state.finish_reason,
            reasoning=thought,
            error=failure.code if failure else None,
            search_results=state.search_results,
        )
        return result, failure

    def close(self) -> None:
        self.ticker.close()
        self.widgets.close()
        self.client.close()
        for store in self._stores.values():
            try:
                store.release(self.owner)  # the next kernel on this notebook takes its chats
            except StoreError:
                pass
            store.close()
        self._stores.clear()


def schema_retry_prompt(problem: str) -> str:
    from .schema import RETRY_PROMPT

    return RETRY_PROMPT.format(error=problem)


def _summed(usages: list[Usage]) -> Usage:
    """The usage of several requests, figure by figure."""
    if len(usages) == 1:
        return usages[0]
    return Usage(**{name: sum(getattr(usage, name) for usage in usages) for name in Usage.__dataclass_fields__})


def _schema_problem(plan: _Plan, result: QwenResult) -> str | None:
    """Why the answer does not fit --schema (not JSON, or the first failing field), or None."""
    parsed = parse_answer("json", result.text)
    if parsed.error is not None:
        return parsed.error
    assert plan.schema is not None
    return plan.schema.validate(parsed.value)[1]


def _stdin_available(in_kernel: bool) -> bool:
    """Whether input() can ask the user: the front end allows it, or a terminal is there."""
    if in_kernel:
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        return bool(getattr(kernel, "_allow_stdin", False))
    return sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty()


def _confirmed(call: ToolCall) -> bool:
    """y/n before a call runs; no way to ask counts as no."""
    from IPython.core.error import StdinNotImplementedError

    from .tools import ask_confirmation

    try:
        return ask_confirmation(call, input)
    except (StdinNotImplementedError, EOFError, OSError):
        return False
