"""How an answer appears: a live view while it streams, a durable output when it ends.

* ``WidgetView`` (JupyterLab, Notebook 7): one widget per answer, never reused by another
  answer, so nothing shown in one cell can appear in another (after a reload, in a second tab).
  Finished Markdown blocks are rendered once and appended; the open block is re-rendered (its
  open emphasis closed) and sent as an edit of what the browser has. Each update is one small
  message, paced (~16 a second) and sent from the session's timer thread; the stream only
  hands text over. The widget's state is the answer so far, read only when a page asks for it.
  At the end the output is replaced, under the same display id, by a plain ``text/markdown`` +
  ``text/html`` output, and the widget's state ends holding the whole answer and its footer.
* ``MarkdownView``: the same durable output, updated in place without widgets (also what
  ``display = auto`` uses where no front end sent the cell: nbconvert, papermill).
* ``TerminalView``: text printed as it comes, then the footer.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol, TextIO

from .client import mend
from .markdown import BlockSplitter, close_open_markers, escape, render_markdown
from .formats import preformatted, reasoning_html
from .i18n import N_, _
from .result import markdown_with_footer

if TYPE_CHECKING:  # pragma: no cover
    from .result import QwenResult

# One message every 60 ms at most, on average: ~16 a second (benchmarks/README.md says why).
MESSAGE_INTERVAL = 0.06



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

    def next_update_in(self) -> float:
        """Seconds until an update may go out (0: now); the timer thread sleeps until then."""

    def notice(self, text: str) -> None:
        """Before any text: a wait or a retry the user should know about."""

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """The answer ended (complete, interrupted or failed): show what lasts.

        ``record`` is the turn as plain JSON; a notebook output keeps it in its metadata.
        """

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """After ``finish``, a note was added to the result: show the output again with it."""


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
    return "".join([pending.popleft() for _piece in range(len(pending))])


class _AnswerReader:
    """Reads what the stream appended to the answer since the last read (from any thread).

    The stream appends each frame's text as it came; a surrogate pair split between two frames
    (the JSON escapes "\\ud83d", then "\\ude00") is joined here, once per read rather than once
    per frame, and a lone half left at the end is replaced (``mend``).
    """

    __slots__ = ("answer", "read", "held")

    def __init__(self) -> None:
        self.answer: list[str] = []
        self.read = 0  # pieces read so far
        self.held = ""  # a first half of a surrogate pair that ended the last read

    def __bool__(self) -> bool:
        """Something is left to read."""
        return len(self.answer) > self.read

    def take(self, *, final: bool = False) -> str:
        end = len(self.answer)  # the stream may append meanwhile: read up to here
        new = self.held + "".join(self.answer[self.read:end])
        self.read, self.held = end, ""
        if new and not new.isascii():
            if not final and "\ud800" <= new[-1] <= "\udbff":  # its other half comes next
                new, self.held = new[:-1], new[-1]
            new = mend(new)
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

    def wait(self) -> float:
        """Seconds until the next update is due (0: it is)."""
        return max(self._next - self._clock(), 0.0)


# What a live view shows, in the browser. The model keeps the answer's HTML so far (its
# state, then each message applied: ``initialize`` sees every message, in order, even before
# a view is shown); each view shows the model, laid out as the durable output is (the same
# classes, so the same type and spacing). A page that loads the widget later (a reload, a
# second tab) asks the kernel for its state and gets the whole answer so far.
#
# When the kernel restarts or dies, the widget's model is gone with it, and a saved notebook
# would read "model not found": the page's own notebook then gets, in place of the widget's
# output, what the widget showed as HTML, with a line saying the kernel restarted where the
# answer was unfinished. (Without a notebook to write to, the view keeps its text and shows
# that line once ipywidgets marks it disconnected.)
#
# Saving while the answer streams keeps the widget's output (a page reloaded while the kernel
# streams on loads the model from the kernel and follows it to the end) and writes the
# widget's state so far into the notebook's widget-state metadata, ended, with a line saying
# the answer was still streaming: a page that opens the file once that kernel is gone restores
# the model from there (as ipywidgets restores any saved widget state) and shows that text,
# not "model not found". At a save where the widget's output shows a finished answer (a reload
# lost its display id, so the durable output never replaced it) or no longer exists, the
# output becomes plain HTML and the saved state goes: the file heals.
_ESM_SOURCE = """
const parse = (html) => {
  const template = document.createElement("template");
  template.innerHTML = html;
  return [...template.content.childNodes];
};
const edited = (text, [kept, added]) => text.slice(0, kept) + added;

