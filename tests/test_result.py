"""The footer and the result object that -o keeps."""

from __future__ import annotations

from qwen_magic.client import Usage
from qwen_magic.result import FAILED, INTERRUPTED, QwenResult


def make(**overrides: object) -> QwenResult:
    fields = dict(
        text="Hello **there**",
        model="qwen-plus",
        usage=Usage(input_tokens=1234, output_tokens=200),
        request_id="req-1",
        elapsed=2.5,
        first_text_after=0.5,
    )
    fields.update(overrides)
    return QwenResult(**fields)  # type: ignore[arg-type]


def test_footer_has_model_tokens_cost_chat_session_time_and_speed() -> None:
    footer = make(cost=0.00042, turn=3, session_cost=0.0123).footer()
    assert footer == (
        "qwen-plus · 1,234 in / 200 out tokens · ¥0.00042 · chat default, turn 3 · "
        "session ¥0.0123 · 2.5 s · 100 tok/s"
    )


def test_footer_says_when_the_cost_is_unknown() -> None:
    assert "· cost unknown ·" in make(cost=None).footer()


def test_footer_marks_interrupted_failed_and_cut_answers() -> None:
    assert make(status=INTERRUPTED).footer().endswith("interrupted: partial answer")
    assert make(status=FAILED, error="StreamCut").footer().endswith("failed: StreamCut")
    assert make(finish_reason="length").footer().endswith("cut at --max-tokens")


def test_thinking_tokens_are_named() -> None:
    result = make(usage=Usage(input_tokens=10, output_tokens=90, reasoning_tokens=60))
    assert "90 out tokens (60 thinking)" in result.footer()


def test_no_speed_without_streaming_time() -> None:
    assert "tok/s" not in make(first_text_after=None).footer()


def test_reprs_show_the_text_and_the_footer() -> None:
    result = make()
    assert str(result) == "Hello **there**"
    assert result._repr_markdown_().startswith("Hello **there**\n\n*qwen-plus")
    result.notes.append("a note")
    assert result._repr_markdown_().endswith("*\n\n*a note*")
    from IPython.lib.pretty import pretty

    assert pretty(result) == "Hello **there**\n[" + result.footer() + "]\n[a note]"


def test_metadata_is_plain_json() -> None:
    import json

    data = json.loads(json.dumps(make().metadata()))
    assert data["usage"] == {"input_tokens": 1234, "output_tokens": 200, "reasoning_tokens": 0, "cached_tokens": 0,
                             "cache_creation_tokens": 0, "searches": 0}
    assert data["request_id"] == "req-1"


def test_metadata_keeps_every_field_but_the_transient_ones_and_copies_what_can_change() -> None:
    from dataclasses import fields

    sources = [{"title": "Hangzhou", "url": "https://example.com"}]
    result = make(search_results=sources, notes=["a note"], value={"parsed": True}, session_cost=0.5)
    data = result.metadata()
    # The tool calls are kept as the turn's exchange (the messages sent), not twice.
    assert set(data) == {f.name for f in fields(QwenResult)} - {"session_cost", "notes", "value", "tool_calls"}
    assert data["search_results"] == sources and data["search_results"] is not sources
    data["search_results"][0]["title"] = "changed"
    assert sources[0]["title"] == "Hangzhou"


def test_usage_reads_native_and_compatible_names() -> None:
    native = Usage.from_sdk(
        {"input_tokens": 5, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3},
         "prompt_tokens_details": {"cached_tokens": 2}}
    )
    assert native == Usage(5, 7, 3, 2)
    compatible = Usage.from_sdk({"prompt_tokens": 4, "completion_tokens": 6})
    assert compatible == Usage(4, 6) and compatible.total_tokens == 10
