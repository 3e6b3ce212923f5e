"""Showing a cell's output and replacing it, without a needless wait on the kernel.

Before every display message, ipykernel's display publisher flushes stdout and stderr so
that printed text comes first; each flush is a round trip to the kernel's IOPub thread
(~1 ms, more on a busy machine) even when nothing was printed. An answer shows one output
and replaces it at the end, so here a stream is flushed only when it has text waiting:
the messages arrive in the same order, without the waits.
"""

from __future__ import annotations

import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

# Publishing swaps a method on the shell's one display publisher: one publish at a time.
_publishing = threading.Lock()


def _has_waiting_text(stream: Any) -> bool:
    # ipykernel's OutStream sets _flush_pending on write and clears it when it sends;
    # any other stream (a terminal, a capture) may buffer, so it is always flushed.
    return getattr(stream, "_flush_pending", True) is not False


@contextmanager
def _flush_only_waiting_streams() -> Iterator[None]:
    from IPython import get_ipython

    shell = get_ipython()
    publisher = getattr(shell, "display_pub", None)
    flush_streams = getattr(publisher, "_flush_streams", None)
    if flush_streams is None:
        yield
        return

    def flush_waiting_streams() -> None:
        if _has_waiting_text(sys.stdout) or _has_waiting_text(sys.stderr):
            flush_streams()

    had_own = "_flush_streams" in vars(publisher)
    publisher._flush_streams = flush_waiting_streams
    try:
        yield
    finally:
        if had_own:
            publisher._flush_streams = flush_streams
        else:
            del publisher._flush_streams


class OutputHandle:
    """One output of the running cell, replaced in place by its display id."""

    def __init__(self, display_id: str) -> None:
        self.display_id = display_id

    def update(self, obj: Any, **kwargs: Any) -> None:
        _publish(obj, display_id=self.display_id, update=True, **kwargs)


def display(obj: Any, *, display_id: bool | str = True, **kwargs: Any) -> OutputHandle:
    """Like ``IPython.display.display(obj, display_id=True, ...)``, without the idle flushes."""
    handle = OutputHandle(uuid.uuid4().hex if display_id is True else str(display_id))
    _publish(obj, display_id=handle.display_id, **kwargs)
    return handle


def _publish(obj: Any, **kwargs: Any) -> None:
    from IPython.display import display as ipython_display

    with _publishing, _flush_only_waiting_streams():
        ipython_display(obj, **kwargs)
