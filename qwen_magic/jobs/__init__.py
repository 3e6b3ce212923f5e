"""Jobs over rows: one request per element of a collection (``--map``), concurrent under the
rate limits, with progress, a result aligned with the input, and resume from the history.

``rows`` (collection -> filled, counted rows), ``plan`` (the whole job's cost range, the dry
run), ``runner`` (the real-time scheduler), ``resume`` (which rows are done), ``results``
(``RowResult``, ``MapResult``), ``progress`` (the live view and the summary), ``job`` (the flow).
"""

from __future__ import annotations

from .results import MapResult, RowResult

__all__ = ["MapResult", "RowResult"]