function apply(model, m) {
  if (m.r) model.set("reasoning", edited(model.get("reasoning"), m.r));
  if (m.b !== undefined) { model.set("open_block", ""); model.set("body", m.b); }
  if (m.f) {
    const frozen = edited(model.get("open_block"), m.f);
    model.set("open_block", "");
    model.set("body", model.get("body") + frozen);
  }
  if (m.o) model.set("open_block", edited(model.get("open_block"), m.o));
  if (m.x !== undefined) model.set("after", m.x);
  if (m.e) model.set("ended", true);
}

function shown(model) {
  const note = model.get("ended") ? "" :
    `<p class="qwen-restarted"><em>${model.get("restarted_note")}</em></p>`;
  return model.get("reasoning") + `<div class="qwen-answer">${model.get("body")}` +
    `${model.get("open_block")}</div>` + model.get("after") + note;
}

// Where the page's notebook shows this widget: [outputs, index] of each output.
function widgetOutputs(model) {
  const cells = model.widget_manager?.context?.model?.cells;
  const found = [];
  for (let c = 0; cells && c < cells.length; c++) {
    const outputs = cells.get(c).outputs;
    for (let i = 0; outputs && i < outputs.length; i++) {
      const view = outputs.get(i).data["application/vnd.jupyter.widget-view+json"];
      if (view && view.model_id === model.get("answer_id")) found.push([outputs, i]);
    }
  }
  return found;
}

function keepAsText(model, found = widgetOutputs(model)) {
  const html = shown(model);
  const text = parse(html).map((node) => node.textContent).join("\\n").trim();
  found.forEach(([outputs, i]) => outputs.set(i, { output_type: "display_data", metadata: {},
    data: { "text/html": html, "text/plain": text } }));
}

const STATE = "application/vnd.jupyter.widget-state+json";
const SAVED = ["_model_name", "_model_module", "_model_module_version", "_view_name", "_view_module",
  "_view_module_version", "_esm", "_css", "_anywidget_id", "restarted_note", "reasoning", "body",
  "open_block", "after", "answer_id"];

function saveState(model, notebook) {
  const id = model.get("answer_id");
  const found = widgetOutputs(model);
  const streaming = found.length > 0 && !model.get("ended");
  if (!streaming) keepAsText(model, found);
  const widgets = notebook.getMetadata("widgets") || {};
  const states = { ...widgets[STATE]?.state };
  if (streaming) {
    const state = {};
    SAVED.forEach((key) => { if (model.get(key) !== undefined) state[key] = model.get(key); });
    state.ended = true;
    state.after += `<p><em>${model.get("streaming_note")}</em></p>`;
    states[id] = { model_name: state._model_name, model_module: state._model_module,
                   model_module_version: state._model_module_version, state };
  } else if (id in states) {
    delete states[id];
  } else {
    return;
  }
  if (Object.keys(states).length) {
    notebook.setMetadata("widgets", { ...widgets,
      [STATE]: { version_major: 2, version_minor: 0, ...widgets[STATE], state: states } });
  } else {
    notebook.deleteMetadata("widgets");
  }
}

