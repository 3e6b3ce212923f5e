"""A job's progress while it runs, and the summary that stays once it ends.

In a notebook: one output under the cell, a progress bar and a line (rows done of all,
failed, rows per second, tokens, yuan, time left), replaced in place at most ten times a
second, then by the summary under the same display id: plain ``text/html`` + ``text/plain``
(+ Markdown), so a saved notebook shows it without any widget state. In a terminal: one
text line rewritten in place, then the summary's lines.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TextIO

from ..i18n import _, ngettext
from ..markdown import escape
from ..pricing import format_money
from ..result import COMPLETE, FAILED, FOOTER_STYLE, QUIET_STYLE
from .results import NOT_RUN, PENDING, RowResult

if TYPE_CHECKING:  # pragma: no cover
    from .results import MapResult

# At most ten updates a second (the issue's bound), whatever the rows' pace.
UPDATE_INTERVAL = 0.1
TERMINAL_INTERVAL = 0.25
FAILURES_LISTED = 10


@dataclass
class Progress:
    """Counts of the running job, updated by the loop that reads its rows."""

    model: str
    total: int
    resumed: int = 0
    done: int = 0  # rows complete in this run
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = 0.0
    started: float = field(default_factory=time.monotonic)
    currency: str = "CNY"

    def add(self, row: RowResult) -> None:
        if row.status == COMPLETE:
            self.done += 1
        elif row.status == FAILED:
            self.failed += 1
        if row.status != NOT_RUN:
            self.input_tokens += row.usage.input_tokens
            self.output_tokens += row.usage.output_tokens
            if self.cost is not None:
                self.cost = None if row.cost is None and row.usage.total_tokens else self.cost + (row.cost or 0.0)

    @property
    def finished(self) -> int:
        return self.resumed + self.done + self.failed

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        left = self.total - self.finished
        parts = [_("{done}/{total} rows").format(done=f"{self.finished:,}", total=f"{self.total:,}")]
        if self.resumed:
            parts.append(_("{count} resumed").format(count=f"{self.resumed:,}"))
        parts.append(_("{count} failed").format(count=f"{self.failed:,}"))
        parts.append(_("{rate} rows/s").format(rate=f"{rate:,.1f}"))
        parts.append(_("{count} tokens").format(count=f"{self.input_tokens + self.output_tokens:,}"))
        parts.append(format_money(self.cost, self.currency) if self.cost is not None else _("cost unknown"))
        if rate > 0 and left:
            parts.append(_("{duration} left").format(duration=_duration(left / rate)))
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return _("{seconds} s").format(seconds=f"{seconds:.0f}")
    if seconds < 3600:
        return _("{minutes} min {seconds} s").format(minutes=f"{seconds // 60:.0f}", seconds=f"{seconds % 60:02.0f}")
    return _("{hours} h {minutes} min").format(hours=f"{seconds // 3600:.0f}", minutes=f"{seconds % 3600 // 60:02.0f}")


class ProgressView:
    """The notebook's progress output: one display, updated in place, ending as the summary."""

    def __init__(self, display: Callable[..., Any], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._display = display
        self._handle: Any = None
        self._clock = clock
        self._next = 0.0
        self.updates = 0  # messages sent, for the benchmarks

    def _show(self, bundle: dict[str, str], **kwargs: Any) -> None:
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=True, **kwargs)
        else:
            self._handle.update(bundle, raw=True, **kwargs)
        self.updates += 1

    def update(self, progress: Progress, *, note: str | None = None, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next:
            return
        self._next = now + UPDATE_INTERVAL
        line = progress.line()
        share = progress.finished / progress.total if progress.total else 1.0
        note_html = f'<div style="{QUIET_STYLE}"><small>{escape(note)}</small></div>' if note else ""
        html = (
            f'<div class="qwen-map-progress"><progress value="{share:.4f}" max="1" style="width: 24em;"></progress> '
            f"<small>{escape(line)}</small>{note_html}</div>"
        )
        self._show({"text/plain": line + (f"\n{note}" if note else ""), "text/html": html})

    def finish(self, summary: "JobSummary") -> None:
        bundle, metadata = summary.bundle()
        self._show(bundle, metadata=metadata)


class TerminalProgress:
    """Terminal IPython: one line rewritten in place, then the summary."""

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._next = 0.0
        self._width = 0
        self.updates = 0

    @property
    def _out(self) -> TextIO:
        return self._stream or sys.stdout

    def update(self, progress: Progress, *, note: str | None = None, force: bool = False) -> None:
        now = self._clock()
        if note and self.updates == 0:
            self._out.write(f"[{note}]\n")
        if not force and now < self._next:
            return
        self._next = now + TERMINAL_INTERVAL
        line = progress.line()
        self._out.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self._out.flush()
        self.updates += 1

    def finish(self, summary: "JobSummary") -> None:
        prefix = "\r" + " " * self._width + "\r" if self._width else ""
        self._out.write(prefix + "\n".join(f"[{line}]" if n else line for n, line in enumerate(summary.lines())) + "\n")
        self._out.flush()


@dataclass(frozen=True)
class JobSummary:
    """What stays under the cell: rows, failures with their codes, tokens, cost, time."""

    headline: str
    footer: str
    notes: tuple[str, ...]
    failures: tuple[tuple[str, str, str], ...]  # (row key, code, message), the first few
    record: dict[str, Any]

    @classmethod
    def of(cls, result: "MapResult", notes: tuple[str, ...] = ()) -> "JobSummary":
        rows = result.rows
        ran = [row for row in rows if not row.resumed and row.status not in (NOT_RUN, PENDING)]
        input_tokens = sum(row.usage.input_tokens for row in ran)
        output_tokens = sum(row.usage.output_tokens for row in ran)
        costs = [row.cost for row in ran]
        cost = None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
        failed = result.failed
        not_run = result.not_run
        money = lambda amount: format_money(amount, result.currency)  # noqa: E731
        counts = [_("{count} done").format(count=f"{result.done:,}")]
        if failed:
            counts.append(_("{count} failed").format(count=f"{len(failed):,}"))
        if not_run:
            counts.append(_("{count} not run").format(count=f"{len(not_run):,}"))
        headline = _("{rows} rows on {model}: {counts}").format(rows=f"{len(rows):,}", model=result.model,
                                                               counts=", ".join(counts))
        footer_parts = [result.model, _("{count} rows").format(count=f"{len(rows):,}"),
                        _("{input} in / {output} out tokens").format(input=f"{input_tokens:,}",
                                                                     output=f"{output_tokens:,}"),
                        money(cost) if cost is not None else _("cost unknown")]
        if result.session_cost is not None:
            footer_parts.append(_("session {amount}").format(amount=money(result.session_cost)))
        footer_parts.append(_("{seconds} s").format(seconds=f"{result.elapsed:.1f}"))
        if result.job is not None:
            footer_parts.append(_("batch job {job}, at the batch price (50%)").format(job=result.job))
        elif result.elapsed > 0 and ran:
            footer_parts.append(_("{rate} rows/s").format(rate=f"{len(ran) / result.elapsed:,.1f}"))
        lines = []
        if result.resumed:
            lines.append(_("resumed: {done} done before, {sent} sent in this run").format(
                done=f"{result.resumed:,}", sent=f"{len(rows) - result.resumed:,}"))
        if failed:
            codes = ", ".join(f"{code} ×{count}" for code, count in sorted(result.errors().items()))
            shown = ", ".join(repr(rows[position].key) for position in failed[:FAILURES_LISTED])
            if len(failed) > FAILURES_LISTED:
                lines.append(_("Failed rows ({codes}): {rows} and {more} more. Run the cell again to retry them.")
                             .format(codes=codes, rows=shown, more=f"{len(failed) - FAILURES_LISTED:,}"))
            else:
                lines.append(_("Failed rows ({codes}): {rows}. Run the cell again to retry them.").format(
                    codes=codes, rows=shown))
        bad_json = sum(1 for row in rows if row.format_error)
        if bad_json:
            lines.append(ngettext("{count} answer is not valid JSON: its .value is None and .text holds it.",
                                  "{count} answers are not valid JSON: their .value is None and .text holds them.",
                                  bad_json).format(count=f"{bad_json:,}"))
        if result.stopped:
            lines.append(result.stopped)
        failures = tuple((repr(rows[p].key), rows[p].error or "", rows[p].message or "") for p in failed[:FAILURES_LISTED])
        record = {
            "kind": "map", "model": result.model, "rows": len(rows), "done": result.done, "failed": len(failed),
            "not_run": len(not_run), "resumed": result.resumed, "requests": result.requests,
            "input_tokens": input_tokens, "output_tokens": output_tokens, "cost": cost, "currency": result.currency,
            "elapsed": round(result.elapsed, 3), "errors": result.errors(),
        }
        if result.job is not None:
            record["batch"] = result.job
        return cls(headline, " · ".join(footer_parts), tuple(lines) + tuple(notes), failures, record)

    def lines(self) -> list[str]:
        return [self.headline, self.footer, *self.notes]

    def markdown(self) -> str:
        return "\n\n".join([f"**{self.headline}**", *(f"*{line}*" for line in (self.footer, *self.notes))])

    def html(self) -> str:
        failures = ""
        if self.failures:
            rows = "".join(f"<tr><td>{escape(key)}</td><td>{escape(code)}</td><td>{escape(message)}</td></tr>"
                           for key, code, message in self.failures)
            title, row, code, message = (escape(text) for text in (_("Failed rows"), _("row"), _("code"), _("message")))
            failures = (f"<details><summary>{title}</summary><table><tr><th>{row}</th><th>{code}</th>"
                        f"<th>{message}</th></tr>{rows}</table></details>")
        footer = "".join(f'<div class="qwen-footer" style="{FOOTER_STYLE}"><small><em>{escape(line)}</em></small></div>'
                         for line in (self.footer, *self.notes))
        return f'<div class="qwen-map-summary"><strong>{escape(self.headline)}</strong>{failures}{footer}</div>'

    def bundle(self) -> tuple[dict[str, str], dict[str, Any]]:
        return ({"text/plain": "\n".join(self.lines()), "text/markdown": self.markdown(), "text/html": self.html()},
                {"qwen_magic": self.record})
