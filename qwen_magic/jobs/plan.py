"""Before a job sends anything: every row counted, the whole job's cost range, the refusals.

The job's worst case is every row's input plus the longest answer each row may get; it is
checked against ``--max-cost`` and what is left of the session's budget, and a refusal says
what would fit (a lower ``--max-tokens``, or how many rows). ``--dry-run`` stops here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError

from ..catalog import ModelInfo
from ..i18n import N_, _
from ..preflight import caps, content_preview, prepare
from ..pricing import format_money
from ..markdown import escape
from ..tables import aligned, html_table
from .rows import Row

# DashScope Batch bills half the real-time price.
BATCH_PRICE_RATE = 0.5
PROMPTS_SHOWN = 3

ROW_TOO_LONG = N_(
    "Refused, nothing sent: row {key} has {tokens} input tokens, over {model}'s limit of {limit}. Shorten that "
    "row or the prompt, or pick a model with a longer context (%qwen models)."
)
UNPRICED = N_(
    "Refused, nothing sent: a budget is set but {model}'s price is unknown, so the job's cost cannot be bounded. "
    "Add its price with %config QwenMagic.models = {{'{model}': {{'input': PRICE_PER_1M, 'output': PRICE_PER_1M}}}}, "
    "or turn the budget off (%qwen budget off)."
)
OVER_LIMIT = N_(
    "Refused, nothing sent: these {rows} rows could cost up to {worst} ({input} input tokens and up to {output} "
    "output tokens a row on {model}), more than {limit}. To go ahead, {raise_it}, {fits}."
)


@dataclass
class JobPlan:
    """The job's rows, which of them to send, and what sending them may cost."""

    model_name: str
    model: ModelInfo | None
    rows: list[Row]
    todo: list[Row]
    done: set[str]  # digests of the rows with a result from an earlier run
    tokens: list[int] = field(default_factory=list)  # input tokens of each row to send
    input_cost: float | None = 0.0
    worst_cost: float | None = 0.0
    output_tokens: int = 0  # the longest output a row may get (answer and thinking)
    reasoning_tokens: int = 0  # of which thinking (billed as output; --max-tokens does not bound it)
    thinking: bool = False
    currency: str = "CNY"  # the region's, which every cost is in
    # Per row to send, its cost now and its price per output token (the tier's), for "what fits".
    _row_input_costs: list[float] = field(default_factory=list, repr=False)
    _row_output_prices: list[float] = field(default_factory=list, repr=False)

    @property
    def input_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def resumed(self) -> int:
        return len(self.rows) - len(self.todo)

    def row_worst_costs(self) -> list[float]:
        """Each row to send: its worst case (its input and the longest answer); empty if unpriced."""
        return [cost + price * self.output_tokens for cost, price in zip(self._row_input_costs, self._row_output_prices)]

    def money(self, amount: float | None) -> str:
        return format_money(amount, self.currency)


def plan_job(model_name: str, model: ModelInfo | None, rows: list[Row], done: set[str], *,
             max_tokens: int | None, thinking: bool, thinking_budget: int | None, currency: str = "CNY") -> JobPlan:
    """Count every row still to send, and its cost range (in ``currency``, the region's)."""
    todo = [row for row in rows if row.digest not in done]
    plan = JobPlan(model_name, model, rows, todo, done, thinking=thinking, currency=currency)
    priced = model is not None and model.priced
    for row in todo:
        preflight = prepare(model_name, model, row.messages, max_tokens=max_tokens, thinking=thinking,
                            thinking_budget=thinking_budget, currency=currency)
        if preflight.max_input is not None and preflight.input_tokens > preflight.max_input:
            raise UsageError(_(ROW_TOO_LONG).format(key=repr(row.key), tokens=f"{preflight.input_tokens:,}",
                                                    model=model_name, limit=f"{preflight.max_input:,}"))
        plan.tokens.append(preflight.input_tokens)
        estimate = preflight.estimate
        plan.output_tokens = estimate.max_output_tokens
        plan.reasoning_tokens = preflight.max_reasoning_tokens
        plan.thinking = preflight.thinking
        if priced:
            assert estimate.input_cost is not None and estimate.worst_cost is not None
            plan._row_input_costs.append(estimate.input_cost)
            per_token = (estimate.worst_cost - estimate.input_cost) / max(estimate.max_output_tokens, 1)
            plan._row_output_prices.append(per_token)
    if priced:
        plan.input_cost = sum(plan._row_input_costs)
        plan.worst_cost = plan.input_cost + sum(plan._row_output_prices) * plan.output_tokens
    elif todo:
        plan.input_cost = plan.worst_cost = None
    return plan


