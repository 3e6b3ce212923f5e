"""``%qwen usage --all``: the user's spend across notebooks and kernels, limits, free quota, a chart.

Everything is in the region's currency; spend billed in another currency is left out (and
said so), never added up. The chart is an inline SVG the package draws itself: plain
``text/html`` with no script, so a saved notebook, nbconvert and GitHub show it; its axes and
labels use ``currentColor`` and its bars mid-tone colours that read on light and dark themes.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from .catalog import Catalog, ModelInfo
from .i18n import N_, _
from .pricing import format_money
from .regions import Region
from .spending import Standing, local_zone, period_name, period_start
from .store import Store
from .tables import aligned, html_table

CHART_DAYS = 30
# Mid-tone colours (Tableau 10) readable on white and on a dark background; the rest is currentColor.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
OTHER = "other"  # the chart's last colour: models beyond the palette (shown as OTHER_LABEL)
OTHER_LABEL = N_("other")


@dataclass(frozen=True)
class DaySpend:
    day: date
    by_model: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_model.values())


@dataclass(frozen=True)
class AccountUsage:
    """What ``%qwen usage --all`` shows; ``_repr_html_`` for notebooks, ``_repr_pretty_`` for terminals."""

    region: Region
    today: float
    month: float
    reserved: float
    standings: tuple[Standing, ...]
    per_model: tuple[tuple[str, int, float], ...]  # model, calls, cost (all time)
    per_notebook: tuple[tuple[str, int, float], ...]
    quota: tuple[tuple[str, str], ...]  # model, free quota left
    days: tuple[DaySpend, ...]
    path: str
    notes: tuple[str, ...] = field(default=())

    def money(self, amount: float) -> str:
        return format_money(amount, self.region.currency.code)

    # ---- the parts

    def summary(self) -> list[tuple[str, str]]:
        rows = [(_("today"), self.money(self.today)), (_("this month"), self.money(self.month))]
        if self.reserved:
            rows.append((_("reserved now"), _("{amount} by calls in flight").format(amount=self.money(self.reserved))))
        for standing in self.standings:
            rows.append((_("{period} limit").format(period=period_name(standing.period)),
                         _("{limit}: {left} left").format(limit=self.money(standing.limit),
                                                          left=self.money(standing.left))))
        if not self.standings:
            rows.append((_("limits"), _("none (%qwen limit daily AMOUNT / monthly AMOUNT)")))
        return rows

    def model_rows(self) -> list[tuple[str, ...]]:
        left = dict(self.quota)
        return [(model, f"{calls:,}", self.money(cost), left.get(model, "—")) for model, calls, cost in self.per_model]

    def notebook_rows(self) -> list[tuple[str, ...]]:
        return [(notebook, f"{calls:,}", self.money(cost)) for notebook, calls, cost in self.per_notebook]

    def title(self) -> str:
        return _("Usage across notebooks, {region}, in {currency} (days in local time, {zone})").format(
            region=self.region.name, currency=self.region.currency.name, zone=local_zone())

    def footnotes(self) -> list[str]:
        return [*self.notes, _("From {path}. The free quota is per account and region and expires: "
                               "the console is authoritative.").format(path=self.path)]

    # ---- the chart

    def models_in_chart(self) -> list[str]:
        """Models by their spend over the chart's days, the costliest first (the palette's order)."""
        totals: dict[str, float] = {}
        for day in self.days:
            for model, cost in day.by_model.items():
                totals[model] = totals.get(model, 0.0) + cost
        ordered = sorted(totals, key=lambda m: (-totals[m], m))
        if len(ordered) > len(PALETTE):
            return [*ordered[:len(PALETTE) - 1], OTHER]
        return ordered

    def _stacks(self) -> tuple[list[str], list[list[float]]]:
        models = self.models_in_chart()
        shown = set(models)
        stacks = []
        for day in self.days:
            values = {m: 0.0 for m in models}
            for model, cost in day.by_model.items():
                values[model if model in shown else OTHER] += cost
            stacks.append([values[m] for m in models])
        return models, stacks

    def chart_svg(self) -> str:
        """Spend per day, the last 30 days, stacked per model: an inline SVG with text labels."""
        models, stacks = self._stacks()
        width, height, left, top, bottom = 640, 200, 64, 12, 36
        plot_w, plot_h = width - left - 8, height - top - bottom
        biggest = max((sum(stack) for stack in stacks), default=0.0)
        slot = plot_w / max(len(self.days), 1)
        title = _("Spend per day over the last {days} days, per model").format(days=len(self.days))
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="qwen-spend-chart" role="img" width="{width}" '
            f'height="{height + 20 * ((len(models) + 3) // 4)}" viewBox="0 0 {width} {height + 20 * ((len(models) + 3) // 4)}" '
            f'style="color: inherit; font: 11px sans-serif; max-width: 100%">',
            f"<title>{html.escape(title)}</title>",
            f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="currentColor" stroke-opacity="0.6"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="currentColor" stroke-opacity="0.6"/>',
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" fill="currentColor">{html.escape(self.money(biggest))}</text>',
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" fill="currentColor">{html.escape(self.money(0))}</text>',
        ]
        for index, (day, stack) in enumerate(zip(self.days, stacks)):
            x = left + index * slot + slot * 0.15
            y = top + plot_h
            for model, value in zip(models, stack):
                if value <= 0 or biggest <= 0:
                    continue
                bar = plot_h * value / biggest
                y -= bar
                colour = PALETTE[models.index(model)] if model != OTHER else PALETTE[-1]
                label = f"{day.day.isoformat()} {_shown_model(model)}: {self.money(value)}"
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{bar:.1f}" '
                             f'fill="{colour}"><title>{html.escape(label)}</title></rect>')
        for index in sorted({0, len(self.days) // 2, len(self.days) - 1}):
            if 0 <= index < len(self.days):
                x = left + index * slot + slot / 2
                parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle" fill="currentColor">'
                             f'{self.days[index].day.strftime("%m-%d")}</text>')
        for index, model in enumerate(models):
            x = left + (index % 4) * (plot_w / 4)
            y = height + 20 * (index // 4) - 8
            colour = PALETTE[index] if model != OTHER else PALETTE[-1]
            parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{x + 14:.1f}" y="{y}" fill="currentColor">{html.escape(_shown_model(model))}</text>')
        if biggest <= 0:
            nothing = _("No spend in these {days} days").format(days=len(self.days))
            parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" '
                         f'fill="currentColor">{html.escape(nothing)}</text>')
        parts.append("</svg>")
        return "".join(parts)

    def chart_text(self, width: int = 30) -> list[str]:
        """The chart in a terminal: a bar per day with spend, its total and its costliest model."""
        biggest = max((d.total for d in self.days), default=0.0)
        if biggest <= 0:
            return [_("No spend in the last {days} days.").format(days=len(self.days))]
        lines = []
        for day in self.days:
            if day.total <= 0:
                continue
            top_model = max(day.by_model, key=lambda m: day.by_model[m])
            bar = "█" * max(1, round(width * day.total / biggest))
            most = _("(most: {model})").format(model=top_model)
            lines.append(f"  {day.day.strftime('%m-%d')}  {bar.ljust(width)}  {self.money(day.total)}  {most}")
        return lines

    # ---- display

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = [self.title(), *aligned(self.summary(), "  "), ""]
        lines += [_("Per model (all time):"), *aligned([_model_header(), *self.model_rows()], "  ")]
        lines += ["", _("Per notebook (all time):"), *aligned([_notebook_header(), *self.notebook_rows()], "  ")]
        lines += ["", _("Spend per day, last {days} days:").format(days=len(self.days)), *self.chart_text(),
                  *self.footnotes()]
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in self.footnotes())
        days = html.escape(_("Spend per day, last {days} days").format(days=len(self.days)))
        # Headings in bold, then "(all time)" beside them, as the text shows them.
        all_time, per_model, per_notebook = (html.escape(text) for text in (
            _("(all time)"), _("Per model"), _("Per notebook")))
        per_model = f"<strong>{per_model}</strong> {all_time}"
        per_notebook = f"<strong>{per_notebook}</strong> {all_time}"
        return (
            f"<strong>{html.escape(self.title())}</strong>{html_table(self.summary())}"
            f"<p><strong>{days}</strong></p>{self.chart_svg()}"
            f"<p>{per_model}</p>"
            f"{html_table(self.model_rows(), _model_header())}"
            f"<p>{per_notebook}</p>{html_table(self.notebook_rows(), _notebook_header())}"
            f"{notes}"
        )


def _model_header() -> tuple[str, ...]:
    return (_("model"), _("calls"), _("cost"), _("free quota left"))


def _notebook_header() -> tuple[str, ...]:
    return (_("notebook"), _("calls"), _("cost"))


def _shown_model(model: str) -> str:
    """A model's name in the chart; the bar of the models beyond the palette says "other"."""
    return _(OTHER_LABEL) if model == OTHER else model