function initialize({ model, signal }) {
  model.on("msg:custom", (m) => apply(model, m));
  const context = model.widget_manager?.context;
  const session = context?.sessionContext;
  if (!session) return;
  const watch = (_, status) => {
    if (status === "restarting" || status === "autorestarting" || status === "dead") keepAsText(model);
  };
  const saving = (_, state) => {
    if (state === "started" && context.model?.getMetadata) saveState(model, context.model);
  };
  session.statusChanged.connect(watch);
  context.saveState?.connect(saving);
  signal?.addEventListener("abort", () => {
    session.statusChanged.disconnect(watch);
    context.saveState?.disconnect(saving);
  });
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "jp-RenderedHTMLCommon jp-RenderedHTML qwen-live";
  const thinking = document.createElement("div");
  const answer = document.createElement("div");
  const after = document.createElement("div");
  const restarted = document.createElement("p");
  thinking.style.display = after.style.display = "contents";
  answer.className = "qwen-answer";
  restarted.className = "qwen-restarted";
  restarted.innerHTML = `<em>${model.get("restarted_note")}</em>`;
  root.append(thinking, answer, after, restarted);
  let body = "", openNodes = [];
  const showOpen = () => {
    openNodes.forEach((node) => node.remove());
    openNodes = parse(model.get("open_block"));
    answer.append(...openNodes);
  };
  const showBody = () => {
    const now = model.get("body");
    if (now.startsWith(body)) {
      const before = openNodes[0] || null;
      parse(now.slice(body.length)).forEach((node) => answer.insertBefore(node, before));
    } else {
      answer.replaceChildren(...parse(now));
      openNodes = [];
      showOpen();
    }
    body = now;
  };
  const showThinking = () => { thinking.innerHTML = model.get("reasoning"); };
  const showAfter = () => { after.innerHTML = model.get("after"); };
  showThinking(); showBody(); showOpen(); showAfter();
  model.on("change:reasoning", showThinking);
  model.on("change:body", showBody);
  model.on("change:open_block", showOpen);
  model.on("change:after", showAfter);
  model.on("change:ended", () => restarted.remove());
  if (model.get("ended")) restarted.remove();
  el.append(root);
}
export default { initialize, render };
"""
# A view with no kernel behind it says why in its own words, without ipywidgets' broken-link icon.
_CSS = """
.qwen-live .qwen-restarted { display: none; }
.jupyter-widgets-disconnected .qwen-live .qwen-restarted { display: block; }
.jupyter-widgets-disconnected:has(> .qwen-live)::before { display: none; }
"""
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
# Both notes go to the page in the widget's state (escaped HTML), in the language of the
# answer's cell: the browser code has no words of its own.
RESTARTED_NOTE = N_("The kernel restarted: the answer stopped here.")
# Kept in a saved notebook beside the live view, for readers that cannot show it.
STREAMING_NOTE = N_("The answer was still streaming when this output was saved.")
# Sent with every answer's widget: without its indentation and comments.
_ESM = "\n".join(
    line.strip() for line in _ESM_SOURCE.splitlines() if line.strip() and not line.strip().startswith("//")
)
# Finished answers whose widget stays open, so that a page reloaded later still shows them
# from the widget's state (its display id is lost). Older ones are closed: their outputs on
# the live page were already replaced by the durable output.
FINISHED_KEPT = 50


@functools.lru_cache(maxsize=1)
def _answer_widget_class() -> type:
    """The widget class, made on first use: %load_ext imports no widget library."""
    import anywidget
    import ipywidgets
    import traitlets

    class AnswerWidget(anywidget.AnyWidget):  # type: ignore[misc]
        """One answer's live view. Its state is read when asked for, never re-sent on a change."""

        # Declared here, so that anywidget finds them already traits: otherwise it adds them
        # to each new widget, which makes a class per answer (half of a widget's cost).
        _esm = traitlets.Unicode(_ESM).tag(sync=True)
        _css = traitlets.Unicode(_CSS).tag(sync=True)
        _anywidget_id = traitlets.Unicode("qwen_magic.view.AnswerWidget").tag(sync=True)
        # No layout widget: the view needs none (ipywidgets skips a null layout), and one model
        # per answer is one comm fewer, referring to no other model (a page reloaded mid-cell
        # waits for good on a model made before it reloaded).
        layout = traitlets.Instance(ipywidgets.Layout, allow_none=True, default_value=None).tag(
            sync=True, **ipywidgets.widget_serialization
        )
        restarted_note = traitlets.Unicode(escape(RESTARTED_NOTE)).tag(sync=True)
        streaming_note = traitlets.Unicode(escape(STREAMING_NOTE)).tag(sync=True)
        reasoning = traitlets.Unicode("").tag(sync=True)
        body = traitlets.Unicode("").tag(sync=True)
        open_block = traitlets.Unicode("").tag(sync=True)
        after = traitlets.Unicode("").tag(sync=True)
        ended = traitlets.Bool(False).tag(sync=True)
        answer_id = traitlets.Unicode("").tag(sync=True)  # the model id: the page finds its outputs by it

        opening_state: dict[str, Any] | None = None  # the declared traits' state, read once

        def add_traits(self, **traits: Any) -> None:
            """Only traits the class does not declare (adding none would still make a class)."""
            new = {name: trait for name, trait in traits.items() if not self.has_trait(name)}
            if new:
                super().add_traits(**new)

        def __init__(self, parts: Callable[[], dict[str, Any]], **kwargs: Any) -> None:
            self._parts = parts
            # Has a page read the state since the widget opened (a page that loaded it later)?
            self.state_read = False
            model_id = uuid.uuid4().hex
            super().__init__(model_id=model_id, answer_id=model_id, **kwargs)

        def get_state(self, key: Any = None, drop_defaults: bool = False) -> dict[str, Any]:
            if self.comm is not None:  # not the state its opening sends
                self.state_read = True
            elif key is None and not drop_defaults:
                # Opening: every answer's widget is made with the same traits but its id, so
                # they are read once per class (reading them was most of a widget's making).
                cls = type(self)
                if cls.opening_state is None:
                    cls.opening_state = super().get_state()
                state = {**cls.opening_state, "answer_id": self.answer_id, "restarted_note": self.restarted_note,
                         "streaming_note": self.streaming_note, **self._parts()}
                return state
            state = super().get_state(key=key, drop_defaults=drop_defaults)
            wanted = None if key is None else {key} if isinstance(key, str) else set(key)
            for name, value in self._parts().items():
                if wanted is None or name in wanted:
                    state[name] = value
            return state

    return AnswerWidget


