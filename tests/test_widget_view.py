"""The widget view: one widget per answer, never reused; its state is the answer so far, and
in the end the whole answer with its footer; finished widgets are kept open up to a bound."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_magic.client import Usage
from qwen_magic.result import QwenResult
from qwen_magic.view import WIDGET_VIEW_MIME, LiveWidgets, WidgetView


class _Output:
    """A display() stand-in that keeps what was shown."""

    def __init__(self) -> None:
        self.shown: list[dict] = []

    def __call__(self, bundle: dict, **kwargs: Any) -> "_Output":
        self.shown.append(bundle)
        return self

    def update(self, bundle: dict, **kwargs: Any) -> None:
        self.shown.append(bundle)


class _Sent:
    """Records the custom messages a widget sends (instead of a front end's comm)."""

    def __init__(self, widget: Any) -> None:
        self.messages: list[dict] = []
        widget.send = lambda content, buffers=None: self.messages.append(content)


def stream(view: WidgetView, text: str, size: int = 7) -> list[str]:
    """Feed ``text`` in pieces, with an update due at every tick; return the answer list."""
    answer = [text[:size]]
    view.show_answer(answer)
    for start in range(size, len(text), size):
        answer.append(text[start : start + size])
        view._pacer._next = 0.0
        view.tick()
    return answer


def result_for(text: str) -> QwenResult:
    return QwenResult(text=text, model="qwen-plus", usage=Usage(input_tokens=3, output_tokens=30))


class Browser:
    """What a page shows from the widget: its state when it loaded, then the custom messages
    (the same steps as the view's ESM, on strings)."""

    def __init__(self, state: dict[str, str]) -> None:
        self.reasoning, self.body, self.open, self.after = (state[k] for k in ("reasoning", "body", "open_block", "after"))

    def apply(self, message: dict) -> None:
        if "r" in message:
            self.reasoning = _utf16_slice(self.reasoning, message["r"][0]) + message["r"][1]
        if "b" in message:
            self.body, self.open = message["b"], ""
        if "f" in message:
            self.body += _utf16_slice(self.open, message["f"][0]) + message["f"][1]
            self.open = ""
        if "o" in message:
            self.open = _utf16_slice(self.open, message["o"][0]) + message["o"][1]
        if "x" in message:
            self.after = message["x"]

    @property
    def html(self) -> str:
        return self.reasoning + self.body + self.open + self.after


def _utf16_slice(text: str, units: int) -> str:
    return text.encode("utf-16-le")[: units * 2].decode("utf-16-le")


ANSWER = "# Plan\n\nFirst **paragraph** of the answer, 中文 and 😀 too.\n\n- one\n- two\n\n```python\nprint(1)\n```\n\nThe end."


def test_two_answers_never_share_a_widget_and_each_ends_holding_its_own_answer() -> None:
    widgets = LiveWidgets()
    views = []
    for text in ("The first answer.\n\nIts second block.", "A second answer, in another cell."):
        output = _Output()
        view = WidgetView(output, widgets=widgets)
        stream(view, text)
        result = result_for(text)
        view.finish(result, {"text": text})
        views.append((view, output, result))
    (first, _, first_result), (second, second_output, _) = views
    assert first.widget is not second.widget and first.widget.model_id != second.widget.model_id
    assert first.widget.layout is None and second.widget.layout is None  # no other model to share
    state = first.widget.get_state()
    # A page that loads the first widget later sees the first answer and its footer, only.
    assert "The first answer." in state["body"] and "second answer" not in state["body"]
    assert state["open_block"] == "" and first_result.footer_lines()[0] in state["after"]
    assert state["body"] + state["after"] == first_result.html_parts()[1] + first_result.footer_html()
    live = second_output.shown[0]
    assert live[WIDGET_VIEW_MIME]["model_id"] == second.widget.model_id
    assert widgets.open_widgets() == [first.widget, second.widget]
    widgets.close()
    assert first.widget.comm is None and second.widget.comm is None


def test_a_page_that_loads_the_widget_mid_stream_sees_the_answer_so_far_then_follows() -> None:
    output = _Output()
    view = WidgetView(output)
    text = ANSWER * 3
    answer = stream(view, text[:40])
    sent = _Sent(view.widget)
    early = Browser(view.widget.get_state())  # a page loaded the widget here
    for start in range(40, len(text), 9):
        answer.append(text[start : start + 9])
        view._pacer._next = 0.0
        view.tick()
        if start == 40 + 9 * 20:
            late = Browser(view.widget.get_state())  # another loaded it here
            late_from = len(sent.messages)
    result = result_for(text)
    view.finish(result, {"text": text})
    for message in sent.messages:
        early.apply(message)
    for message in sent.messages[late_from:]:
        late.apply(message)
    whole = result.html_parts()[1] + result.footer_html()
    assert early.html == late.html == whole
    final = view.widget.get_state()
    assert final["body"] + final["after"] == whole
    # Only the edit of the open block goes: the live messages carry about the answer's HTML once.
    live_bytes = sum(len(m.get(key, [0, ""])[1]) for m in sent.messages[:-1] for key in ("f", "o"))
    assert live_bytes < 1.5 * len(result.html_parts()[1])
    # The durable output replaced the view on the live page.
    assert output.shown[-1]["text/html"] == result._repr_html_()


def test_finished_widgets_are_kept_open_up_to_a_bound_and_older_ones_are_closed() -> None:
    widgets = LiveWidgets(keep=3)
    made = []
    for n in range(5):
        widgets.trim()  # as the session does when it sends a request
        view = WidgetView(_Output(), widgets=widgets)
        stream(view, f"Answer {n}.")
        view.finish(result_for(f"Answer {n}."), {"text": f"Answer {n}."})
        made.append(view.widget)
    # Closed as the next request goes out, not as an answer ends: 4 kept until then.
    assert [w.comm is None for w in made] == [True, False, False, False, False]
    widgets.trim()
    assert [w.comm is None for w in made] == [True, True, False, False, False]
    assert widgets.open_widgets() == made[2:]
    widgets.close()


def test_every_widget_opens_with_the_state_of_its_own_traits_and_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The declared traits' state is read once per class; each opening still sends every trait,
    its own id and its own answer so far."""
    import comm
    from ipywidgets.widgets.widget import Widget

    opened: list[dict] = []
    create = comm.create_comm
    monkeypatch.setattr(comm, "create_comm", lambda **args: opened.append(args["data"]["state"]) or create(**args))
    first, second = WidgetView(_Output()), WidgetView(_Output())
    stream(first, "The first answer.", size=100)
    stream(second, "The second answer.", size=100)
    assert len(opened) == 2
    for view, state in zip((first, second), opened):
        every_trait = Widget.get_state(view.widget)  # ipywidgets reading each trait afresh
        assert state["answer_id"] == view.widget.model_id
        assert {k: v for k, v in state.items() if k != "open_block"} == \
               {k: v for k, v in every_trait.items() if k != "open_block"}
    assert "first answer" in opened[0]["open_block"] and "second answer" in opened[1]["open_block"]


def test_the_saved_bundle_holds_text_beside_the_widget_view() -> None:
    output = _Output()
    view = WidgetView(output)
    stream(view, "Some **bold", size=100)
    bundle = output.shown[0]
    assert set(bundle) == {WIDGET_VIEW_MIME, "text/markdown", "text/html", "text/plain"}
    assert bundle["text/markdown"].startswith("Some **bold")
    assert "<strong>bold</strong>" in bundle["text/html"]  # the open emphasis closed


def test_an_answer_that_fails_before_any_text_makes_no_widget() -> None:
    output = _Output()
    view = WidgetView(output)
    result = result_for("")
    result.status, result.error = "failed", "InvalidApiKey"
    view.finish(result, {"text": ""})
    assert view.widget is None and len(output.shown) == 1 and WIDGET_VIEW_MIME not in output.shown[0]


def test_a_note_added_after_the_end_reaches_the_output_and_the_widget() -> None:
    output = _Output()
    view = WidgetView(output)
    stream(view, "An answer.")
    result = result_for("An answer.")
    view.finish(result, {"text": "An answer."})
    sent = _Sent(view.widget)
    result.notes.append("History not saved: locked")
    view.update_footer(result, {"text": "An answer."})
    assert "History not saved: locked" in output.shown[-1]["text/markdown"]
    assert sent.messages == []  # no page shows the widget: the durable output took its place
    assert "History not saved: locked" in view.widget.get_state()["after"]
    # A page that loaded the widget (it read the state) is sent the new footer too.
    result.notes.append("A second note.")
    view.update_footer(result, {"text": "An answer."})
    assert "A second note." in sent.messages[-1]["x"]


def test_the_end_goes_to_the_widget_only_where_a_page_read_its_state_while_it_streamed() -> None:
    """The page that showed the widget gets the durable output in its place; one that loaded it
    later got its state, and needs the end only if it asked before the end."""
    quiet, asked = WidgetView(_Output()), WidgetView(_Output())
    for view in (quiet, asked):
        stream(view, ANSWER)
    assert not quiet.widget.state_read  # the state its opening sent does not count
    page = Browser(asked.widget.get_state())
    sent = {"quiet": _Sent(quiet.widget), "asked": _Sent(asked.widget)}
    result = result_for(ANSWER)
    whole = result.html_parts()[1] + result.footer_html()
    for view in (quiet, asked):
        view.finish(result, {"text": ANSWER})
    assert sent["quiet"].messages == []
    assert sent["asked"].messages[-1]["e"] == 1
    for message in sent["asked"].messages:
        page.apply(message)
    assert page.html == whole
    for view in (quiet, asked):  # a page that asks now gets the whole answer either way
        state = view.widget.get_state()
        assert state["ended"] and state["open_block"] == "" and state["body"] + state["after"] == whole


ANSWERS = {
    "plain": "# Plan\n\nFirst paragraph of the answer.\n\n- one\n- two\n\n```python\nprint(1)\n```\n\nThe end.",
    "reference": "See [the docs] for more.\n\nAnother block.\n\n[the docs]: https://example.com",
    "fence in a list": "1. Install it:\n   ```bash\n   pip install x\n\n   pip list\n   ```\n\nDone.",
}


@pytest.mark.parametrize("name", ANSWERS)
def test_the_durable_output_is_the_whole_answer_rendered_reusing_the_live_blocks_where_safe(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwen_magic import formats
    from qwen_magic.markdown import render_markdown

    text = ANSWERS[name]
    rendered_whole: list[str] = []
    monkeypatch.setattr(formats, "render_markdown", lambda t: rendered_whole.append(t) or render_markdown(t))
    output = _Output()
    view = WidgetView(output)
    answer = stream(view, text[:-3])
    answer.append(text[-3:])  # a last piece the timer never showed is still in the durable output
    result = result_for(text)
    view.finish(result, {"text": text})
    rendered_whole_at_the_end = rendered_whole.count(text)
    assert output.shown[-1]["text/html"] == result._repr_html_()  # what rendering it whole gives
    # The plain answer's blocks were rendered as they streamed; the others are rendered whole, once.
    assert rendered_whole_at_the_end == (0 if name == "plain" else 1)


def test_the_other_views_show_a_note_added_after_the_end() -> None:
    import io

    from qwen_magic.view import MarkdownView, TerminalView

    output = _Output()
    markdown = MarkdownView(output)
    result = result_for("An answer.")
    markdown.finish(result, {"text": "An answer."})
    result.notes.append("History not saved: locked")
    markdown.update_footer(result, {"text": "An answer."})
    assert output.shown[-1]["text/markdown"].endswith("*History not saved: locked*")

    printed = io.StringIO()
    terminal = TerminalView(printed)
    result = result_for("An answer.")
    terminal.show_answer(["An answer."])
    terminal.finish(result, {"text": "An answer."})
    before = printed.getvalue()
    result.notes.append("History not saved: locked")
    terminal.update_footer(result, {"text": "An answer."})
    assert printed.getvalue() == before + "[History not saved: locked]\n"  # only the new line


def test_the_answer_reader_joins_a_surrogate_pair_split_between_two_reads() -> None:
    from qwen_magic.view import _AnswerReader

    reader = _AnswerReader()
    reader.answer = ["你好\ud83d"]  # the first half of 😀 ends a frame, and a read
    assert reader.take() == "你好"
    reader.answer.append("\ude00 ok")
    assert reader.take() == "😀 ok"
    reader.answer.append("end\ud83d")  # a first half that never gets its other half
    assert reader.take(final=True) == "end\ufffd"
    assert reader.take(final=True) == ""
