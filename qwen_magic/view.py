"""How an answer appears: a live view while it streams, a durable output when it ends.

* ``WidgetView`` (Jupyter): a box of HTML widgets. Finished Markdown blocks are rendered
  once into a widget that is never touched again; only the open block is re-rendered.
  Updates are coalesced to a message budget (~16 messages a second) and sent from the
  session's timer thread; the stream only hands text over. At the end the box is replaced,
  under the same display id, by a plain ``text/markdown`` + ``text/html`` output (its HTML
  built from the blocks already rendered where that is the same), so a saved notebook needs
  no widget state; the box and its open block go back to the session's pool, emptied.
* ``MarkdownView``: the same durable output, updated in place without widgets.
* ``TerminalView``: text printed as it comes, then the footer.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol, TextIO

from .markdown import BlockSplitter, escape, render_markdown
from .formats import preformatted, reasoning_html
from .result import FOOTER_STYLE, markdown_with_footer

if TYPE_CHECKING:  # pragma: no cover
    from .result import QwenResult

# One message every 60 ms at most, on average: ~16 a second (benchmarks/README.md says why).
MESSAGE_INTERVAL = 0.06
# Frozen blocks are grouped so that adding one re-sends a short list of children, not all.
GROUP_SIZE = 6



class View(Protocol):
    """What the engine drives while one answer streams."""

    def waiting(self, text: str) -> None:
        """Before the first text: say what is being waited for (called from a timer thread)."""

    def show_answer(self, answer: list[str]) -> None:
        """The answer has begun: ``answer`` holds its text so far, and the stream appends to it.

        The first text is shown at once; ``tick`` shows what is appended later (the stream only
        appends, once per frame, so nothing is done per frame for the view).
        """

    def add_reasoning(self, delta: str) -> None: ...

    def tick(self) -> None:
        """While streaming, called every few ms from a timer thread: send what is pending."""

    def notice(self, text: str) -> None:
        """Before any text: a wait or a retry the user should know about."""

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """The answer ended (complete, interrupted or failed): show what lasts.

        ``record`` is the turn as plain JSON; a notebook output keeps it in its metadata.
        """

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """After ``finish``: notes were added (the history could not be saved); show them too."""


def durable_bundle(
    result: "QwenResult", record: dict[str, Any], *, rendered_answer: str | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """The output a saved notebook keeps: Markdown for readers, safe HTML for display.

    ``rendered_answer``: the answer's HTML where the live view has it already.
    """
    markdown = result._repr_markdown_()
    html = result.html_with_footer(rendered_answer)
    # The turn, so a saved notebook holds its own conversation. Where the Markdown is the
    # answer plus the footer lines, the text is not sent (and saved) a second time.
    output_record = dict(record)
    output_record["footer"] = result.footer_lines()
    if markdown == markdown_with_footer(result.text, output_record["footer"]):
        del output_record["text"]
    metadata = {"qwen_magic": output_record}
    return {"text/markdown": markdown, "text/html": html}, metadata


def _drain(pending: "deque[str]") -> str:
    """Everything appended so far, removed; appends from the stream may go on meanwhile."""
    return "".join([pending.popleft() for _ in range(len(pending))])


class _AnswerReader:
    """Reads what the stream appended to the answer since the last read (from any thread)."""

    __slots__ = ("answer", "read")

    def __init__(self) -> None:
        self.answer: list[str] = []
        self.read = 0  # pieces read so far

    def __bool__(self) -> bool:
        """Something is left to read."""
        return len(self.answer) > self.read

    def take(self) -> str:
        end = len(self.answer)  # the stream may append meanwhile: read up to here
        new = "".join(self.answer[self.read:end])
        self.read = end
        return new


class _Pacer:
    """Spaces updates by the number of messages the last one cost."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval: float = MESSAGE_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._next = 0.0

    def due(self) -> bool:
        return self._clock() >= self._next

    def spent(self, messages: int = 1) -> None:
        self._next = self._clock() + self._interval * max(messages, 1)