def free_quota_left(model: ModelInfo | None, tokens_in: int, tokens_out: int) -> str:
    """What is left of the model's free quota in the region, from the tokens the history holds."""
    if model is None or not model.free_quota:
        return "—"
    quota = model.free_quota
    if model.free_quota_each_way:
        return _("{tokens_in:,} in / {tokens_out:,} out of {quota:,} each").format(
            tokens_in=max(quota - tokens_in, 0), tokens_out=max(quota - tokens_out, 0), quota=quota)
    return _("{tokens:,} of {quota:,} tokens").format(tokens=max(quota - tokens_in - tokens_out, 0), quota=quota)


def account_usage(store: Store, region: Region, catalog: Catalog, standings: list[Standing],
                  *, now: float | None = None, days: int = CHART_DAYS) -> AccountUsage:
    """Read the history file into the report (one read of each table)."""
    now = time.time() if now is None else now
    currency = region.currency.code
    first_day = datetime.fromtimestamp(now).date() - timedelta(days=days - 1)
    since = datetime.combine(first_day, datetime.min.time()).timestamp()
    by_day: dict[date, dict[str, float]] = {first_day + timedelta(days=i): {} for i in range(days)}
    for at, model, cost in store.calls_since(currency, since):
        spent = by_day.setdefault(datetime.fromtimestamp(at).date(), {})
        spent[model] = spent.get(model, 0.0) + cost
    quota = tuple((model, free_quota_left(catalog.get(model), tokens_in or 0, tokens_out or 0))
                  for model, tokens_in, tokens_out, _cost in store.tokens_by_model(region.key))
    others = [code for code in store.currencies() if code != currency]
    notes = tuple(_("Calls billed in {currency} are kept apart: set QwenMagic.region to see them.").format(currency=code)
                  for code in others)
    return AccountUsage(
        region=region,
        today=store.spent_since(currency, period_start("daily", now)),
        month=store.spent_since(currency, period_start("monthly", now)),
        reserved=max((s.reserved for s in standings), default=0.0),
        standings=tuple(standings),
        per_model=tuple(store.spend_by("model", currency, 0.0)),
        per_notebook=tuple(store.spend_by("notebook", currency, 0.0)),
        quota=quota,
        days=tuple(DaySpend(day, by_day[day]) for day in sorted(by_day) if day >= first_day),
        path=str(store.path),
        notes=notes,
    )
