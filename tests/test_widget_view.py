"""The widget view: the widgets a session shares (layout, style) or reuses (the frame), and the
durable output it leaves."""

from __future__ import annotations

import ipywidgets
import pytest

from qwen_magic.view import WidgetPool


def test_every_answer_shares_one_layout_and_style_until_closed() -> None:
    pool = WidgetPool()
    layout, style = pool.layout_and_style()
    assert isinstance(layout, ipywidgets.Layout) and style.comm is not None
    assert pool.layout_and_style() == (layout, style)

    pool.close()
    assert layout.comm is None and style.comm is None
    assert pool.layout_and_style()[0] is not layout
    pool.close()


def test_a_look_closed_from_outside_is_made_again() -> None:
    pool = WidgetPool()
    layout, style = pool.layout_and_style()
    ipywidgets.Widget.close_all()  # what a user may run to clean up their own widgets
    fresh_layout, fresh_style = pool.layout_and_style()
    assert fresh_layout is not layout and fresh_style is not style
    assert fresh_layout.comm is not None and fresh_style.comm is not None
    pool.close()


def test_a_frame_given_back_is_lent_again_emptied() -> None:
    pool = WidgetPool()
    box, open_block, sent = pool.take_frame("<p>First answer</p>")
    assert sent == 2  # made: the open block and the box
    assert open_block.value == "<p>First answer</p>" and box.children == (open_block,)
    assert open_block.layout is pool.layout_and_style()[0]
    frozen = ipywidgets.HTML("<p>A finished block</p>")
    box.children = (frozen, open_block)

    pool.give_back(box, open_block)
    # Nothing of the answer stays in a live widget (a saved widget state would keep it).
    assert open_block.value == "" and box.children == (open_block,)

    again_box, again_open, sent = pool.take_frame("<p>Second answer</p>")
    assert (again_box, again_open) == (box, open_block) and sent == 1  # one value update
    assert open_block.value == "<p>Second answer</p>"
    frozen.close()
    pool.give_back(box, open_block)
    pool.close()
    assert box.comm is None and open_block.comm is None


def test_a_frame_closed_from_outside_is_not_lent_again() -> None:
    pool = WidgetPool()
    box, open_block, _ = pool.take_frame("")
    pool.give_back(box, open_block)
    ipywidgets.Widget.close_all()
    fresh_box, fresh_open, sent = pool.take_frame("<p>x</p>")
    assert fresh_box is not box and fresh_open is not open_block and sent == 2
    assert fresh_box.comm is not None and fresh_open.layout.comm is not None
    pool.close()


def test_two_frames_lent_at_once_are_distinct_and_one_is_kept() -> None:
    pool = WidgetPool()
    first = pool.take_frame("<p>one</p>")[:2]
    second = pool.take_frame("<p>two</p>")[:2]
    assert first[0] is not second[0] and first[1] is not second[1]
    pool.give_back(*first)
    pool.give_back(*second)
    assert all(widget.comm is None for widget in first)  # one spare frame is enough
    assert pool.take_frame("")[:2] == second
    pool.close()


class _Output:
    """A display() stand-in that keeps what was shown last."""

    def __init__(self) -> None:
        self.shown: list[dict] = []

    def __call__(self, bundle: dict, **kwargs) -> "_Output":
        self.shown.append(bundle)
        return self

    def update(self, bundle: dict, **kwargs) -> None:
        self.shown.append(bundle)


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
    from qwen_magic.client import Usage
    from qwen_magic.markdown import render_markdown
    from qwen_magic.result import QwenResult
    from qwen_magic.view import WidgetView

    text = ANSWERS[name]
    rendered_whole: list[str] = []
    monkeypatch.setattr(formats, "render_markdown", lambda t: rendered_whole.append(t) or render_markdown(t))
    pool, output = WidgetPool(), _Output()
    view = WidgetView(output, pool=pool)
    answer = [text[:5]]
    view.show_answer(answer)
    pieces = [text[start : start + 7] for start in range(5, len(text), 7)]
    for piece in pieces[:-1]:
        answer.append(piece)
        view._pacer._next = 0.0  # an update is due at every tick
        view.tick()
    answer.append(pieces[-1])  # a last piece the timer never showed is still in the durable output
    result = QwenResult(text=text, model="qwen-plus", usage=Usage(input_tokens=3, output_tokens=30))
    view.finish(result, {"text": text})
    rendered_whole_at_the_end = rendered_whole.count(text)

    assert output.shown[-1]["text/html"] == result._repr_html_()  # what rendering it whole gives
    # The plain answer's blocks were rendered as they streamed; the others are rendered whole.
    assert rendered_whole_at_the_end == (0 if name == "plain" else 1)
    pool.close()