class WidgetPool:
    """The widgets a session's live views share or reuse, so that an answer opens few comms.

    * The layout and style: ipywidgets gives each widget a layout and a style model of its
      own, two more comms to open and to close per block. One pair serves every block of
      every answer.
    * The frame (the box and its open block): lent to one answer at a time and given back
      emptied, so the next answer shows with an update and a display, not with new comms
      opened while its stream is being read (each message then slows the stream: see
      benchmarks/README.md).

    Widgets closed from outside (``Widget.close_all()``) are made again; ``close`` releases
    them all when the extension unloads.
    """

    def __init__(self) -> None:
        self._look: tuple[Any, Any] | None = None
        self._spare_frame: tuple[Any, Any] | None = None
        self._lock = threading.Lock()  # frames are taken on the timer thread and given back on the cell's

    def layout_and_style(self) -> tuple[Any, Any]:
        with self._lock:
            if self._look is None or not _all_open(self._look):
                import ipywidgets as widgets
                from ipywidgets.widgets.widget_string import HTMLStyle

                _close_all(self._look)
                self._look = (widgets.Layout(), HTMLStyle())
            return self._look

    def take_frame(self, value: str) -> tuple[Any, Any, int]:
        """A box holding one open HTML block that shows ``value``; also the messages sent."""
        with self._lock:
            spare, self._spare_frame = self._spare_frame, None
        if spare is not None and _all_open(spare):
            box, open_block = spare
            open_block.value = value
            return box, open_block, 1
        _close_all(spare)
        import ipywidgets as widgets

        layout, style = self.layout_and_style()
        open_block = widgets.HTML(value=value, layout=layout, style=style)
        return widgets.VBox(children=(open_block,), layout=layout), open_block, 2

    def give_back(self, box: Any, open_block: Any) -> None:
        """Keep a frame for the next answer, emptied: no answer stays in a live widget."""
        if not _all_open((box, open_block)):
            _close_all((box, open_block))
            return
        if open_block.value:
            open_block.value = ""
        if tuple(box.children) != (open_block,):
            box.children = (open_block,)
        with self._lock:
            spare, self._spare_frame = self._spare_frame, (box, open_block)
        _close_all(spare)  # two answers' views at once (rare): one frame is enough to keep

    def close(self) -> None:
        with self._lock:
            frame, look = self._spare_frame, self._look
            self._spare_frame = self._look = None
        _close_all(frame)
        _close_all(look)


def _all_open(widgets: tuple[Any, ...]) -> bool:
    return all(widget.comm is not None for widget in widgets)


def _close_all(widgets: tuple[Any, ...] | None) -> None:
    for widget in widgets or ():
        widget.close()


