"""Markdown rendering is safe, and the splitter hands back each finished block once."""

from __future__ import annotations

import pytest

from qwen_magic.markdown import BlockSplitter, render_markdown


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert('x')</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="#" onclick="alert(1)">click</a>',
        "<iframe src='https://example.com'></iframe>",
    ],
)
def test_raw_html_in_an_answer_is_shown_as_text(hostile: str) -> None:
    rendered = render_markdown(f"Look:\n\n{hostile}\n")
    assert "<script" not in rendered and "<img" not in rendered
    assert "<iframe" not in rendered and "<a " not in rendered
    assert "&lt;" in rendered


def test_javascript_links_are_not_made_clickable() -> None:
    rendered = render_markdown("[click me](javascript:alert(1))")
    assert "href" not in rendered


def test_tables_code_and_emphasis_render() -> None:
    rendered = render_markdown("**bold** `x`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint(1)\n```\n")
    assert "<strong>bold</strong>" in rendered
    assert "<table>" in rendered and "<td>2</td>" in rendered
    assert '<code class="language-python">print(1)' in rendered


def feed_all(splitter: BlockSplitter, text: str, size: int) -> list[str]:
    blocks: list[str] = []
    for start in range(0, len(text), size):
        blocks.extend(splitter.feed(text[start : start + size]))
    return blocks


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_blocks_end_at_blank_lines_whatever_the_chunking(chunk_size: int) -> None:
    text = "# Title\n\nFirst paragraph\nstill first.\n\n- a\n- b\n\nTail being writ"
    splitter = BlockSplitter()
    blocks = feed_all(splitter, text, chunk_size)
    assert blocks == ["# Title", "First paragraph\nstill first.", "- a\n- b"]
    assert splitter.open_block == "Tail being writ"


def test_blank_lines_inside_a_code_fence_do_not_end_the_block() -> None:
    text = "```python\ndef f():\n\n    return 1\n```\n\nAfter."
    splitter = BlockSplitter()
    blocks = feed_all(splitter, text, 4)
    assert blocks == ["```python\ndef f():\n\n    return 1\n```"]
    assert splitter.open_block == "After."


def test_a_longer_fence_is_closed_only_by_a_fence_as_long() -> None:
    text = "````\n```\n\ninner\n````\n\nx"
    blocks = feed_all(BlockSplitter(), text, 2)
    assert blocks == ["````\n```\n\ninner\n````"]


def test_joined_blocks_and_open_block_give_back_the_text() -> None:
    text = "a\n\nb\nc\n\n\n\nd\n\ne"
    splitter = BlockSplitter()
    blocks = feed_all(splitter, text, 2)
    assert "\n\n".join([*blocks, splitter.open_block]) == "a\n\nb\nc\n\nd\n\ne"
