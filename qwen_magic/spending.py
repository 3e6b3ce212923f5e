"""Spending limits for the whole user, across kernels: reserve before sending, settle after.

``%qwen limit daily 5`` and ``%qwen limit monthly 100`` are kept in the history file, so every
kernel and notebook of the user (and the next kernel after a restart) enforces them. Before a
call is sent, its worst case is *reserved* in one ``BEGIN IMMEDIATE`` transaction against what
all kernels have spent and still hold reserved in the period; two kernels cannot both take the
last of a limit, as the second one's transaction sees the first one's reservation. After the
answer the reservation is *settled*: dropped in the transaction that records the call's billed
cost (an interrupted or failed call records what it cost). A kernel that dies with a
reservation open cannot settle it: it is released once its process is known to have ended (on
this machine), or after ``QwenMagic.reservation_timeout`` seconds otherwise.

Days and months are local time, the machine's time zone (what "today" means to its user).
Limits are per currency: a limit set while working in Singapore is in dollars and counts
only the calls billed in dollars.

Jobs (``--map``, ``--batch``) use the same two steps for their whole worst case::

    hold = reserve_job(session, settings, worst_case, region, what="--map summaries (120 rows)")
    ...  # as rows' calls are recorded: hold.lower(store, worst case of the rows still to run)
    hold.settle(store)  # in the transaction that writes the last rows' calls, or after it
"""

from __future__ import annotations

import functools
import getpass
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from IPython.core.error import UsageError

from .i18n import N_, _
from .pricing import format_money, round_figure
from .store import Owner, Store, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import QwenSession, Settings
    from .preflight import Preflight
    from .regions import Region

PERIODS = ("daily", "monthly")
# A reservation no kernel settled is released after this long (its kernel may still run on
# another machine, where its process cannot be checked): longer than any one call.
DEFAULT_RESERVATION_TIMEOUT = 30 * 60.0

# {period} is the command's word (daily, monthly); {period_name} the same in the current language.
REFUSED = N_(
    "Refused, nothing sent: this call could cost up to {worst}, more than is left of your {period_name} limit of "
    "{limit} ({spent} spent {since}, {reserved} reserved by calls in flight, {left} left). To go ahead, "
    "raise the limit (%qwen limit {period} {suggested}), lower --max-tokens, or wait until {resets}."
)
UNBOUNDED = N_(
    "Refused, nothing sent: a {period_name} spending limit is set but {model}'s price is unknown, so its cost "
    "cannot be bounded. Add its price with %config QwenMagic.models, or turn the limit off "
    "(%qwen limit {period} off)."
)
NOT_CHECKED = N_("Spending limits not checked: {reason}")
# The periods in sentences ("your daily limit"), and when they began and start again.
PERIOD_NAMES = {"daily": N_("daily"), "monthly": N_("monthly")}
_SINCE = {"daily": N_("today"), "monthly": N_("this month")}
_RESETS = {"daily": N_("tomorrow"), "monthly": N_("next month")}


@functools.lru_cache(maxsize=1)
def current_user() -> str:
    """The login name: the history file may be shared, the limits are the user's (read once:
    a process's user does not change)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return ""


def period_start(period: str, now: float) -> float:
    """Unix time at which today (``daily``) or this month (``monthly``) began, in local time."""
    local = datetime.fromtimestamp(now)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "monthly":
        start = start.replace(day=1)
    return start.timestamp()


def period_name(period: str) -> str:
    """``daily`` or ``monthly`` in the current language."""
    return _(PERIOD_NAMES[period])


def _resets(period: str, now: float) -> str:
    return _(_RESETS[period])


def local_zone() -> str:
    """The machine's time zone, as limits' days and months are counted in it."""
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    return f"{now.strftime('%Z')}, UTC{offset[:3]}:{offset[3:]}"


@dataclass
class Hold:
    """A reservation: ``amount`` held in the history file until it is settled.

    ``id`` is None when nothing was held (no limit in the currency, or the file could not be
    used: ``notes`` says so).
    """

    id: int | None
    amount: float
    currency: str
    notes: list[str] = field(default_factory=list)
    owner: Owner | None = None  # the kernel that holds it

    def lower(self, store: Store, amount: float) -> None:
        """Hold only ``amount`` from now on (a job whose rows are done needs less)."""
        if self.id is not None and self.owner is not None:
            store.change_reservation(self.id, self.owner, max(amount, 0.0))
            self.amount = max(amount, 0.0)

    def settle(self, store: Store) -> None:
        """Release the reservation: the calls' billed costs are recorded (or about to be)."""
        if self.id is not None and self.owner is not None:
            store.change_reservation(self.id, self.owner, None)
            self.id = None

    def settling(self, save: Callable[[Store], None]) -> Callable[[Store], None]:
        """``save`` (which records the call's cost) and the settlement, in one transaction."""

        def save_and_settle(store: Store) -> None:
            with store.transaction():
                save(store)
                self.settle(store)

        return save_and_settle


@dataclass(frozen=True)
class Standing:
    """One limit, what counts against it now, and what is left."""

    period: str
    limit: float
    spent: float
    reserved: float
    currency: str

    @property
    def left(self) -> float:
        return max(self.limit - self.spent - self.reserved, 0.0)


