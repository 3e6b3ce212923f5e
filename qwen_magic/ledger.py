"""Every call of the session, with its tokens and cost: what ``%qwen usage`` shows."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from .client import Usage
from .i18n import N_, _, ngettext
from .pricing import format_money
from .result import status_label
from .tables import aligned, html_table

ONE_OFF = N_("(one-off)")  # the chat column of a --no-history call


@dataclass(frozen=True)
class CallRecord:
    number: int
    cell: str
    chat: str | None  # None: a one-off question (--no-history)
    model: str
    usage: Usage
    cost: float | None
    status: str
    elapsed: float
    rows: int | None = None  # a job over rows (--map): one line for all its rows
    currency: str = "CNY"  # the region's, which the cost is in
    batch: bool = False  # the job went through DashScope's Batch API (--batch)


@dataclass
class ModelTotals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    unpriced_calls: int = 0


@dataclass
class Ledger:
    records: list[CallRecord] = field(default_factory=list)
    # Kept as calls are added (in the same order a sum would add them): every cell reads them
    # twice, and a long session has thousands of calls.
    _by_currency: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for record in self.records:
            self._by_currency[record.currency] = self._by_currency.get(record.currency, 0.0) + (record.cost or 0.0)

    def add(self, *, cell: str, chat: str | None, model: str, usage: Usage, cost: float | None,
            status: str, elapsed: float, rows: int | None = None, currency: str = "CNY",
            batch: bool = False) -> CallRecord:
        record = CallRecord(len(self.records) + 1, cell, chat, model, usage, cost, status, elapsed, rows, currency,
                            batch)
        self.records.append(record)
        self._by_currency[currency] = self._by_currency.get(currency, 0.0) + (cost or 0.0)
        return record

    def total_in(self, currency: str) -> float:
        """Spent this session in one currency (yuan and dollars are never added together)."""
        return self._by_currency.get(currency, 0.0)

    def totals_by_currency(self) -> dict[str, float]:
        return dict(self._by_currency)

    @property
    def total_cost(self) -> float:
        """Spent this session, all currencies added (calls of unknown price count as 0): for a
        session in one region; ``total_in`` keeps yuan and dollars apart."""
        return sum(self._by_currency.values())

    def per_model(self) -> dict[tuple[str, str], ModelTotals]:
        """Totals per (model, currency): a model used in two regions is billed in two currencies."""
        totals: dict[tuple[str, str], ModelTotals] = {}
        for record in self.records:
            entry = totals.setdefault((record.model, record.currency), ModelTotals())
            entry.calls += 1
            entry.input_tokens += record.usage.input_tokens
            entry.output_tokens += record.usage.output_tokens
            if record.cost is None:
                entry.unpriced_calls += 1
            else:
                entry.cost += record.cost
        return totals


def _chat_column(record: CallRecord) -> str:
    if record.rows is not None and record.batch:
        return ngettext("(batch, {rows:,} row)", "(batch, {rows:,} rows)", record.rows).format(rows=record.rows)
    if record.rows is not None:
        return ngettext("(map, {rows:,} row)", "(map, {rows:,} rows)", record.rows).format(rows=record.rows)
    return _(ONE_OFF) if record.chat is None else record.chat


@dataclass(frozen=True)
class UsageReport:
    """``%qwen usage``: calls, totals per model and overall, and a bar per call."""

    ledger: Ledger

    def _rows(self) -> list[tuple[str, ...]]:
        return [
            (str(r.number), r.cell, _chat_column(r), r.model, f"{r.usage.input_tokens:,}", f"{r.usage.output_tokens:,}",
             format_money(r.cost, r.currency), status_label(r.status))
            for r in self.ledger.records
        ]

    def _totals(self) -> list[tuple[str, ...]]:
        rows = []
        for (model, currency), totals in self.ledger.per_model().items():
            cost = format_money(totals.cost, currency)
            if totals.unpriced_calls:
                cost = _("{cost} (+{count} unpriced)").format(cost=cost, count=totals.unpriced_calls)
            rows.append((model, str(totals.calls), f"{totals.input_tokens:,}", f"{totals.output_tokens:,}", cost))
        return rows

    def _text_bars(self, width: int = 20) -> list[str]:
        """Tokens per call as a bar: █ input, ░ output, scaled to the biggest call."""
        biggest = max(r.usage.total_tokens for r in self.ledger.records) or 1
        return [
            "█" * round(width * r.usage.input_tokens / biggest) + "░" * round(width * r.usage.output_tokens / biggest)
            for r in self.ledger.records
        ]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        if not self.ledger.records:
            printer.text(_("No calls yet this session."))
            return
        header = ("#", _("cell"), _("chat"), _("model"), _("in"), _("out"), _("cost"), _("status"),
                  _("tokens (█ in ░ out)"))
        rows = [(*row, bar) for row, bar in zip(self._rows(), self._text_bars())]
        lines = aligned([header, *rows])
        lines.append("")
        lines.extend(aligned([_totals_header(), *self._totals()]))
        lines.append(self._total_line())
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        if not self.ledger.records:
            return "<p>" + html.escape(_("No calls yet this session.")) + "</p>"
        biggest = max(r.usage.total_tokens for r in self.ledger.records) or 1
        bar_title = html.escape(_("input / output tokens"), quote=True)
        rows = []
        for record, cells in zip(self.ledger.records, self._rows()):
            width_in = 100 * record.usage.input_tokens / biggest
            width_out = 100 * record.usage.output_tokens / biggest
            bar = (
                f"<div style='display:flex;width:12em;height:0.8em' title='{bar_title}'>"
                f"<div style='width:{width_in:.1f}%;background:#7aa6d6'></div>"
                f"<div style='width:{width_out:.1f}%;background:#e39b4d'></div></div>"
            )
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{bar}</td></tr>")
        totals = html_table(self._totals(), _totals_header())
        headings = "".join(f"<th>{html.escape(h)}</th>" for h in (
            "#", _("cell"), _("chat"), _("model"), _("in"), _("out"), _("cost"), _("status")))
        # Translators: the bar column's heading; {tokens_in} and {tokens_out} are "in" and "out", coloured.
        tokens_in, tokens_out = html.escape(_("in")), html.escape(_("out"))
        bars = html.escape(_("tokens ({tokens_in} / {tokens_out})")).format(
            tokens_in=f"<span style='color:#7aa6d6'>{tokens_in}</span>",
            tokens_out=f"<span style='color:#e39b4d'>{tokens_out}</span>")
        return (
            f"<table><tr>{headings}<th>{bars}</th></tr>" + "".join(rows) + "</table>"
            + totals
            + f"<p><strong>{html.escape(self._total_line())}</strong></p>"
        )

    def _total_line(self) -> str:
        count = len(self.ledger.records)
        return ngettext("total: {cost} in {count} call", "total: {cost} in {count} calls", count).format(
            cost=self._total(), count=count)

    def _total(self) -> str:
        # Yuan and dollars are never added: each currency's total, listed.
        return _(" and ").join(format_money(cost, currency) for currency, cost in self.ledger.totals_by_currency().items())


def _totals_header() -> tuple[str, ...]:
    return (_("model"), _("calls"), _("in"), _("out"), _("cost"))
