"""The ``%qwen`` line magic's subcommands."""

from __future__ import annotations

import getpass
import shlex
from typing import TYPE_CHECKING, Any, Callable

from IPython.core.error import UsageError

from .catalog import ModelInfo, PriceTier, user_catalog_path
from .client import key_source, mask_key
from .ledger import UsageReport
from .preflight import prepare
from .pricing import format_yuan
from .tables import Table
from .tokens import count_text

if TYPE_CHECKING:  # pragma: no cover
    from .magics import QwenMagic


HELP = Table(
    "%qwen commands",
    (
        ("%%qwen [options]", "ask the model the cell's text (%%qwen? lists the options)"),
        ("%qwen models [NAME]", "the catalog: limits, prices, rate limits, free quota"),
        ("%qwen usage", "every call of this session with its tokens and cost, totals per model"),
        ("%qwen budget [YUAN|off]", "show, set or remove the session's budget"),
        ("%qwen count TEXT", "tokens of TEXT, and of a one-message request, with its cost"),
        ("%qwen config", "the effective settings, the key masked"),
        ("%qwen login", "type the API key at a hidden prompt; kept in memory for this session"),
        ("%qwen help", "this list"),
    ),
)


def _help(magics: "QwenMagic", args: list[str]) -> Table:
    return HELP


def _config(magics: "QwenMagic", args: list[str]) -> Table:
    settings = magics.settings()
    connection = magics.session.connection(settings)
    client = magics.session.client
    key, source = key_source(magics.session.session_key)
    timeout = client.sdk_client(connection).config.timeout
    rows = (
        ("model", settings.model),
        ("system", settings.system or "(the model's default)"),
        ("display", settings.display),
        ("protocol", settings.protocol),
        ("base_url", client.resolved_base_url(connection)),
        ("timeout", f"{timeout:g} s"),
        ("api key", f"{mask_key(key)} ({source})"),
    )
    return Table("qwen_magic settings (change with %config QwenMagic.<name> = ...)", rows)


def _login(magics: "QwenMagic", args: list[str]) -> None:
    if args:
        raise UsageError("%qwen login takes no argument: it asks for the key at a hidden prompt.")
    key = getpass.getpass("DashScope API key (kept in memory for this session only): ").strip()
    if not key:
        raise UsageError("No key entered; nothing changed.")
    magics.session.session_key = key
    print(f"Key {mask_key(key)} set for this session. It is not saved anywhere.")


def _models(magics: "QwenMagic", args: list[str]) -> Table:
    catalog = magics.session.catalog(magics.settings())
    if len(args) > 1:
        raise UsageError("%qwen models takes at most one model name.")
    if args:
        model = catalog.get(args[0])
        if model is None:
            raise UsageError(f"{args[0]!r} is not in the catalog; %qwen models lists the known models.")
        return model_details(model)
    header = ("model", "context", "max in", "max out", "¥/1K in→out", "¥/1M in→out", "QPM", "TPM", "free", "")
    rows = tuple(
        (
            m.name, _count(m.context), _count(m.max_input), _count(m.max_output),
            _prices(m.tiers[0], 1_000), _prices(m.tiers[0], 1) + (" (tiered)" if len(m.tiers) > 1 else ""),
            _count(m.qpm, "—"), _count(m.tpm, "—"), _count(m.free_quota, "—"),
            "retired" if m.retired else "",
        )
        for m in sorted(catalog.models.values(), key=lambda m: (m.retired, m.name))
    )
    return Table(
        "Qwen models (prices in yuan; first tier shown, %qwen models NAME for all)",
        rows,
        header,
        (f"Figures from: {', '.join(catalog.sources)}. Override: {user_catalog_path()} or %config QwenMagic.models.",),
    )


