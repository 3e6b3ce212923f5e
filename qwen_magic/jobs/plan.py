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
from ..preflight import content_preview, prepare
from ..pricing import format_yuan
from ..tables import aligned, html_table
from .rows import Row

# DashScope Batch bills half the real-time price.
BATCH_PRICE_RATE = 0.5
PROMPTS_SHOWN = 3


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
    # Per row to send, its cost now and its price per output token (the tier's), for "what fits".
    _row_input_costs: list[float] = field(default_factory=list, repr=False)
    _row_output_prices: list[float] = field(default_factory=list, repr=False)

    @property
    def input_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def resumed(self) -> int:
        return len(self.rows) - len(self.todo)


def plan_job(model_name: str, model: ModelInfo | None, rows: list[Row], done: set[str], *,
             max_tokens: int | None, thinking: bool, thinking_budget: int | None) -> JobPlan:
    """Count every row still to send, and its cost range."""
    todo = [row for row in rows if row.digest not in done]
    plan = JobPlan(model_name, model, rows, todo, done, thinking=thinking)
    priced = model is not None and model.priced
    for row in todo:
        preflight = prepare(model_name, model, row.messages, max_tokens=max_tokens, thinking=thinking,
                            thinking_budget=thinking_budget)
        if preflight.max_input is not None and preflight.input_tokens > preflight.max_input:
            raise UsageError(
                f"Refused, nothing sent: row {row.key!r} has {preflight.input_tokens:,} input tokens, over "
                f"{model_name}'s limit of {preflight.max_input:,}. Shorten that row or the prompt, or pick a "
                "model with a longer context (%qwen models)."
            )
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


def check_job_cost(plan: JobPlan, *, spent: float, budget: float | None, max_cost: float | None) -> None:
    """Refuse a job whose worst case would pass --max-cost or the session's budget."""
    if (budget is None and max_cost is None) or not plan.todo:
        return
    if plan.worst_cost is None:
        raise UsageError(
            f"Refused, nothing sent: a budget is set but {plan.model_name}'s price is unknown, so the job's cost "
            f"cannot be bounded. Add its price with %config QwenMagic.models = "
            f"{{'{plan.model_name}': {{'input': YUAN_PER_1M, 'output': YUAN_PER_1M}}}}, or turn the budget off "
            "(%qwen budget off)."
        )
    limits = []
    if max_cost is not None:
        limits.append((max_cost, f"--max-cost {format_yuan(max_cost)}", "raise --max-cost"))
    if budget is not None:
        left = max(budget - spent, 0.0)
        state = (f"{format_yuan(left)} left of {format_yuan(budget)}" if left
                 else f"used up: {format_yuan(spent)} spent of {format_yuan(budget)}")
        limits.append((left, f"the session budget ({state})", f"raise the budget (%qwen budget {_round_up(spent + plan.worst_cost)})"))
    for allowed, what, raise_it in limits:
        if plan.worst_cost > allowed:
            raise UsageError(
                f"Refused, nothing sent: these {len(plan.todo):,} rows could cost up to {format_yuan(plan.worst_cost)} "
                f"({plan.input_tokens:,} input tokens and up to {plan.output_tokens:,} output tokens a row on "
                f"{plan.model_name}), more than {what}. To go ahead, {raise_it}, {_what_fits(plan, allowed)}."
            )


def _what_fits(plan: JobPlan, allowed: float) -> str:
    """A lower --max-tokens for every row, or else how many rows fit as they are."""
    left = allowed - sum(plan._row_input_costs)
    per_token = sum(plan._row_output_prices)
    tokens = int(left / per_token) - plan.reasoning_tokens if left > 0 and per_token else 0
    if tokens > 0:
        return f"or lower --max-tokens to {tokens:,} or less"
    fitting, total = 0, 0.0
    for input_cost, price in zip(plan._row_input_costs, plan._row_output_prices):
        total += input_cost + price * plan.output_tokens
        if total > allowed:
            break
        fitting += 1
    if fitting:
        return f"or map fewer rows (the first {fitting:,} fit)"
    return "as not even one row fits"


def _round_up(amount: float) -> str:
    for step in (0.01, 0.1, 1, 10, 100, 1000):
        if amount <= step * 10:
            return f"{-(-amount // step) * step:g}"
    return f"{amount:.0f}"


@dataclass(frozen=True)
class JobDryRun:
    """``--map ... --dry-run``: rows, tokens, the cost range in real time and in batch; nothing sent."""

    plan: JobPlan
    collection: str

    def _summary(self) -> list[tuple[str, str]]:
        plan = self.plan
        rows = [
            ("model", plan.model_name),
            ("rows", f"{len(plan.rows):,} in {self.collection}" + (
                f" (resumed: {plan.resumed:,} done, {len(plan.todo):,} to go)" if plan.resumed else "")),
            ("input tokens", f"{plan.input_tokens:,} for the {len(plan.todo):,} rows to send"),
        ]
        if plan.worst_cost is None:
            rows.append(("cost", f"unknown: {plan.model_name} has no price in the catalog"))
        else:
            output = f"{plan.output_tokens:,} output tokens a row"
            rows.append(("real time", f"{format_yuan(plan.input_cost)} for the input, up to "
                                      f"{format_yuan(plan.worst_cost)} with {output}"))
            rows.append(("batch (50%)", f"{format_yuan(_half(plan.input_cost))} for the input, up to "
                                        f"{format_yuan(_half(plan.worst_cost))}"))
        return rows

    def _prompts(self) -> list[tuple[str, str]]:
        return [(repr(row.key), content_preview(row.messages[-1]["content"])) for row in self.plan.todo[:PROMPTS_SHOWN]]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = ["Dry run: nothing was sent."]
        lines += aligned([list(row) for row in self._summary()], "  ")
        if self.plan.todo:
            lines.append(f"First {min(PROMPTS_SHOWN, len(self.plan.todo))} prompts:")
            for key, prompt in self._prompts():
                lines.append(f"  [{key}] {prompt}")
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        prompts = html_table(self._prompts(), ("row", "prompt")) if self.plan.todo else ""
        return (f"<strong>Dry run: nothing was sent.</strong>{html_table(self._summary())}"
                + (f"<details open><summary>First prompts</summary>{prompts}</details>" if prompts else ""))


def _half(amount: float | None) -> float | None:
    return None if amount is None else amount * BATCH_PRICE_RATE