def _utf16_length(text: str) -> int:
    """The length a browser's string has (characters past U+FFFF count twice there)."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2


def _edit(old: str, new: str) -> list[Any]:
    """``[kept, added]``: keep the first ``kept`` UTF-16 units of ``old``, then add ``added``."""
    limit = min(len(old), len(new))
    same = 0
    step = 256
    while same < limit:  # the common prefix, in slices first
        end = min(same + step, limit)
        if old[same:end] == new[same:end]:
            same = end
        elif step > 1:
            step //= 4
        else:
            break
    return [_utf16_length(new[:same]), new[same:]]


class LiveWidgets:
    """The live widgets of a session's finished answers: the last ``FINISHED_KEPT`` stay open."""

    def __init__(self, keep: int = FINISHED_KEPT) -> None:
        self._keep = keep
        self._finished: deque[Any] = deque()
        self._lock = threading.Lock()

    def finished(self, widget: Any) -> None:
        """Keep ``widget`` open; the oldest past the bound are closed by ``trim``."""
        with self._lock:
            self._finished.append(widget)

    def trim(self) -> None:
        """Close the finished widgets past the bound: called as the next request is sent, so that
        their close messages go out while the kernel waits for the answer, not after one."""
        with self._lock:
            evicted = [self._finished.popleft() for _old in range(max(len(self._finished) - self._keep, 0))]
        for old in evicted:
            old.close()

    def open_widgets(self) -> list[Any]:
        with self._lock:
            return [widget for widget in self._finished if widget.comm is not None]

    def close(self) -> None:
        with self._lock:
            finished, self._finished = list(self._finished), deque()
        for widget in finished:
            widget.close()


