"""What a call costs, what it may cost before it is sent, and the session's budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .catalog import ModelInfo
from .client import Usage
from .i18n import N_

PER_MILLION = 1_000_000


# Of the input price: tokens read from the implicit context cache, and tokens written to the
# explicit cache (DashScope's context-cache rules; the rest of the input is billed in full).
CACHE_READ_RATE = 0.2
CACHE_WRITE_RATE = 1.25
# Tokens read from the explicit cache (a request with cache_control markers, --cache).
EXPLICIT_CACHE_READ_RATE = 0.1


def call_cost(model: ModelInfo | None, usage: Usage, *, explicit_cache: bool = False) -> float | None:
    """One call's cost from its usage, in the sheet's currency; None if the price is unknown.

    The tier is chosen by the whole input, cached tokens included. In thinking mode the output
    is billed at the thinking price, but a thinking call that produced no reasoning is billed
    at the ordinary price (DashScope's rule). Cache reads cost 10% of the input price when the
    request marked its prefix (``explicit_cache``), 20% otherwise (the implicit cache). Web
    searches are added where the catalog prices them.
    """
    if model is None or not model.priced:
        return None
    tier = model.tier_for(usage.input_tokens)
    assert tier is not None
    output_price = tier.output
    if usage.reasoning_tokens and tier.thinking_output is not None:
        output_price = tier.thinking_output
    # Cached and written tokens are part of the input; figures that claim more are capped.
    cached = min(usage.cached_tokens, usage.input_tokens)
    written = min(usage.cache_creation_tokens, usage.input_tokens - cached)
    full = usage.input_tokens - cached - written
    read_rate = EXPLICIT_CACHE_READ_RATE if explicit_cache else CACHE_READ_RATE
    input_tokens = full + cached * read_rate + written * CACHE_WRITE_RATE
    searches = usage.searches * (model.search_price or 0.0) / 1_000
    return (input_tokens * tier.input + usage.output_tokens * output_price) / PER_MILLION + searches


@dataclass(frozen=True)
class Estimate:
    """Before sending: the input's cost now, and the worst case with the longest answer."""

    input_tokens: int
    max_output_tokens: int
    input_cost: float | None
    worst_cost: float | None


def estimate(model: ModelInfo | None, input_tokens: int, max_output_tokens: int, *, thinking: bool) -> Estimate:
    if model is None or not model.priced:
        return Estimate(input_tokens, max_output_tokens, None, None)
    tier = model.tier_for(input_tokens)
    assert tier is not None
    output_price = tier.output
    if (thinking or model.thinking == "only") and tier.thinking_output is not None:
        output_price = tier.thinking_output
    input_cost = input_tokens * tier.input / PER_MILLION
    return Estimate(
        input_tokens,
        max_output_tokens,
        input_cost,
        input_cost + max_output_tokens * output_price / PER_MILLION,
    )


def output_tokens_affordable(model: ModelInfo, input_tokens: int, yuan: float, *, thinking: bool) -> int:
    """The largest --max-tokens whose worst case stays within ``yuan`` (0 if none does)."""
    base = estimate(model, input_tokens, 0, thinking=thinking)
    per_token = estimate(model, input_tokens, PER_MILLION, thinking=thinking)
    assert base.input_cost is not None and per_token.worst_cost is not None
    price = (per_token.worst_cost - base.input_cost) / PER_MILLION
    left = yuan - base.input_cost
    if left <= 0:
        return 0
    return int(left / price) if price > 0 else PER_MILLION


def format_money(amount: float | None, currency: str = "CNY") -> str:
    """An amount with its currency's sign and enough digits to matter: ¥0.0004 never shows as ¥0.00.

    ``currency`` is the ISO code the history records (CNY: ¥, USD: $; any other is written out).
    """
    sign = {"CNY": "¥", "USD": "$"}.get(currency)
    if amount is None:
        text = "?"
    elif amount == 0:
        text = "0"
    elif amount >= 1:
        text = f"{amount:,.2f}"
    else:
        # At least 4 decimals, and always two significant digits.
        decimals = max(4, 1 - math.floor(math.log10(amount)))
        text = f"{amount:.{decimals}f}".rstrip("0").rstrip(".")
    return f"{sign}{text}" if sign else f"{text} {currency}"


def round_figure(amount: float) -> str:
    """A round figure at least ``amount``, for the user to type (a budget or a limit to set)."""
    for step in (0.01, 0.1, 1, 10, 100, 1000):
        if amount <= step * 10:
            return f"{-(-amount // step) * step:g}"
    return f"{amount:.0f}"


def format_yuan(amount: float | None) -> str:
    """Yuan with enough digits to matter (``format_money`` in CNY)."""
    return format_money(amount, "CNY")


UNKNOWN_PRICE_HINT = N_(
    "cost unknown: add the model's price with "
    "%config QwenMagic.models = {{'{model}': {{'input': YUAN_PER_1M, 'output': YUAN_PER_1M}}}}"
)


# --- DashScope Batch: half the real-time price for each successful line; failed lines are free,
# and there is no context-cache discount in batch.
BATCH_RATE = 0.5


def batch_line_cost(model: ModelInfo | None, usage: Usage) -> float | None:
    """Yuan for one successful line of a batch job: the real-time price of its usage, halved."""
    plain = Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                  reasoning_tokens=usage.reasoning_tokens)
    cost = call_cost(model, plain)
    return None if cost is None else cost * BATCH_RATE