class WidgetView:
    """Live ipywidgets view that freezes finished blocks and re-renders only the open one."""

    def __init__(
        self,
        display: Callable[..., Any],
        *,
        render: Callable[[str], str] = render_markdown,
        clock: Callable[[], float] = time.monotonic,
        pool: WidgetPool | None = None,
    ):
        import ipywidgets as widgets

        self._render = render
        self._display = display
        self._reasoning: list[str] = []
        self._reasoning_widget: Any = None

        self._widgets = widgets
        # Without a session's pool, the view makes its own and closes it when it finishes.
        self._own_pool = WidgetPool() if pool is None else None
        self._pool = pool or self._own_pool
        self._layout: Any = None
        self._style: Any = None
        # Made when there is something to show (the first text, or the wait after ~0.1 s): an
        # empty view would cost its messages for nothing, and an answer that fails at once
        # shows its output without any widget.
        self._open: Any = None
        self._box: Any = None
        self._handle: Any = None
        self._loose: list[Any] = []  # frozen blocks in the box itself, until there are more than a group
        self._groups: list[Any] = []
        self._splitter = BlockSplitter()
        self._fed = 0  # characters fed to the splitter
        self._frozen_html: list[str] = []  # the frozen blocks' HTML, in order
        # The answer's text not yet fed to the splitter. The stream appends without the lock;
        # whoever updates reads it under the lock.
        self._unread = _AnswerReader()
        self._pacer = _Pacer(clock)
        self._has_text = False
        # The timer thread's tick() and the stream's show_answer() both update.
        self._lock = threading.Lock()
        self._notices: list[str] = []

    def _html(self, value: str) -> Any:
        if self._layout is None:
            self._layout, self._style = self._pool.layout_and_style()
        return self._widgets.HTML(value=value, layout=self._layout, style=self._style)

    def _show(self, open_html: str) -> int:
        """Fill the box with what there is and display it; return the messages sent."""
        self._box, self._open, sent = self._pool.take_frame(open_html)
        children = self._children()
        if children != (self._open,):
            self._box.children = children
            sent += 1
        # The widget's own bundle, published as is: IPython's formatters would also build a
        # text repr of the whole box, every time.
        self._handle = self._display(
            {
                "application/vnd.jupyter.widget-view+json": {
                    "version_major": 2, "version_minor": 0, "model_id": self._box.model_id,
                },
                "text/plain": "Qwen answer (live view)",
            },
            raw=True,
            display_id=True,
        )
        return sent + 1

    def _rendered_answer(self, result: "QwenResult") -> str | None:
        """The whole answer's HTML from the blocks rendered while it streamed, plus the rest.

        Blocks render as the whole text does (tests/test_markdown.py checks it) except where a
        link reference definition (``[label]: url``) reaches across them, or where the splitter
        says they may not (``BlockSplitter.renders_as_whole``): then ``None``, and the answer is
        rendered whole. So is an answer not in Markdown.
        """
        if result.format not in ("markdown", "code") or self._render is not render_markdown or "]:" in result.text:
            return None
        rest = self._unread.take()
        if self._fed + len(rest) != len(result.text):  # not the text this view was given
            return None
        tail = [*self._splitter.feed(rest), self._splitter.open_block]
        if not self._splitter.renders_as_whole:
            return None
        return "".join(self._frozen_html) + self._render("\n\n".join(tail))

    def _children(self) -> tuple[Any, ...]:
        """The box's contents: the thinking, the frozen blocks (loose, or in groups), the open block."""
        head = (self._reasoning_widget,) if self._reasoning_widget is not None else ()
        return (*head, *self._groups, *self._loose, self._open)

    def _set_open(self, html: str) -> int:
        """Show ``html`` as the open block (the view is made if need be); return messages sent."""
        if self._box is None:
            return self._show(html)
        self._open.value = html
        return 1

    def waiting(self, text: str) -> None:
        with self._lock:
            if not self._has_text and not self._unread:
                notices = "".join(f"<div>{escape(n)}</div>" for n in self._notices)
                self._set_open(f'<div class="qwen-waiting" style="{FOOTER_STYLE}">{notices}{escape(text)}</div>')

    def notice(self, text: str) -> None:
        self._notices.append(text)
        self.waiting(text)

    def add_reasoning(self, delta: str) -> None:
        """Thinking streams into an open section above the answer (paced like the answer)."""
        with self._lock:
            self._reasoning.append(delta)
            if self._pacer.due():
                self._show_reasoning(opened=True)

    def _show_reasoning(self, *, opened: bool) -> None:
        html = reasoning_html("".join(self._reasoning), opened=opened)
        if self._reasoning_widget is None:
            self._reasoning_widget = self._html(html)
            if self._box is None:
                self._pacer.spent(1 + self._show(""))
            else:
                self._box.children = self._children()
                self._pacer.spent(2)
        else:
            self._reasoning_widget.value = html
            self._pacer.spent(1)

    def show_answer(self, answer: list[str]) -> None:
        self._unread.answer = answer
        self.tick()

    def tick(self) -> None:
        with self._lock:
            if not self._pacer.due():
                return
            if self._unread:
                if not self._has_text:
                    self._has_text = True
                    if self._reasoning:  # the answer starts: fold the thinking away first
                        self._show_reasoning(opened=False)
                        return
                self._flush()
            elif not self._has_text and self._reasoning:
                self._show_reasoning(opened=True)

    def _flush(self) -> None:
        delta = self._unread.take()
        self._fed += len(delta)
        finished = self._splitter.feed(delta)
        messages = self._freeze("\n\n".join(finished)) if finished else 0
        messages += self._set_open(self._render(self._splitter.open_block))
        self._pacer.spent(messages)

    def _freeze(self, blocks: str) -> int:
        """Add finished blocks as a widget that is never updated again; return messages sent."""
        html = self._render(blocks)
        self._frozen_html.append(html)
        frozen = self._html(html)
        if not self._groups and len(self._loose) < GROUP_SIZE:
            # A short answer's blocks sit in the box itself: no group to open and close.
            self._loose.append(frozen)
            if self._box is None:  # the view is made next, with this block in it
                return 1
            self._box.children = self._children()
            return 2
        regrouped = 0
        if self._loose:  # the answer grew long: its first blocks become the first group
            self._groups.append(self._widgets.VBox(children=self._loose, layout=self._layout))
            self._loose, regrouped = [], 1
        if len(self._groups[-1].children) < GROUP_SIZE:
            group = self._groups[-1]
            group.children = (*group.children, frozen)
            return 2
        self._groups.append(self._widgets.VBox(children=[frozen], layout=self._layout))
        self._box.children = self._children()
        return 3 + regrouped

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        with self._lock:
            rendered_answer = self._rendered_answer(result)
        bundle, metadata = durable_bundle(result, record, rendered_answer=rendered_answer)
        if self._handle is None:  # nothing was shown yet: the answer's output is the first
            self._handle = self._display(bundle, raw=True, metadata=metadata)
        else:
            self._handle.update(bundle, raw=True, metadata=metadata)
        # The durable output replaced the view: release the blocks' comms, keep the frame.
        for group in self._groups:
            for child in group.children:
                child.close()
            group.close()
        for frozen in self._loose:
            frozen.close()
        if self._reasoning_widget is not None:
            self._reasoning_widget.close()
        if self._box is not None:
            self._pool.give_back(self._box, self._open)
        if self._own_pool is not None:
            self._own_pool.close()

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        bundle, metadata = durable_bundle(result, record)
        self._handle.update(bundle, raw=True, metadata=metadata)