def check_job_cost(plan: JobPlan, *, spent: float, budget: float | None, max_cost: float | None,
                   rate: float = 1.0) -> None:
    """Refuse a job whose worst case would pass --max-cost or the session's budget.

    ``rate``: the share of the real-time price the job is billed at (a batch job's is half).
    """
    if (budget is None and max_cost is None) or not plan.todo:
        return
    if plan.worst_cost is None:
        raise UsageError(_(UNPRICED).format(model=plan.model_name))
    worst = plan.worst_cost * rate
    money = plan.money
    for allowed, what, raise_it in caps(money, spent=spent, budget=budget, max_cost=max_cost, worst=worst):
        if worst > allowed:
            raise UsageError(_(OVER_LIMIT).format(
                rows=f"{len(plan.todo):,}", worst=money(worst), input=f"{plan.input_tokens:,}",
                output=f"{plan.output_tokens:,}", model=plan.model_name, limit=what, raise_it=raise_it,
                fits=_what_fits(plan, allowed / rate)))


def _what_fits(plan: JobPlan, allowed: float) -> str:
    """A lower --max-tokens for every row, or else how many rows fit as they are."""
    left = allowed - sum(plan._row_input_costs)
    per_token = sum(plan._row_output_prices)
    tokens = int(left / per_token) - plan.reasoning_tokens if left > 0 and per_token else 0
    if tokens > 0:
        return _("or lower --max-tokens to {tokens} or less").format(tokens=f"{tokens:,}")
    fitting, total = 0, 0.0
    for input_cost, price in zip(plan._row_input_costs, plan._row_output_prices):
        total += input_cost + price * plan.output_tokens
        if total > allowed:
            break
        fitting += 1
    if fitting:
        return _("or map fewer rows (the first {count} fit)").format(count=f"{fitting:,}")
    return _("as not even one row fits")


@dataclass(frozen=True)
class BatchSplit:
    """How a --batch job's rows would be sent: how many requests (identical rows are asked once),
    their bytes, and in how many batches (one per 50,000 requests or 500 MB)."""

    requests: int
    size: int
    batches: int


@dataclass(frozen=True)
class JobDryRun:
    """``--map ... --dry-run``: rows, tokens, the cost range in real time and in batch; nothing sent."""

    plan: JobPlan
    collection: str
    batch: BatchSplit | None = None  # --batch: how the job would be sent

    def _summary(self) -> list[tuple[str, str]]:
        plan = self.plan
        money = plan.money
        if plan.resumed:
            rows = _("{rows} in {name} (resumed: {done} done, {left} to go)").format(
                rows=f"{len(plan.rows):,}", name=self.collection, done=f"{plan.resumed:,}", left=f"{len(plan.todo):,}")
        else:
            rows = _("{rows} in {name}").format(rows=f"{len(plan.rows):,}", name=self.collection)
        summary = [
            (_("model"), plan.model_name),
            (_("rows"), rows),
            (_("input tokens"), _("{tokens} for the {rows} rows to send").format(
                tokens=f"{plan.input_tokens:,}", rows=f"{len(plan.todo):,}")),
        ]
        if plan.worst_cost is None:
            summary.append((_("cost"), _("unknown: {model} has no price in the catalog").format(model=plan.model_name)))
        else:
            summary.append((_("real time"), _("{input} for the input, up to {worst} with {output} output tokens a row")
                            .format(input=money(plan.input_cost), worst=money(plan.worst_cost),
                                    output=f"{plan.output_tokens:,}")))
            summary.append((_("batch (50%)"), _("{input} for the input, up to {worst}").format(
                input=money(_half(plan.input_cost)), worst=money(_half(plan.worst_cost)))))
        if self.batch is not None:
            size = (f"{self.batch.size / 1e6:,.1f} MB" if self.batch.size >= 1e6
                    else f"{max(self.batch.size / 1e3, 0.1):,.1f} KB")
            if self.batch.batches > 1:
                said = _("{requests} requests ({size}), split into {batches} batches: a batch takes at most "
                         "50,000 requests and 500 MB").format(requests=f"{self.batch.requests:,}", size=size,
                                                              batches=f"{self.batch.batches:,}")
            else:
                said = _("{requests} requests ({size}) in one batch").format(requests=f"{self.batch.requests:,}",
                                                                              size=size)
            summary.append((_("--batch"), said))
        return summary

    def _prompts(self) -> list[tuple[str, str]]:
        return [(repr(row.key), content_preview(row.messages[-1]["content"])) for row in self.plan.todo[:PROMPTS_SHOWN]]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = [_("Dry run: nothing was sent.")]
        lines += aligned([list(row) for row in self._summary()], "  ")
        if self.plan.todo:
            shown = min(PROMPTS_SHOWN, len(self.plan.todo))
            lines.append(_("First prompts ({count}):").format(count=shown))
            for key, prompt in self._prompts():
                lines.append(f"  [{key}] {prompt}")
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        prompts = html_table(self._prompts(), (_("row"), _("prompt"))) if self.plan.todo else ""
        headline, first = escape(_("Dry run: nothing was sent.")), escape(_("First prompts"))
        return (f"<strong>{headline}</strong>{html_table(self._summary())}"
                + (f"<details open><summary>{first}</summary>{prompts}</details>" if prompts else ""))


def _half(amount: float | None) -> float | None:
    return None if amount is None else amount * BATCH_PRICE_RATE
