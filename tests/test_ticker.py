"""The session's timer thread: ticks the live view, says how long the wait is, survives a bad view."""

from __future__ import annotations

import threading
import time

from qwen_magic.engine import _Ticker


class RecordingView:
    def __init__(self, *, fail: bool = False, paced: float = 0.0) -> None:
        self.ticks = 0
        self.tick_times: list[float] = []
        self.waits: list[str] = []
        self.fail = fail
        self.paced = paced  # seconds between updates, as a view's pacer allows them
        self.ticked = threading.Event()

    def tick(self) -> None:
        self.ticks += 1
        self.tick_times.append(time.monotonic())
        self.ticked.set()
        if self.fail:
            raise RuntimeError("the front end went away")

    def next_update_in(self) -> float:
        return self.paced

    def waiting(self, text: str) -> None:
        self.waits.append(text)


def test_one_thread_ticks_each_view_in_turn_and_stops_when_released() -> None:
    ticker = _Ticker()
    first = RecordingView()
    ticker.watch(first, "qwen-plus", time.monotonic())
    assert first.ticked.wait(2)
    deadline = time.monotonic() + 2
    while not first.waits and time.monotonic() < deadline:  # the waiting line comes after 0.1 s
        time.sleep(0.01)
    thread = ticker._thread
    ticker.release()
    ticks = first.ticks
    time.sleep(3 * ticker.PERIOD)
    assert first.ticks == ticks  # released: never called again
    assert first.waits and first.waits[0] == "Waiting for qwen-plus… 0 s"

    second = RecordingView()
    ticker.watch(second, "qwen-max", time.monotonic())
    assert second.ticked.wait(2)
    assert ticker._thread is thread  # the same thread, not one per cell
    ticker.close()


def test_a_view_that_fails_is_dropped_and_the_thread_lives_on() -> None:
    ticker = _Ticker()
    broken = RecordingView(fail=True)
    ticker.watch(broken, "qwen-plus", time.monotonic())
    assert broken.ticked.wait(2)
    thread = ticker._thread
    time.sleep(3 * ticker.PERIOD)
    assert broken.ticks == 1
    assert thread is not None and thread.is_alive()
    healthy = RecordingView()
    ticker.watch(healthy, "qwen-plus", time.monotonic())
    assert healthy.ticked.wait(2)
    assert ticker._thread is thread
    ticker.close()


def test_the_wait_is_not_shown_before_a_tenth_of_a_second() -> None:
    ticker = _Ticker()
    view = RecordingView()
    started = time.monotonic()
    ticker.watch(view, "qwen-plus", started)
    assert view.ticked.wait(2)
    first_tick = time.monotonic()
    deadline = first_tick + 2
    while not view.waits and time.monotonic() < deadline:
        time.sleep(0.005)
    shown_after = time.monotonic() - started
    ticker.close()
    assert first_tick - started < _Ticker.WAIT_SHOWN_AFTER  # ticked before, without a waiting line
    assert view.waits == ["Waiting for qwen-plus… 0 s"] and shown_after >= _Ticker.WAIT_SHOWN_AFTER


def test_once_text_streams_the_view_is_ticked_when_an_update_is_due_not_more_often() -> None:
    """Each tick takes the interpreter from the stream: while the view's pacer holds updates
    back, the thread sleeps; a new answer is ticked at once all the same."""
    ticker = _Ticker()
    slow = RecordingView(paced=0.25)
    ticker.watch(slow, "qwen-plus", time.monotonic())
    ticker.text_started = True
    time.sleep(0.9)
    ticker.release()
    gaps = [later - earlier for earlier, later in zip(slow.tick_times, slow.tick_times[1:])]
    assert 2 <= slow.ticks <= 5 and min(gaps) >= 0.2  # every 20 ms would be ~45 ticks
    fresh = RecordingView()
    watched = time.monotonic()
    ticker.watch(fresh, "qwen-plus", watched)  # the thread may be in a 0.25 s sleep
    assert fresh.ticked.wait(2)
    assert fresh.tick_times[0] - watched < 0.2
    ticker.close()