class MarkdownView:
    """Plain display updates of the whole answer, for front ends without widgets."""

    UPDATE_INTERVAL = 0.25

    def __init__(
        self,
        display: Callable[..., Any],
        *,
        render: Callable[[str], str] = render_markdown,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._render = render
        self._display = display
        self._handle: Any = None  # the output, displayed with its first content
        self._text = ""  # the answer in the output so far
        self._unread = _AnswerReader()  # appended to by the stream without the lock
        self._pacer = _Pacer(clock, self.UPDATE_INTERVAL)
        self._lock = threading.Lock()

    def _show(self, bundle: dict[str, str], **kwargs: Any) -> None:
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=True, **kwargs)
        else:
            self._handle.update(bundle, raw=True, **kwargs)

    def waiting(self, text: str) -> None:
        with self._lock:  # never over the first text the stream has just shown
            if not self._text and not self._unread:
                self._show({"text/plain": text, "text/html": f"<em>{escape(text)}</em>"})

    def notice(self, text: str) -> None:
        self.waiting(text)

    def add_reasoning(self, delta: str) -> None:
        """Reasoning is kept in the result; the live view shows the answer only."""

    def show_answer(self, answer: list[str]) -> None:
        self._unread.answer = answer
        self.tick()

    def tick(self) -> None:
        with self._lock:
            if self._unread and self._pacer.due():
                self._text += self._unread.take()
                self._show({"text/markdown": self._text, "text/html": self._render(self._text)})
                self._pacer.spent()

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        bundle, metadata = durable_bundle(result, record)
        self._show(bundle, metadata=metadata)

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        self.finish(result, record)  # the same output, replaced whole