def model_details(model: ModelInfo) -> Table:
    rows: list[tuple[str, str]] = [
        ("context", _count(model.context)),
        ("max input", _count(model.max_input)),
        ("max output", _count(model.max_output)),
        ("thinking", model.thinking),
        ("vision", "yes" if model.vision else "no"),
    ]
    lower = 0
    for tier in model.tiers:
        span = f"input {lower + 1:,}–{tier.up_to:,}" if tier.up_to else (f"input over {lower:,}" if lower else "any input")
        price = f"¥{tier.input:g} in → ¥{tier.output:g} out per 1M"
        if tier.thinking_output is not None:
            price += f" (thinking out ¥{tier.thinking_output:g})"
        rows.append((f"price, {span}", f"{price}; per 1K: {_prices(tier, 1_000)}"))
        lower = tier.up_to or lower
    rows += [
        ("rate limit", f"{_count(model.qpm, 'no published')} requests / {_count(model.tpm, 'no published')} tokens per minute"),
        ("free quota", f"{_count(model.free_quota, 'none known')} tokens"
                       + (f" for {model.free_quota_days} days" if model.free_quota_days else "")),
        ("status", "retired snapshot" if model.retired else "current"),
        ("source", f"{model.source} ({model.as_of})"),
    ]
    return Table(model.name, tuple(rows))


def _count(value: int | None, missing: str = "?") -> str:
    return missing if value is None else f"{value:,}"


def _prices(tier: PriceTier, per: int) -> str:
    scale = per / 1_000_000 if per > 1 else 1
    return f"{tier.input * scale:g}→{tier.output * scale:g}"


def _usage(magics: "QwenMagic", args: list[str]) -> UsageReport:
    if args:
        raise UsageError("%qwen usage takes no argument.")
    return UsageReport(magics.session.ledger)


def _budget(magics: "QwenMagic", args: list[str]) -> str:
    session = magics.session
    if len(args) > 1:
        raise UsageError("Use %qwen budget, %qwen budget YUAN or %qwen budget off.")
    if args:
        if args[0].lower() == "off":
            session.budget, session.budget_off = None, True
        else:
            try:
                amount = float(args[0].lstrip("¥"))
            except ValueError:
                raise UsageError(f"%qwen budget needs an amount in yuan or 'off', not {args[0]!r}.") from None
            if not amount > 0:
                raise UsageError("A budget must be a positive amount of yuan.")
            session.budget, session.budget_off = amount, False
    spent = session.ledger.total_cost
    budget = session.effective_budget(magics.settings())
    if budget is None:
        return BudgetReport(f"No budget set; spent {format_yuan(spent)} this session. Set one with %qwen budget YUAN.")
    return BudgetReport(
        f"Budget {format_yuan(budget)}: spent {format_yuan(spent)}, {format_yuan(max(budget - spent, 0))} left."
    )


class BudgetReport(str):
    """A sentence shown without quotes."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _count_command(magics: "QwenMagic", args: list[str]) -> Table:
    text = " ".join(args)
    if not text:
        raise UsageError("%qwen count needs some text, e.g. %qwen count 你好，世界")
    settings = magics.settings()
    model = magics.session.catalog(settings).get(settings.model)
    preflight = prepare(settings.model, model, [{"role": "user", "content": text}], max_tokens=None, thinking=False)
    return Table(
        f"Tokens ({settings.model}'s tokenizer)",
        (
            ("as text", f"{count_text(text):,}"),
            ("as a one-message request", f"{preflight.input_tokens:,} (chat template and default system prompt)"),
            ("that request's input cost", format_yuan(preflight.estimate.input_cost)),
        ),
    )


COMMANDS: dict[str, Callable[["QwenMagic", list[str]], Any]] = {
    "models": _models,
    "usage": _usage,
    "budget": _budget,
    "count": _count_command,
    "help": _help,
    "config": _config,
    "login": _login,
}


def run_command(magics: "QwenMagic", line: str) -> Any:
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise UsageError(f"%qwen: {error}") from None
    if not words:
        return HELP
    name, args = words[0], words[1:]
    command = COMMANDS.get(name)
    if command is None:
        raise UsageError(f"%qwen has no command {name!r}; try one of: {', '.join(COMMANDS)}.")
    return command(magics, args)
