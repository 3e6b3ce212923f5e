"""Jobs over rows: one prompt asked of many rows, in real time (``--map``) or through DashScope's
Batch API (``--batch``), concurrent under the rate limits, with progress, a result aligned with the
input, and resume from the history.

``rows`` (collection -> filled, counted rows), ``plan`` (the whole job's cost range, the dry
run), ``runner`` (the real-time scheduler), ``resume`` (which rows are done), ``results``
(``RowResult``, ``MapResult``), ``progress`` (the live view and the summary), ``job`` (the flow);
``batch`` and ``batch_api`` (DashScope's Batch File API: submit, poll, collect, cancel), ``batched``
(``--map ... --batch``: a cell's rows as one Batch job, attached to on re-run, filled in when it ends).
"""

from __future__ import annotations

from .results import MapResult, RowResult

__all__ = ["MapResult", "RowResult"]