class TerminalView:
    """Text printed as it arrives; the footer on its own line.

    Writes are paced like the other views' updates. A terminal is flushed after each; a
    kernel's stream sends itself (every 0.2 s, and before the cell's reply or any display
    output), and a flush there would wait on the kernel's IOPub thread, so it is never
    flushed from here.
    """

    def __init__(self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._ends_with_newline = True
        self._pacer = _Pacer(clock)
        # Both added to by the stream without the lock: the thinking (and the headings), then
        # the answer.
        self._thinking: deque[str] = deque()
        self._unread = _AnswerReader()
        self._lock = threading.Lock()  # the timer thread's tick() writes too
        self._thinking_shown = False
        self._notes_shown = 0  # the notes under the footer printed so far

    @property
    def _out(self) -> TextIO:
        # Resolved at each write: IPython and tests swap sys.stdout.
        return self._stream or sys.stdout

    def waiting(self, text: str) -> None:
        """Nothing: a terminal keeps its scrollback clean until text comes."""

    def notice(self, text: str) -> None:
        with self._lock:
            self._out.write(f"[{text}]\n")
            self._out.flush()

    def add_reasoning(self, delta: str) -> None:
        """Thinking is printed as it comes, under a heading, before the answer."""
        if not self._thinking_shown:
            self._thinking_shown = True
            self._thinking.append("[thinking]\n")
        self._thinking.append(delta)
        if self._pacer.due():
            self.tick()

    def show_answer(self, answer: list[str]) -> None:
        if self._thinking_shown:
            self._thinking.append("\n[answer]\n")
        self._unread.answer = answer
        self.tick()

    def tick(self) -> None:
        with self._lock:
            if (self._thinking or self._unread) and self._pacer.due():
                self._write(flush=not _sends_itself(self._out))

    def _write(self, *, flush: bool) -> None:
        text = _drain(self._thinking) + self._unread.take()
        if text:
            self._out.write(text)
            self._ends_with_newline = text.endswith("\n")
        if flush:
            self._out.flush()
        self._pacer.spent()

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        with self._lock:
            self._write(flush=False)
            prefix = "" if self._ends_with_newline else "\n"
            footer = "".join(f"[{line}]\n" for line in result.footer_lines())
            self._out.write(f"{prefix}\n{footer}")
            self._notes_shown = len(result.notes)
            if not _sends_itself(self._out):  # a kernel flushes its streams as the cell ends
                self._out.flush()

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        with self._lock:  # what is printed stays: only the notes added since
            self._out.write("".join(f"[{note}]\n" for note in result.notes[self._notes_shown:]))
            self._notes_shown = len(result.notes)
            if not _sends_itself(self._out):
                self._out.flush()


def _sends_itself(stream: TextIO) -> bool:
    """A kernel's stdout (ipykernel's OutStream) sends what is written on a timer of its own."""
    return getattr(stream, "flush_interval", None) is not None


def make_view(
    mode: str,
    *,
    in_kernel: bool,
    display: Callable[..., Any],
    fmt: str = "markdown",
    pool: WidgetPool | None = None,
) -> View:
    """Pick the view for a display mode (auto: widgets in a kernel, text in a terminal)."""
    render = preformatted if fmt in ("text", "json") else render_markdown
    if mode == "text" or (mode == "auto" and not in_kernel):
        return TerminalView()
    if mode == "markdown":
        return MarkdownView(display, render=render)
    try:
        return WidgetView(display, render=render, pool=pool)
    except ImportError:
        if mode == "widget":
            from IPython.core.error import UsageError

            raise UsageError(
                "QwenMagic.display is 'widget' but ipywidgets cannot be imported; "
                "pip install ipywidgets, or set QwenMagic.display = 'auto'."
            ) from None
        return MarkdownView(display, render=render)