def standings(store: Store, currency: str, *, user: str | None = None, now: float | None = None,
              timeout: float = DEFAULT_RESERVATION_TIMEOUT, owner: Owner | None = None) -> list[Standing]:
    """Each limit in ``currency`` with what is spent and reserved against it (stale reservations released)."""
    user = current_user() if user is None else user
    now = time.time() if now is None else now
    with store.transaction():
        limits = store.limits(user, currency)
        reserved = _live_reservations(store, user, currency, now, timeout, owner or Owner())
        return [Standing(period, limits[period], store.spent_since(currency, period_start(period, now)),
                         reserved, currency) for period in PERIODS if period in limits]


def _live_reservations(store: Store, user: str, currency: str, now: float, timeout: float, owner: Owner) -> float:
    """The amount reserved by calls still in flight; a dead kernel's or a stale one's is released."""
    stale, held = [], 0.0
    for reservation, holder, host, pid, amount, at in store.open_reservations(user, currency):
        if holder != owner.id and (now - at > timeout or owner.outlived(holder, host, pid)):
            stale.append(reservation)
        else:
            held += amount
    if stale:
        store.release_reservations(stale)
    return held


def reserve(store: Store, owner: Owner, amount: float | None, currency: str, *, what: str,
            model: str | None = None, user: str | None = None, now: float | None = None,
            timeout: float = DEFAULT_RESERVATION_TIMEOUT) -> Hold:
    """Hold ``amount`` (the worst case) against every limit in ``currency``, or refuse.

    One transaction (``BEGIN IMMEDIATE``): reading the spend and reservations and writing this
    one cannot interleave with another kernel's. A refusal is a ``UsageError`` that says which
    limit, what is spent and reserved, and how to go on. ``amount`` None: the price is unknown.
    """
    user = current_user() if user is None else user
    now = time.time() if now is None else now
    if not store.limits(user, currency):  # a read, which no other writer blocks: no limit, no hold
        return Hold(None, 0.0, currency)
    with store.transaction():
        found = standings(store, currency, user=user, now=now, timeout=timeout, owner=owner)
        if not found:
            return Hold(None, 0.0, currency)
        for standing in found:
            if amount is None:
                raise UsageError(_(UNBOUNDED).format(period=standing.period, period_name=period_name(standing.period),
                                                      model=model or _("this model")))
            if amount > standing.left + 1e-12:
                raise UsageError(refusal(standing, amount, now))
        return Hold(store.add_reservation(user, owner, currency, amount or 0.0, what), amount or 0.0, currency,
                    owner=owner)


def refusal(standing: Standing, worst: float, now: float) -> str:
    money = lambda value: format_money(value, standing.currency)  # noqa: E731
    needed = standing.spent + standing.reserved + worst
    return _(REFUSED).format(
        worst=money(worst), period=standing.period, period_name=period_name(standing.period),
        limit=money(standing.limit), spent=money(standing.spent),
        since=_(_SINCE[standing.period]), reserved=money(standing.reserved),
        left=money(standing.left), suggested=round_figure(needed), resets=_resets(standing.period, now),
    )


# ---- one %%qwen call: the engine's two steps


# A kernel runs one cell at a time: a call's hold still open when the next call reserves was
# never sent (a missing key, an interrupt while waiting for the rate limit) and is released.
_call_holds: "weakref.WeakKeyDictionary[QwenSession, tuple[Store, Hold]]" = weakref.WeakKeyDictionary()


def reserve_call(session: "QwenSession", settings: "Settings", preflight: "Preflight", region: "Region") -> Hold:
    """Before sending one cell's call: reserve its worst case against the user's limits."""
    try:
        store = session.store(settings)
    except StoreError as error:
        return Hold(None, 0.0, region.currency.code, [_(NOT_CHECKED).format(reason=error)])
    earlier = _call_holds.pop(session, None)
    if earlier is not None and earlier[1].id is not None:
        try:
            earlier[1].settle(earlier[0])
        except StoreError:  # that file is gone or closed: its hold goes with the timeout
            pass
    hold = reserve_job(session, settings, preflight.estimate.worst_cost, region,
                       what=f"{preflight.model_name} call", model=preflight.model_name)
    if hold.id is not None:
        _call_holds[session] = (store, hold)
    return hold


def reserve_job(session: "QwenSession", settings: "Settings", amount: float | None, region: "Region", *,
                what: str, model: str | None = None) -> Hold:
    """Reserve ``amount`` (a call's or a whole job's worst case) in the session's history file.

    A refusal is a ``UsageError``; a history file that cannot be used gives a ``Hold`` that
    holds nothing, with a note saying the limits were not checked. Settle with
    ``hold.settle(session.store(settings))`` (or ``hold.settling(save)`` around the write that
    records the calls' costs); ``hold.lower(store, amount)`` as a job's rows finish.
    """
    currency = region.currency.code
    try:
        store = session.store(settings)
        return reserve(store, session.owner, amount, currency, what=what, model=model,
                       timeout=settings.reservation_timeout)
    except StoreError as error:
        return Hold(None, 0.0, currency, [_(NOT_CHECKED).format(reason=error)])