class WidgetView:
    """One widget per answer, never shared with another. The open block is sent as an edit of
    what the page has, and frozen in place by another edit when it ends; each update is one
    message, paced, sent from the session's timer thread (the stream only hands text over)."""

    def __init__(
        self,
        display: Callable[..., Any],
        *,
        render: Callable[[str], str] = render_markdown,
        clock: Callable[[], float] = time.monotonic,
        widgets: LiveWidgets | None = None,
    ):
        self._widget_class = _answer_widget_class()  # ImportError here: no widgets to use
        self._render = render
        self._display = display
        self._widgets = widgets
        # Made when there is something to show (the first text, or the wait after ~0.1 s): an
        # answer that fails at once shows its output without any widget.
        self._widget: Any = None
        self._handle: Any = None
        self._reasoning: list[str] = []
        self._splitter = BlockSplitter()
        self._fed = 0  # characters fed to the splitter
        self._frozen_text: list[str] = []  # the frozen blocks' Markdown and HTML, in order
        self._frozen_html: list[str] = []
        # The widget's state: what the browser shows.
        self._reasoning_html = ""
        self._open_html = ""
        self._after_html = ""
        self._ended_body: str | None = None  # the whole answer's HTML, once it ended
        self._rendered_answer_html: str | None = None
        # The answer's text not yet fed to the splitter. The stream appends without the lock;
        # whoever updates reads it under the lock.
        self._unread = _AnswerReader()
        self._pacer = _Pacer(clock)
        self._has_text = False
        self._lock = threading.Lock()  # the timer thread's tick() and the stream both update
        self._notices: list[str] = []

    @property
    def widget(self) -> Any:
        """The answer's widget (None until something was shown)."""
        return self._widget

    def _parts(self) -> dict[str, Any]:
        """The widget's state: the answer so far, or the whole of it with its footer once ended."""
        ended = self._ended_body is not None
        return {
            "ended": ended,
            "reasoning": self._reasoning_html,
            "body": self._ended_body if ended else "".join(self._frozen_html),
            "open_block": "" if ended else self._open_html,
            "after": self._after_html,
        }

    def _send(self, message: dict[str, Any]) -> None:
        """One update; the widget is made and shown with the first (its state holds it)."""
        if self._widget is None:
            self._show()
        elif message:
            self._widget.send(message)
        else:
            return
        self._pacer.spent()

    def _show(self) -> None:
        streaming_note = _(STREAMING_NOTE)
        self._widget = self._widget_class(
            self._parts, restarted_note=escape(_(RESTARTED_NOTE)), streaming_note=escape(streaming_note)
        )
        text = "\n\n".join([*self._frozen_text, self._splitter.open_block]).strip() if self._has_text else ""
        # The widget's own bundle, published as is, with text beside the view for whatever
        # cannot show it (the notebook saved mid-stream and read elsewhere, or untrusted).
        self._handle = self._display(
            {
                WIDGET_VIEW_MIME: {"version_major": 2, "version_minor": 0, "model_id": self._widget.model_id},
                "text/markdown": f"{text}\n\n*{streaming_note}*".lstrip(),
                # What the widget shows: the blocks and the open block as rendered for it.
                "text/html": f"{''.join(self._frozen_html) + self._open_html if text else ''}"
                             f"<p><em>{escape(streaming_note)}</em></p>",
                "text/plain": f"{text}\n\n[{streaming_note}]".lstrip(),
            },
            raw=True,
            display_id=True,
        )

    def _closed(self, text: str) -> str:
        """Unfinished Markdown with its open emphasis and code span closed."""
        return close_open_markers(text) if self._render is render_markdown else text

    def _set_open(self, html: str) -> list[Any]:
        edit = _edit(self._open_html, html)
        self._open_html = html
        return edit

    def _set_reasoning(self, html: str) -> list[Any]:
        edit = _edit(self._reasoning_html, html)
        self._reasoning_html = html
        return edit

    def waiting(self, text: str) -> None:
        with self._lock:
            if not self._has_text and not self._unread:
                notices = "".join(f"<p><small>{escape(n)}</small></p>" for n in self._notices)
                html = f'<div class="qwen-waiting">{notices}<p><small>{escape(text)}</small></p></div>'
                self._send({"o": self._set_open(html)})

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
        self._send({"r": self._set_reasoning(reasoning_html("".join(self._reasoning), opened=opened))})

    def show_answer(self, answer: list[str]) -> None:
        self._unread.answer = answer
        self.tick()

    def next_update_in(self) -> float:
        return self._pacer.wait()

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
        message: dict[str, Any] = {}
        if finished:
            blocks = "\n\n".join(finished)
            self._frozen_text.append(blocks)
            self._frozen_html.append(self._render(blocks))
            # The browser's open block becomes the frozen blocks: only the edit goes.
            message["f"] = self._set_open(self._frozen_html[-1])
            self._open_html = ""
        open_block = self._closed(self._splitter.open_block)
        message["o"] = self._set_open(self._render(open_block) if open_block else "")
        self._send(message)

    def _rendered_answer(self, result: "QwenResult") -> str | None:
        """The whole answer's HTML from the blocks rendered while it streamed, plus the rest.

        Blocks render as the whole text does (tests/test_markdown.py checks it) except where a
        link reference definition (``[label]: url``) reaches across them, or where the splitter
        says they may not (``BlockSplitter.renders_as_whole``): then ``None``, and the answer is
        rendered whole. So is an answer not in Markdown.
        """
        if result.format not in ("markdown", "code") or self._render is not render_markdown or "]:" in result.text:
            return None
        rest = self._unread.take(final=True)
        if self._fed + len(rest) != len(result.text):  # not the text this view was given
            return None
        self._fed += len(rest)
        tail = [*self._splitter.feed(rest), self._splitter.open_block]
        if not self._splitter.renders_as_whole:
            return None
        return "".join(self._frozen_html) + self._render("\n\n".join(tail))

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        with self._lock:
            rendered_answer = self._rendered_answer(result)
            thinking, answer, sources = result.html_parts(rendered_answer)  # rendered whole if need be
            self._rendered_answer_html = answer
            bundle, metadata = durable_bundle(result, record, rendered_answer=answer)
            if self._widget is None:  # nothing was shown yet: the answer's output is the first
                self._handle = self._display(bundle, raw=True, metadata=metadata, display_id=True)
                return
            # The widget's state ends holding the whole answer and footer, for a page that loads
            # it later (a reload has lost the display id the durable output goes to).
            message: dict[str, Any] = {"x": sources + result.footer_html(), "e": 1}
            if thinking != self._reasoning_html:
                message["r"] = self._set_reasoning(thinking)
            self._ended_body, self._after_html = answer, message["x"]
            # Sent only to a page that read the state while the answer streamed. The page that
            # showed the widget gets the durable output in its place; one reloaded meanwhile asks
            # for the state on the shell channel, answered once the cell ends: the whole answer.
            if self._widget.state_read:
                frozen = "".join(self._frozen_html)
                if rendered_answer is not None and answer.startswith(frozen):
                    message["f"] = self._set_open(answer[len(frozen):])
                    self._open_html = ""
                else:
                    message["b"] = answer
                self._widget.send(message)
            self._handle.update(bundle, raw=True, metadata=metadata)
        if self._widgets is not None:
            self._widgets.finished(self._widget)

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """A note was added after the answer ended: show the output again with it."""
        with self._lock:
            bundle, metadata = durable_bundle(result, record, rendered_answer=self._rendered_answer_html)
            if self._handle is None:
                self._handle = self._display(bundle, raw=True, metadata=metadata, display_id=True)
            else:
                self._handle.update(bundle, raw=True, metadata=metadata)
            if self._widget is not None and self._ended_body is not None:
                self._after_html = result.html_parts(self._rendered_answer_html)[2] + result.footer_html()
                if self._widget.state_read:  # as in finish: no other page shows the widget
                    self._widget.send({"x": self._after_html})


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

    def next_update_in(self) -> float:
        return self._pacer.wait()

    def tick(self) -> None:
        with self._lock:
            if self._unread and self._pacer.due():
                self._text += self._unread.take()
                shown = close_open_markers(self._text) if self._render is render_markdown else self._text
                self._show({"text/markdown": shown, "text/html": self._render(shown)})
                self._pacer.spent()

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        bundle, metadata = durable_bundle(result, record)
        self._show(bundle, metadata=metadata)

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        self.finish(result, record)


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
        self._footer: list[str] = []  # the footer lines printed

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
            self._thinking.append(_("[thinking]") + "\n")
        self._thinking.append(delta)
        if self._pacer.due():
            self.tick()

    def show_answer(self, answer: list[str]) -> None:
        if self._thinking_shown:
            self._thinking.append("\n" + _("[answer]") + "\n")
        self._unread.answer = answer
        self.tick()

    def next_update_in(self) -> float:
        return self._pacer.wait()

    def tick(self) -> None:
        with self._lock:
            if (self._thinking or self._unread) and self._pacer.due():
                self._write(flush=not _sends_itself(self._out))

    def _write(self, *, flush: bool, final: bool = False) -> None:
        text = _drain(self._thinking) + self._unread.take(final=final)
        if text:
            self._out.write(text)
            self._ends_with_newline = text.endswith("\n")
        if flush:
            self._out.flush()
        self._pacer.spent()

    def finish(self, result: "QwenResult", record: dict[str, Any]) -> None:
        with self._lock:
            self._write(flush=False, final=True)
            prefix = "" if self._ends_with_newline else "\n"
            self._footer = result.footer_lines()
            footer = "".join(f"[{line}]\n" for line in self._footer)
            self._out.write(f"{prefix}\n{footer}")
            self._notes_shown = len(result.notes)
            if not _sends_itself(self._out):  # a kernel flushes its streams as the cell ends
                self._out.flush()

    def update_footer(self, result: "QwenResult", record: dict[str, Any]) -> None:
        """Print the footer's new lines (what is printed stays)."""
        with self._lock:
            lines = result.footer_lines()
            new = [line for line in lines if line not in self._footer]
            self._footer = lines
            if new:
                self._out.write("".join(f"[{line}]\n" for line in new))
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
    front_end: bool = True,
    widgets: LiveWidgets | None = None,
) -> View:
    """Pick the view for a display mode.

    auto: a widget where a front end sent the cell (JupyterLab and Notebook 7 send the cell's
    id); plain Markdown updates in a kernel run without one (nbconvert, papermill), so that
    the saved notebook holds no widget state and its HTML export needs nothing from the
    network; text in a terminal.
    """
    render = preformatted if fmt in ("text", "json") else render_markdown
    if mode == "text" or (mode == "auto" and not in_kernel):
        return TerminalView()
    if mode == "markdown" or (mode == "auto" and not front_end):
        return MarkdownView(display, render=render)
    try:
        return WidgetView(display, render=render, widgets=widgets)
    except ImportError:
        if mode == "widget":
            from IPython.core.error import UsageError

            raise UsageError(_(
                "QwenMagic.display is 'widget' but anywidget cannot be imported; "
                "pip install anywidget, or set QwenMagic.display = 'auto'."
            )) from None
        return MarkdownView(display, render=render)
