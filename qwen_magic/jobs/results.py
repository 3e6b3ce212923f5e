"""A job's results, aligned with its input: ``labels[i]`` is row i's answer.

``RowResult`` is what one row came to, however it was run (real time or DashScope Batch):
its text, parsed value, usage, cost, status and error. ``MapResult`` holds them in the
input's order, with the input's keys, and gives pandas objects when pandas is there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from ..client import Usage
from ..formats import parse_answer
from ..i18n import _
from ..pricing import format_money
from ..result import COMPLETE, FAILED

# A row not sent (the job stopped first: an interrupt, an account error).
NOT_RUN = "not run"
# A row sent in a DashScope Batch job that has not finished yet.
PENDING = "pending"
# The code of a row whose answer does not match --schema.
SCHEMA_MISMATCH = "SchemaMismatch"


@dataclass
class RowResult:
    """One row's answer: what ``labels[i]`` holds.

    ``status`` is ``complete``, ``failed`` (after its retries; ``error`` is the code and
    ``message`` the server's words) or ``not run``. ``resumed`` says it came from the history
    of an earlier run, not from a request of this one.
    """

    position: int
    key: Any
    text: str = ""
    value: Any = None  # -f json: the parsed answer
    usage: Usage = field(default_factory=Usage)
    cost: float | None = None
    status: str = NOT_RUN
    error: str | None = None
    message: str | None = None
    request_id: str | None = None
    format_error: str | None = None
    elapsed: float = 0.0
    attempts: int = 0
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == COMPLETE

    def judge(self, fmt: str, schema: Any = None) -> "RowResult":
        """Parse a complete row's answer (-f json), and check it against ``schema`` (--schema):
        a row that does not match is failed, with the first failing field; its text is kept."""
        if fmt != "json" or self.status != COMPLETE:
            return self
        parsed = parse_answer("json", self.text)
        self.value, self.format_error = parsed.value, parsed.error
        if schema is None:
            return self
        problem = parsed.error
        if problem is None:
            self.value, problem = schema.validate(parsed.value)
        if problem is not None:
            self.value, self.format_error = None, None
            self.status, self.error = FAILED, SCHEMA_MISMATCH
            self.message = _("the answer does not match {schema}: {problem}").format(schema=schema.name,
                                                                                      problem=problem)
        return self

    def record(self) -> dict[str, Any]:
        """The row as the history keeps it (plain JSON; no key, no position: rows move)."""
        return {
            "text": self.text,
            "usage": asdict(self.usage),
            "cost": self.cost,
            "status": self.status,
            "error": self.error,
            "message": self.message,
            "request_id": self.request_id,
        }

    @classmethod
    def from_record(cls, position: int, key: Any, record: dict[str, Any]) -> "RowResult":
        usage = record.get("usage") or {}
        known = {name: int(usage.get(name) or 0) for name in Usage.__dataclass_fields__}
        return cls(position, key, text=str(record.get("text") or ""), usage=Usage(**known),
                   cost=record.get("cost"), status=str(record.get("status") or COMPLETE),
                   error=record.get("error"), message=record.get("message"),
                   request_id=record.get("request_id"), resumed=True)

    def __str__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        if self.ok:
            printer.text(self.text)
        else:
            if self.error:
                printer.text(_("[row {key} {status}: {error}]").format(key=repr(self.key), status=self.status,
                                                                       error=self.error))
            else:
                printer.text(_("[row {key} {status}]").format(key=repr(self.key), status=self.status))


@dataclass
class MapResult(Sequence[RowResult]):
    """Every row's ``RowResult``, in the input's order; what ``-o NAME`` holds."""

    rows: list[RowResult]
    model: str
    elapsed: float = 0.0
    requests: int = 0  # requests sent by this run, retries included
    resumed: int = 0  # rows whose result came from an earlier run
    stopped: str | None = None  # why the job stopped before every row was run
    input_index: Any = None  # the input's pandas index, kept for to_series / to_frame
    session_cost: float | None = None
    currency: str = "CNY"  # the region's, which every cost is in
    fields: tuple[str, ...] | None = None  # --schema: the answer's top-level fields, to_frame's columns
    job: str | None = None  # --batch: the DashScope Batch job's id
    notes: list[str] = field(default_factory=list)  # said under the summary (history, resume, the job's end)
    _waiter: Any = field(default=None, repr=False, compare=False)  # --batch: what wait() waits for

    def wait(self) -> "MapResult":
        """--batch: block until the job has finished and every row is filled in (with a progress
        line; ■ stops waiting, not the job). A result that is complete returns at once."""
        if self._waiter is not None:
            self._waiter.wait()
        return self

    @property
    def pending(self) -> list[int]:
        """--batch: positions of the rows whose job has not finished yet."""
        return [row.position for row in self.rows if row.status == PENDING]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: Any) -> Any:
        return self.rows[position]

    def __iter__(self) -> Iterator[RowResult]:
        return iter(self.rows)

    @property
    def texts(self) -> list[str]:
        return [row.text for row in self.rows]

    @property
    def values(self) -> list[Any]:
        return [row.value for row in self.rows]

    @property
    def keys(self) -> list[Any]:
        return [row.key for row in self.rows]

    @property
    def failed(self) -> list[int]:
        """Positions of the rows that failed after their retries."""
        return [row.position for row in self.rows if row.status == FAILED]

    @property
    def not_run(self) -> list[int]:
        return [row.position for row in self.rows if row.status == NOT_RUN]

    @property
    def done(self) -> int:
        return sum(row.ok for row in self.rows)

    @property
    def usage(self) -> Usage:
        """Tokens of every row, the earlier runs' included."""
        totals = dict.fromkeys(Usage.__dataclass_fields__, 0)
        for row in self.rows:
            for name in totals:
                totals[name] += getattr(row.usage, name)
        return Usage(**totals)

    @property
    def cost(self) -> float | None:
        """Yuan for every row (None if the model's price is unknown)."""
        costs = [row.cost for row in self.rows
                 if row.status not in (NOT_RUN, PENDING) and (row.usage.input_tokens or row.cost)]
        if any(cost is None for cost in costs):
            return None
        return sum(costs)  # type: ignore[arg-type]

    def errors(self) -> dict[str, int]:
        """Failed rows by error code."""
        counts: dict[str, int] = {}
        for row in self.rows:
            if row.status == FAILED:
                counts[row.error or "error"] = counts.get(row.error or "error", 0) + 1
        return counts

    def to_series(self, name: str | None = None) -> Any:
        """The answers as a pandas Series with the input's index (pandas needed)."""
        import pandas as pd

        data = [row.value for row in self.rows] if any(row.value is not None for row in self.rows) else self.texts
        index = self.input_index if self.input_index is not None else self.keys
        return pd.Series(data, index=index, name=name, dtype=object)

    def to_frame(self) -> Any:
        """One row per input row: text, value, status, error, tokens and cost (pandas needed).

        With --schema, one column per field of the answer instead (None where a row failed)."""
        import pandas as pd

        index = self.input_index if self.input_index is not None else self.keys
        if self.fields is not None:
            flat = [_fields_of(row.value) for row in self.rows]
            return pd.DataFrame({name: [values.get(name) for values in flat] for name in self.fields}, index=index)
        return pd.DataFrame(
            {
                "text": self.texts,
                "value": self.values,
                "status": [row.status for row in self.rows],
                "error": [row.error for row in self.rows],
                "input_tokens": [row.usage.input_tokens for row in self.rows],
                "output_tokens": [row.usage.output_tokens for row in self.rows],
                "cost": [row.cost for row in self.rows],
            },
            index=index,
        )

    def summary(self) -> "JobSummary":
        from .progress import JobSummary

        return JobSummary.of(self, tuple(dict.fromkeys(self.notes)))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        if cycle:
            printer.text("MapResult(...)")
            return
        printer.text("\n".join(self.summary().lines()))

    def _repr_html_(self) -> str:
        return self.summary().html()

    def __repr__(self) -> str:
        return "<MapResult {said}>".format(said=_("{rows} rows on {model}: {done} done, {failed} failed, {cost}").format(
            rows=f"{len(self.rows):,}", model=self.model, done=f"{self.done:,}", failed=f"{len(self.failed):,}",
            cost=format_money(self.cost, self.currency)))


def _fields_of(value: Any) -> dict[str, Any]:
    """An answer's top-level fields: a Pydantic model's, a dataclass's or a dict's."""
    if value is None:
        return {}
    if hasattr(value, "model_dump") and not isinstance(value, type):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: getattr(value, item.name) for item in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    return {}
