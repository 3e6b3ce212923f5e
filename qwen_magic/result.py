"""The result of one ``%%qwen`` cell: what ``-o VAR`` holds and what tests assert on."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from .client import Usage
from .i18n import N_, _, ngettext
from .pricing import format_money

if TYPE_CHECKING:  # pragma: no cover
    from .formats import Parsed

# Quiet text (the footer, the thinking): lighter by opacity, which the sanitiser of an untrusted
# notebook keeps (it drops a colour given as var(--jp-...)) and which suits light and dark
# themes alike. The footer is also <small> and <em>, as its Markdown is in italics.
QUIET_STYLE = "opacity: 0.65;"
FOOTER_STYLE = f"{QUIET_STYLE} margin-top: 0.4em;"
COMPLETE = "complete"
INTERRUPTED = "interrupted"
FAILED = "failed"
# The statuses as tables show them (the history keeps the English word).
STATUS_LABELS = {COMPLETE: N_("complete"), INTERRUPTED: N_("interrupted"), FAILED: N_("failed")}


def status_label(status: str) -> str:
    """A call's status in the current language (an unknown one as it is)."""
    return _(STATUS_LABELS[status]) if status in STATUS_LABELS else status


@dataclass
class QwenResult:
    """An answer with its model, usage (the server's figures), request id and timing."""

    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    request_id: str | None = None
    elapsed: float = 0.0
    first_text_after: float | None = None
    status: str = COMPLETE
    finish_reason: str | None = None
    reasoning: str = ""
    error: str | None = None
    search_results: list[dict[str, Any]] = field(default_factory=list)
    cost: float | None = None  # yuan, from the server's usage at the request's tier
    chat: str | None = "default"  # None: a one-off question (--no-history), not in any chat
    turn: int | None = None
    session_cost: float | None = None  # the session's running total after this call
    notes: list[str] = field(default_factory=list)  # lines shown under the footer
    format: str = "markdown"
    value: Any = None  # -f json: the parsed answer
    code: str | None = None  # -f code: the answer's code block
    format_error: str | None = None  # -f json / code: why the answer did not fit the format
    tool_calls: list[Any] = field(default_factory=list)  # --tools: the calls run (tools.ToolCall)
    currency: str = "CNY"  # of cost and session_cost: the region's (CNY in Beijing, USD in Singapore)

    @property
    def streaming_seconds(self) -> float:
        """Time from the first text to the end (what tokens per second is measured over)."""
        if self.first_text_after is None:
            return 0.0
        return max(self.elapsed - self.first_text_after, 0.0)

    @property
    def tokens_per_second(self) -> float | None:
        seconds = self.streaming_seconds
        if seconds <= 0.0 or not self.usage.output_tokens:
            return None
        return self.usage.output_tokens / seconds

    def footer(self) -> str:
        """The quiet line under every answer, in the current language: whole phrases joined by " · "."""
        usage = self.usage
        cached, written = usage.cached_tokens, usage.cache_creation_tokens
        if cached and written:
            tokens_in = _("{tokens:,} in ({cached:,} cached, {written:,} written to cache)").format(
                tokens=usage.input_tokens, cached=cached, written=written)
        elif cached:
            tokens_in = _("{tokens:,} in ({cached:,} cached)").format(tokens=usage.input_tokens, cached=cached)
        elif written:
            tokens_in = _("{tokens:,} in ({written:,} written to cache)").format(tokens=usage.input_tokens,
                                                                               written=written)
        else:
            tokens_in = _("{tokens:,} in").format(tokens=usage.input_tokens)
        if usage.reasoning_tokens:
            # Translators: {tokens_in} is "1,204 in", possibly with its cached tokens in brackets.
            tokens = _("{tokens_in} / {tokens_out:,} out tokens ({thinking:,} thinking)").format(
                tokens_in=tokens_in, tokens_out=usage.output_tokens, thinking=usage.reasoning_tokens)
        else:
            tokens = _("{tokens_in} / {tokens_out:,} out tokens").format(tokens_in=tokens_in,
                                                                         tokens_out=usage.output_tokens)
        parts = [self.model, tokens]
        if usage.searches:
            parts.append(ngettext("{count:,} search", "{count:,} searches", usage.searches).format(count=usage.searches))
        parts.append(format_money(self.cost, self.currency) if self.cost is not None else _("cost unknown"))
        if self.turn is not None:
            parts.append(_("chat {chat}, turn {turn}").format(chat=self.chat, turn=self.turn))
        elif self.chat is None:
            parts.append(_("one-off, not in a chat"))
        if self.session_cost is not None:
            parts.append(_("session {cost}").format(cost=format_money(self.session_cost, self.currency)))
        parts.append(_("{seconds:.1f} s").format(seconds=self.elapsed))
        rate = self.tokens_per_second
        if rate is not None:
            parts.append(_("{rate:,.0f} tok/s").format(rate=rate))
        if self.status == INTERRUPTED:
            parts.append(_("interrupted: partial answer"))
        elif self.status == FAILED:
            parts.append(_("failed: {error}").format(error=self.error) if self.error else _("failed"))
        elif self.finish_reason == "length":
            parts.append(_("cut at --max-tokens"))
        if self.tool_calls:
            count = len(self.tool_calls)
            parts.append(ngettext("{count} tool call", "{count} tool calls", count).format(count=count))
        if self.format_error:
            parts.append(self.format_error)
        return " · ".join(parts)

    def metadata(self) -> dict[str, Any]:
        """What the output's metadata carries, so a saved notebook knows its answers."""
        # Field by field: asdict() would deep-copy the parsed value only to drop it.
        data = {name: getattr(self, name) for name in _RECORDED_FIELDS}
        data["usage"] = asdict(self.usage)
        data["search_results"] = copy.deepcopy(self.search_results)
        return data

    def __str__(self) -> str:
        return self.text

    def footer_lines(self) -> list[str]:
        """The footer, then any notes (an unknown price, turns left out of the context)."""
        return [self.footer(), *self.notes]

    def _parsed(self) -> "Parsed":
        from .formats import Parsed

        value = self.value  # --schema: an instance, shown as its JSON
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        elif is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        return Parsed(value, self.code, self.format_error)

    def calls_markdown(self) -> str:
        """The tool calls made, one line each with a preview of what came back."""
        return "".join(f"- `{call.shown()}`\n  {call.outcome().strip()}\n" for call in self.tool_calls)

    def body_markdown(self) -> str:
        """Thinking, the answer in its format, and the sources, as Markdown."""
        from .formats import answer_markdown, reasoning_markdown, sources_markdown

        body = answer_markdown(self.format, self.text, self._parsed())
        if self.reasoning:
            body = reasoning_markdown(self.reasoning) + body
        if self.tool_calls:
            body = f"{self.calls_markdown()}\n{body}"
        sources = sources_markdown(self.search_results)
        return f"{body}\n\n{sources}" if sources else body

    def body_html(self, rendered_answer: str | None = None) -> str:
        """Thinking, the answer and the sources as safe HTML; ``rendered_answer`` is the
        answer already rendered (by the live view), when it is."""
        thinking, answer, sources = self.html_parts(rendered_answer)
        return f'{thinking}<div class="qwen-answer">{answer}</div>{sources}'

    def html_parts(self, rendered_answer: str | None = None) -> tuple[str, str, str]:
        """The HTML output's parts: the thinking, the answer's own HTML, the sources ("" if none)."""
        from .formats import answer_html, reasoning_html, sources_markdown
        from .markdown import render_markdown

        if rendered_answer is None:
            rendered_answer = answer_html(self.format, self.text, self._parsed())
        thinking = reasoning_html(self.reasoning, opened=False, tokens=self.usage.reasoning_tokens) if self.reasoning else ""
        if self.tool_calls:
            thinking = f'<div class="qwen-tool-calls" style="{QUIET_STYLE}">{render_markdown(self.calls_markdown())}</div>' + thinking
        sources = sources_markdown(self.search_results)
        return (thinking, rendered_answer,
                f'<div class="qwen-sources">{render_markdown(sources)}</div>' if sources else "")

    def _repr_markdown_(self) -> str:
        return markdown_with_footer(self.body_markdown(), self.footer_lines())

    def _repr_html_(self) -> str:
        return self.html_with_footer()

    def html_with_footer(self, rendered_answer: str | None = None) -> str:
        return self.body_html(rendered_answer) + self.footer_html()

    def footer_html(self) -> str:
        from .markdown import escape

        return "".join(
            f'<div class="qwen-footer" style="{FOOTER_STYLE}"><small><em>{escape(line)}</em></small></div>'
            for line in self.footer_lines()
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        if cycle:
            printer.text("QwenResult(...)")
            return
        printer.text(self.text + "".join(f"\n[{line}]" for line in self.footer_lines()))


# What the metadata keeps: not the session's running total, the notes (the footer shows
# them), the parsed value (the text holds it) or the tool calls (the turn's exchange does).
_RECORDED_FIELDS = tuple(f.name for f in fields(QwenResult) if f.name not in ("session_cost", "notes", "value", "tool_calls"))


def _footer_markdown(footer_lines: list[str]) -> str:
    return "".join(f"\n\n*{line}*" for line in footer_lines)


def markdown_with_footer(text: str, footer_lines: list[str]) -> str:
    """The answer's Markdown with its footer lines in italics under it."""
    return (text + _footer_markdown(footer_lines)).lstrip("\n")


def text_from_markdown(markdown: str, footer_lines: list[str]) -> str | None:
    """The answer back out of ``markdown_with_footer``'s output (None if it is not one)."""
    suffix = _footer_markdown(footer_lines)
    if markdown.endswith(suffix):
        return markdown[: len(markdown) - len(suffix)]
    if markdown == suffix.lstrip("\n"):
        return ""
    return None
