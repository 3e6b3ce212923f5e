"""Before anything is sent: count the tokens, check the model's limit, the budget and the cost.

Every refusal here is a ``UsageError`` that says what the call could cost or how far over
the limit it is, and how to proceed; the server receives nothing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from IPython.core.error import UsageError

from .catalog import ModelInfo
from .i18n import _
from .cache import MIN_CACHED_PREFIX, prefix_end
from .pricing import (
    CACHE_WRITE_RATE,
    EXPLICIT_CACHE_READ_RATE,
    PER_MILLION,
    Estimate,
    estimate,
    format_money,
    output_tokens_affordable,
    round_figure,
)
from .tables import aligned, html_table
from .tokens import count_chat_input

# With no --max-tokens and no catalog figure, the worst case assumes this long an answer.
DEFAULT_WORST_OUTPUT = 8192


@dataclass(frozen=True)
class Preflight:
    """What a request will carry and may cost."""

    model_name: str
    model: ModelInfo | None
    messages: tuple[Mapping[str, Any], ...]
    input_tokens: int
    estimate: Estimate
    thinking: bool
    # Of the worst case's output tokens, how many may be thinking (billed as output too).
    max_reasoning_tokens: int = 0
    currency: str = "CNY"  # the region's: costs are shown and limits checked in it
    # --cache: input tokens of the marked prefix (what a later call may read at 10%).
    cache_prefix_tokens: int = 0

    def money(self, amount: float | None) -> str:
        return format_money(amount, self.currency)

    @property
    def max_input(self) -> int | None:
        return self.model.max_input if self.model else None


def prepare(
    model_name: str,
    model: ModelInfo | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    max_tokens: int | None,
    thinking: bool,
    thinking_budget: int | None = None,
    extra_tokens: int = 0,
    currency: str = "CNY",
    cache_marked: bool = False,
) -> Preflight:
    """Count the request's input tokens (chat template included) and estimate its cost.

    The worst case is the longest answer, plus, when the model thinks, the longest thinking:
    ``--max-tokens`` bounds the answer alone, and the thinking is billed as output too.
    ``extra_tokens``: input beyond the messages (the tools' definitions). ``cache_marked``: the
    messages carry explicit-cache markers (--cache), whose prefix the dry run prices.
    """
    thinking = thinking or (model is not None and model.thinking == "only")
    extra = (model.extra_input_tokens(thinking) if model else 0) + extra_tokens
    input_tokens = count_chat_input(messages, extra_tokens=extra)
    longest = model.max_output if model and model.max_output else DEFAULT_WORST_OUTPUT
    max_answer = max_tokens or longest
    # The catalog gives no separate thinking limit: a budget bounds it, else the longest output.
    max_reasoning = (thinking_budget or longest) if thinking else 0
    cached_end = prefix_end(messages) if cache_marked else 0
    prefix_tokens = count_chat_input(messages[:cached_end]) if cached_end else 0
    return Preflight(
        model_name, model, tuple(messages), input_tokens,
        estimate(model, input_tokens, max_answer + max_reasoning, thinking=thinking), thinking, max_reasoning,
        currency, prefix_tokens,
    )


def check_input_limit(preflight: Preflight) -> None:
    limit = preflight.max_input
    if limit is not None and preflight.input_tokens > limit:
        raise UsageError(_(
            "Refused, nothing sent: this request has {tokens:,} input tokens, over {model}'s limit of "
            "{limit:,}. Shorten the prompt or the chat (%qwen reset), or pick a model with a longer "
            "context (%qwen models)."
        ).format(tokens=preflight.input_tokens, model=preflight.model_name, limit=limit))


def caps(money: Callable[[float], str], *, spent: float, budget: float | None, max_cost: float | None,
         worst: float) -> list[tuple[float, str, str]]:
    """What a call or a job may still spend: ``(amount, what it is, how to raise it)`` for the
    cell's --max-cost and the session's budget, those that are set."""
    found = []
    if max_cost is not None:
        found.append((max_cost, _("--max-cost {cost}").format(cost=money(max_cost)), _("raise --max-cost")))
    if budget is not None:
        left = max(budget - spent, 0.0)
        if left:
            what = _("the session budget ({left} left of {budget})").format(left=money(left), budget=money(budget))
        else:
            what = _("the session budget (used up: {spent} spent of {budget})").format(
                spent=money(spent), budget=money(budget))
        found.append((left, what, _("raise the budget (%qwen budget {amount})").format(
            amount=round_figure(spent + worst))))
    return found


def check_cost(preflight: Preflight, *, spent: float, budget: float | None, max_cost: float | None) -> None:
    """Refuse a call whose worst case would pass --max-cost or the session's budget."""
    if budget is None and max_cost is None:
        return
    worst = preflight.estimate.worst_cost
    model = preflight.model
    if worst is None or model is None:
        raise UsageError(_(
            "Refused, nothing sent: a budget is set but {model}'s price is unknown, so its cost cannot "
            "be bounded. Add its price with %config QwenMagic.models = "
            "{{'{model}': {{'input': PRICE_PER_1M, 'output': PRICE_PER_1M}}}}, "
            "or turn the budget off (%qwen budget off)."
        ).format(model=preflight.model_name))
    money = preflight.money
    for allowed, what, raise_it in caps(money, spent=spent, budget=budget, max_cost=max_cost, worst=worst):
        if worst > allowed:
            fits = output_tokens_affordable(model, preflight.input_tokens, allowed,
                                            thinking=preflight.thinking) - preflight.max_reasoning_tokens
            if fits > 0:
                lower = _("or lower --max-tokens to {tokens:,} or less").format(tokens=fits)
            elif allowed > 0:
                lower = _("or shorten the prompt and chat: the input alone is over it")
            else:
                lower = _("as nothing is left of it")
            # Translators: {limit} is "--max-cost ¥0.01" or "the session budget (...)"; {raise_it}
            # says how to raise it and {lower} how to ask for less (each a phrase of its own).
            raise UsageError(_(
                "Refused, nothing sent: this call could cost up to {worst} ({tokens:,} input tokens and up to "
                "{output} on {model}), more than {limit}. To go ahead, {raise_it}, {lower}."
            ).format(worst=money(worst), tokens=preflight.input_tokens, output=_output_tokens(preflight),
                     model=preflight.model_name, limit=what, raise_it=raise_it, lower=lower))


def _output_tokens(preflight: Preflight) -> str:
    """The worst case's output, saying how much of it thinking may take."""
    if preflight.max_reasoning_tokens:
        return _("{tokens:,} output tokens ({thinking:,} of them thinking)").format(
            tokens=preflight.estimate.max_output_tokens, thinking=preflight.max_reasoning_tokens)
    return _("{tokens:,} output tokens").format(tokens=preflight.estimate.max_output_tokens)


def content_preview(content: Any) -> str:
    """A message's content for people: text as is, images named by source and size."""
    if isinstance(content, str):
        return content
    shown = []
    for part in content:
        if part.get("type") == "image":
            url = str(part.get("url", ""))
            shown.append(_("[image, {size:,} KB inline]").format(size=len(url) * 3 // 4 // 1024) if url.startswith("data:")
                         else _("[image {url}]").format(url=url))
        else:
            shown.append(str(part.get("text", "")))
    return " ".join(shown)


def cache_saving(p: Preflight) -> str | None:
    """--cache in the dry run: what reading the marked prefix from the cache saves, and writing it costs."""
    if not p.cache_prefix_tokens or p.model is None or not p.model.priced:
        return None
    tier = p.model.tier_for(p.input_tokens)
    assert tier is not None
    full = p.cache_prefix_tokens * tier.input / PER_MILLION
    if p.cache_prefix_tokens < MIN_CACHED_PREFIX:
        return _("the marked prefix has {tokens:,} tokens, under the {minimum:,} the service caches: "
                 "no saving yet").format(tokens=p.cache_prefix_tokens, minimum=MIN_CACHED_PREFIX)
    saved = full * (1 - EXPLICIT_CACHE_READ_RATE)
    extra = full * (CACHE_WRITE_RATE - 1)
    return _("{tokens:,} prefix tokens marked: {saved} saved when read from the cache (at 10%), {extra} more "
             "the first time they are written (at 125%)").format(tokens=p.cache_prefix_tokens,
                                                                 saved=p.money(saved), extra=p.money(extra))


@dataclass(frozen=True)
class DryRun:
    """``--dry-run``: what would be sent, its tokens and its cost range; nothing is sent."""

    preflight: Preflight
    window_note: str | None = None
    notes: tuple[str, ...] = ()  # values summarised, context shortened

    def _summary(self) -> list[tuple[str, str]]:
        p = self.preflight
        limit = f"{p.max_input:,}" if p.max_input is not None else _("unknown")
        rows = [
            (_("model"), p.model_name),
            (_("input tokens"), _("{tokens:,} (model limit {limit})").format(tokens=p.input_tokens, limit=limit)),
            (_("cost now"), _("{cost} for the input").format(cost=p.money(p.estimate.input_cost))),
            (_("worst case"), _("{cost} with {output}").format(cost=p.money(p.estimate.worst_cost),
                                                               output=_output_tokens(p))),
        ]
        saving = cache_saving(p)
        if saving:
            rows.append((_("cache"), saving))
        if p.model is None:
            rows.append((_("note"), _("{model} is not in the catalog: its price is unknown").format(model=p.model_name)))
        if self.window_note:
            rows.append((_("history"), self.window_note))
        rows += [(_("note"), note) for note in self.notes]
        if any(not isinstance(m["content"], str) and any(part.get("type") == "image" for part in m["content"])
               for m in p.messages):
            rows.append((_("images"), _("not counted locally: the server's usage will include them")))
        return rows

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        lines = [_("Dry run: nothing was sent.")]
        lines += aligned([list(row) for row in self._summary()], "  ")
        lines.append(_("Messages:"))
        for message in self.preflight.messages:
            lines.append(f"  [{message['role']}] {content_preview(message['content'])}")
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        messages = html_table(
            [(str(m["role"]), content_preview(m["content"])) for m in self.preflight.messages],
            (_("role"), _("content")),
        )
        title = html.escape(_("Dry run: nothing was sent."))
        summary = html.escape(_("Messages ({count})").format(count=len(self.preflight.messages)))
        return (
            f"<strong>{title}</strong>{html_table(self._summary())}"
            f"<details open><summary>{summary}</summary>{messages}</details>"
        )
