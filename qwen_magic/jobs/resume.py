"""Which rows of a job are done: the history keeps every finished row as it completes.

A job is its template, model, system prompt, format and request parameters, in one
notebook: change any of them and it is a new job, started afresh. A row is its request
(``Row.digest``). Real-time runs and DashScope Batch jobs record their rows here alike.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

from ..result import COMPLETE
from ..store import Store
from .results import RowResult


def job_key(
    *,
    notebook: str,
    template: str,
    model: str,
    system: str | None,
    fmt: str,
    parameters: Mapping[str, Any],
    images: tuple[str, ...] = (),
) -> str:
    """The job's identity in the history (not the collection's: rows are matched by content)."""
    described = json.dumps(
        {"notebook": notebook, "template": template, "model": model, "system": system, "format": fmt,
         "parameters": dict(parameters), "images": list(images)},
        ensure_ascii=False, sort_keys=True, default=str,
    )
    return "map:" + hashlib.sha256(described.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def record_rows(store: Store, job: str, finished: Iterable[tuple[str, RowResult]]) -> int:
    """Write finished rows, ``(row digest, result)``, in one commit; return how many."""
    return store.save_job_rows(job, ((digest, result.status, result.record()) for digest, result in finished))


def record_row(store: Store, job: str, digest: str, result: RowResult) -> None:
    """Write one finished row (``record_rows`` writes many in one commit)."""
    record_rows(store, job, [(digest, result)])


def done_rows(store: Store, job: str) -> set[str]:
    """The digests of the job's rows that have a result (failed rows are sent again)."""
    return store.job_row_digests(job, COMPLETE)


def stored_rows(store: Store, job: str) -> dict[str, dict[str, Any]]:
    """The job's rows that have a result: their records, by row digest."""
    return store.job_rows(job, COMPLETE)


# A batch job's rows are written, and its cost counted, once: by the first kernel that collects it.
# The mark is a row of the job's own (status "collected"), written in the same transaction.
COLLECTED = "collected"


def batch_mark(batch_job: str) -> str:
    return f"batch:{batch_job}"


def is_collected(store: Store, job: str, batch_job: str) -> bool:
    return batch_mark(batch_job) in store.job_row_digests(job, COLLECTED)


def mark_collected(store: Store, job: str, batch_job: str, record: dict[str, Any]) -> None:
    store.save_job_rows(job, [(batch_mark(batch_job), COLLECTED, record)])
