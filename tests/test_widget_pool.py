"""The widgets a session's live views share (layout, style) or reuse (the frame)."""

from __future__ import annotations

import ipywidgets

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
