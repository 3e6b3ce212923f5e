"""The layout and style the live views share across a session's answers."""

from __future__ import annotations

import ipywidgets

from qwen_magic.view import WidgetLook


def test_every_answer_shares_one_layout_and_style_until_closed() -> None:
    look = WidgetLook()
    layout, style = look.layout_and_style()
    assert isinstance(layout, ipywidgets.Layout) and style.comm is not None
    assert look.layout_and_style() == (layout, style)

    look.close()
    assert layout.comm is None and style.comm is None
    assert look.layout_and_style()[0] is not layout


def test_a_look_closed_from_outside_is_made_again() -> None:
    look = WidgetLook()
    layout, style = look.layout_and_style()
    ipywidgets.Widget.close_all()  # what a user may run to clean up their own widgets
    fresh_layout, fresh_style = look.layout_and_style()
    assert fresh_layout is not layout and fresh_style is not style
    assert fresh_layout.comm is not None and fresh_style.comm is not None
    look.close()
