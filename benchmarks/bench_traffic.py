"""What the front end receives while a ~20 KB Markdown answer streams for ~4 s.

One real kernel; the offline gateway (in a process of its own) sends a deterministic
~20,000-character Markdown answer in 16-character frames over ~4 s. Every IOPub message of
the cell is recorded as the front end receives it (tests/kernel_harness.py): type, arrival
time, bytes of its content, bytes of the whole message with its envelope.

Candidate: ``%%qwen`` (widget view: the cell is sent with a cell id, as JupyterLab does).
Baseline ("naive"): one ``ipywidgets.HTML`` displayed once, and on every chunk the whole text
so far re-rendered into it with markdown-it.

What a reader sees is rebuilt from the messages as a page does (the widget's state, then each
message applied): a visible step is a message after which the shown text changed; a raw marker
is a ``*`` or a backtick in the shown text outside code (the finished answer shows none).

    python benchmarks/bench_traffic.py [--runs 3]
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_KEY,
    check_ok,
    environment,
    gateway_process,
    running_kernel,
    median,
    print_rows,
    write_result,
)
from qwen_magic.gateway import Reply

NAME = "traffic"
TARGET_CHARS = 20_000
CHUNK = 16
STREAM_SECONDS = 4.0
TARGET_RATE = 25.0
TARGET_BYTES_MULTIPLE = 2.0
TARGET_STEPS = 10.0
TARGET_WIDGETS = 3
COUNTED = ("display_data", "update_display_data", "comm_open", "comm_msg", "comm_close", "stream")
PROMPT = "Write a long guide to streaming answers in notebooks."

_VOCABULARY = (
    "answer stream token frame notebook kernel widget output render markdown block paragraph "
    "latency budget update message front end display cell model server request response chunk "
    "buffer socket client protocol history context prompt system user reply reader "
    "view layout style footer usage figure count byte second rate interval queue thread timer"
).split()


def make_answer(target: int = TARGET_CHARS, seed: int = 20261127) -> str:
    """A deterministic Markdown answer of about ``target`` characters (ASCII).

    Headings, paragraphs of various lengths, bullet and numbered lists, two fenced code
    blocks with blank lines inside, and a table, as a long model answer has.
    """
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(_VOCABULARY) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.25:
            at = rng.randrange(len(words))
            words[at] = f"**{words[at]}**" if rng.random() < 0.5 else f"`{words[at]}`"
        return " ".join(words).capitalize() + "."

    def paragraph() -> str:
        return " ".join(sentence() for _ in range(rng.choice((1, 2, 3, 4, 6, 8))))

    def bullets(numbered: bool = False) -> str:
        items = []
        for n in range(1, rng.randint(3, 6) + 1):
            mark = f"{n}." if numbered else "-"
            items.append(f"{mark} {sentence()}")
        return "\n".join(items)

    code_one = (
        "```python\n"
        "def stream(client, prompt):\n"
        '    """Yield the answer as it comes."""\n'
        "    response = client.chat.completions.create(\n"
        '        model="qwen-plus",\n'
        '        messages=[{"role": "user", "content": prompt}],\n'
        "        stream=True,\n"
        "    )\n"
        "\n"
        "    for chunk in response:\n"
        "        if chunk.choices:\n"
        "            yield chunk.choices[0].delta.content or \"\"\n"
        "\n"
        "\n"
        "text = \"\".join(stream(client, \"Hello\"))\n"
        "```"
    )
    code_two = (
        "```bash\n"
        "export DASHSCOPE_API_KEY=sk-...\n"
        "\n"
        "jupyter lab\n"
        "\n"
        "# then, in a cell:\n"
        "# %load_ext qwen_magic\n"
        "```"
    )
    rows = ["| setting | default | effect |", "|---|---|---|"]
    for _ in range(6):
        rows.append(f"| {rng.choice(_VOCABULARY)} | {rng.randint(1, 500)} | {sentence()} |")
    table = "\n".join(rows)

    blocks = ["# Streaming answers in notebooks", paragraph()]
    extras = [code_one, table, code_two]
    section = 0
    while sum(len(b) + 2 for b in blocks) < target:
        section += 1
        blocks.append(f"## {section}. {sentence()[:-1]}")
        for _ in range(rng.randint(1, 3)):
            blocks.append(paragraph())
        kind = rng.random()
        if extras and section % 3 == 0:
            blocks.append(extras.pop(0))
        elif kind < 0.45:
            blocks.append(bullets())
        elif kind < 0.65:
            blocks.append(bullets(numbered=True))
        if rng.random() < 0.5:
            blocks.append(paragraph())
    blocks.extend(extras)  # any extra not placed yet
    return "\n\n".join(blocks) + "\n"


SETUP = f"""
%load_ext qwen_magic
%config QwenMagic.timeout = None
%config QwenMagic.display = "auto"
import os, warnings
import dashscope, ipywidgets, markdown_it
from IPython.display import display
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _bench_client = dashscope.Client(
        api_key=os.environ["DASHSCOPE_API_KEY"], base_url=os.environ["DASHSCOPE_BASE_URL"]
    )
_bench_prompt = {PROMPT!r}
"""

NAIVE_CELL = """
_md = markdown_it.MarkdownIt("commonmark", {"html": False})
_view = ipywidgets.HTML()
display(_view)
_text = ""
_stream = _bench_client.chat.completions.create(
    model="qwen-plus", messages=[{"role": "user", "content": _bench_prompt}], stream=True
)
try:
    for _chunk in _stream:
        if _chunk.choices and _chunk.choices[0].delta.content:
            _text += _chunk.choices[0].delta.content
            _view.value = _md.render(_text)
finally:
    _stream.close()
"""

QWEN_CELL = f"%%qwen\n{PROMPT}"

_TAG = re.compile(r"<[^>]*>")


def _visible_text(markup: str) -> str:
    return html.unescape(_TAG.sub("", markup)).strip()


def carries_answer(message: Any) -> bool:
    """Whether a message shows answer text (not a placeholder, a layout or a widget reference)."""
    content = message.content
    if message.msg_type in ("comm_open", "comm_msg"):
        value = content.get("data", {}).get("state", {}).get("value")
        if not isinstance(value, str):
            return False
        text = _visible_text(value)
        return bool(text) and not text.startswith("Waiting for")
    if message.msg_type in ("display_data", "update_display_data"):
        data = content.get("data", {})
        return bool(str(data.get("text/markdown", "")).strip())
    if message.msg_type == "stream":
        return bool(content.get("text", "").strip())
    return False


class _Page:
    """One answer widget as a page shows it: its state, then each custom message applied."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.parts = {key: state.get(key, "") for key in ("reasoning", "body", "open_block", "after")}

    def apply(self, message: dict[str, Any]) -> None:
        parts = self.parts

        def edited(text: str, edit: list[Any]) -> str:
            return text.encode("utf-16-le")[: edit[0] * 2].decode("utf-16-le") + edit[1]

        if "r" in message:
            parts["reasoning"] = edited(parts["reasoning"], message["r"])
        if "b" in message:
            parts["body"], parts["open_block"] = message["b"], ""
        if "f" in message:
            parts["body"] += edited(parts["open_block"], message["f"])
            parts["open_block"] = ""
        if "o" in message:
            parts["open_block"] = edited(parts["open_block"], message["o"])
        if "x" in message:
            parts["after"] = message["x"]

    @property
    def html(self) -> str:
        return "".join(self.parts.values())


def shown_states(messages: list[Any]) -> list[tuple[float, str]]:
    """(arrival, HTML a page shows) after every live message, until the durable output."""
    pages: dict[str, Any] = {}
    states: list[tuple[float, str]] = []
    for message in messages:
        content = message.content
        if message.msg_type == "update_display_data":
            break
        if message.msg_type == "comm_open":
            state = content["data"]["state"]
            if state.get("_model_name") == "AnyModel":
                pages[content["comm_id"]] = _Page(state)
            elif state.get("_model_name") == "HTMLModel":
                pages[content["comm_id"]] = state.get("value", "")
            else:
                continue
        elif message.msg_type == "comm_msg" and content["comm_id"] in pages:
            data = content["data"]
            page = pages[content["comm_id"]]
            if isinstance(page, _Page) and data.get("method") == "custom":
                page.apply(data["content"])
            elif data.get("method") == "update" and "value" in data.get("state", {}):
                pages[content["comm_id"]] = data["state"]["value"]
            else:
                continue
        else:
            continue
        page = pages[content["comm_id"]]
        states.append((message.received, page.html if isinstance(page, _Page) else page))
    return states


_CODE = re.compile(r"<(pre|code)[^>]*>.*?</\1>", re.S)


def raw_markers(html_text: str) -> bool:
    """Whether the shown text holds a Markdown marker outside code (the finished answer has none)."""
    shown = _visible_text(_CODE.sub("", html_text))
    return "*" in shown or "`" in shown


def reader_figures(messages: list[Any]) -> dict[str, Any]:
    """What a reader sees: visible steps (and per second), states showing raw markers."""
    states = shown_states(messages)
    steps, last = [], None
    for at, html_text in states:
        text = _visible_text(html_text)
        if text and not text.startswith("Waiting for") and text != last:
            steps.append((at, html_text))
            last = text
    span = steps[-1][0] - steps[0][0] if len(steps) > 1 else 0.0
    return {
        "visible_steps": len(steps),
        "visible_steps_per_s": (len(steps) - 1) / span if span > 0 else 0.0,
        "chars_per_step": (len(_visible_text(steps[-1][1])) / len(steps)) if steps else 0.0,
        "states_with_raw_markers": sum(raw_markers(h) for _, h in steps),
    }


def _peak_per_second(times: list[float]) -> int:
    """Most messages in any one-second window."""
    peak, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


def _totals(messages: list[Any], answer_bytes: int) -> dict[str, Any]:
    content = sum(m.content_size for m in messages)
    full = sum(m.size for m in messages)
    by_type: dict[str, int] = {}
    for m in messages:
        by_type[m.msg_type] = by_type.get(m.msg_type, 0) + 1
    return {
        "messages": len(messages),
        "by_type": by_type,
        "content_bytes": content,
        "full_bytes": full,
        "content_multiple": content / answer_bytes,
        "full_multiple": full / answer_bytes,
    }


def measure(execution: Any, answer: str, *, phases: bool) -> dict[str, Any]:
    answer_bytes = len(answer.encode("utf-8"))
    messages = [m for m in execution.messages if m.msg_type in COUNTED]
    others = sorted({m.msg_type for m in execution.messages} - set(COUNTED) - {"execute_input"})
    bearing = [m for m in messages if carries_answer(m)]
    first, last = bearing[0].received, bearing[-1].received
    window = [m for m in messages if first <= m.received <= last]
    streaming = last - first
    figures: dict[str, Any] = {
        "streaming_s": streaming,
        "messages_in_streaming": len(window),
        "rate_per_s": len(window) / streaming if streaming > 0 else float("inf"),
        "total_rate_per_s": len(messages) / streaming if streaming > 0 else float("inf"),
        "peak_per_1s": _peak_per_second([m.received for m in window]),
        "peak_per_1s_whole_cell": _peak_per_second([m.received for m in messages]),
        "uncounted_types": others,
        "total": _totals(messages, answer_bytes),
        "widgets_created": len([m for m in messages if m.msg_type == "comm_open"]),
        **reader_figures(messages),
    }
    if phases:
        finals = [i for i, m in enumerate(messages) if m.msg_type == "update_display_data"]
        end = finals[-1]
        figures["live"] = _totals(messages[:end], answer_bytes)
        figures["durable"] = _totals(messages[end : end + 1], answer_bytes)
        figures["teardown"] = _totals(messages[end + 1 :], answer_bytes)
        figures["teardown_types"] = sorted({m.msg_type for m in messages[end + 1 :]})
        figures["live_breakdown"] = live_breakdown(messages[:end])
        figures["durable_breakdown"] = durable_breakdown(messages[end], answer)
        live = messages[:end]
        live_window = [m for m in live if m.received >= first]
        live_span = live[-1].received - first if live_window else 0.0
        figures["live_rate_per_s"] = len(live_window) / live_span if live_span > 0 else float("inf")
    return figures


def _live_kind(message: Any) -> str:
    content = message.content
    if message.msg_type == "comm_open":
        return f"opens of {content['data']['state'].get('_model_name', '?')}"
    if message.msg_type == "comm_msg":
        data = content.get("data", {})
        if data.get("method") == "custom":
            return "custom updates"
        return "value updates" if "value" in data.get("state", {}) else "other state updates"
    return message.msg_type  # the display of the view


def live_breakdown(messages: list[Any]) -> dict[str, Any]:
    """Where the live phase's bytes go; value_bytes is the answer's HTML they carry."""
    kinds: dict[str, dict[str, int]] = {}
    for message in messages:
        kind = kinds.setdefault(_live_kind(message), {"messages": 0, "content_bytes": 0, "value_bytes": 0})
        kind["messages"] += 1
        kind["content_bytes"] += message.content_size
        data = message.content.get("data", {}) if message.msg_type.startswith("comm") else {}
        state = data.get("state", {})
        carried = [state.get(key) for key in ("value", "body", "open_block", "reasoning", "after")]
        if data.get("method") == "custom":
            custom = data.get("content", {})
            carried += [edit[1] for key, edit in custom.items() if key in ("r", "f", "o")] + [custom.get("b")]
        kind["value_bytes"] += sum(len(json.dumps(value)) for value in carried if isinstance(value, str))
    return kinds


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def durable_breakdown(message: Any, answer: str) -> dict[str, int]:
    """Bytes of each part of the durable output (JSON-encoded, as in the message)."""
    parts = {f"data {key}": len(json.dumps(value)) for key, value in message.content.get("data", {}).items()}
    metadata = message.content.get("metadata", {})
    parts["metadata"] = len(json.dumps(metadata))
    # Strings of the metadata that hold the whole answer (the answer sent once more).
    head = answer[:200]
    parts["metadata strings holding the answer"] = sum(
        len(json.dumps(s)) for s in _strings(metadata) if head in s
    )
    return parts


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number across runs, keeping the structure."""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(key for r in runs for key in r))
    for key in keys:
        values = [r[key] for r in runs if key in r]
        if isinstance(values[0], dict):
            out[key] = _medians(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            out[key] = median(values + [0] * (len(runs) - len(values)))  # absent counts as 0
        else:
            out[key] = values[0]
    return out


def run(runs: int = 3) -> dict[str, Any]:
    answer = make_answer()
    answer_bytes = len(answer.encode("utf-8"))
    frames = -(-len(answer) // CHUNK)
    frame_delay = STREAM_SECONDS / frames
    reply = Reply(text=answer, chunk_size=CHUNK, frame_delay=frame_delay,
                  usage={"input_tokens": 18, "output_tokens": 4000})
    warm = Reply(text="# Warm\n\nup *text*.\n\n- a\n- b\n", chunk_size=4)
    results: dict[str, list[dict[str, Any]]] = {"naive": [], "qwen": []}
    with gateway_process() as gateway, tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        with running_kernel(Path(tmp), DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url) as kernel:
            check_ok(kernel.execute(SETUP, timeout=60), "setup")

            def once(variant: str, script: Reply) -> Any:
                gateway.script(script)
                code = QWEN_CELL if variant == "qwen" else NAIVE_CELL
                # A fixed cell id: re-running one cell, so the chat does not grow between runs.
                return check_ok(kernel.execute(code, cell_id=f"bench-{variant}", timeout=180), variant)

            for variant in ("naive", "qwen"):  # warm-up: imports, connections, caches
                once(variant, warm)
            for index in range(runs):
                pair = ("naive", "qwen") if index % 2 == 0 else ("qwen", "naive")
                for variant in pair:
                    execution = once(variant, reply)
                    figures = measure(execution, answer, phases=variant == "qwen")
                    if variant == "qwen":
                        final = execution.of_type("update_display_data")[-1].content["data"]
                        if answer.strip() not in final.get("text/markdown", ""):
                            raise RuntimeError("the durable output does not hold the whole answer")
                    results[variant].append(figures)

    qwen = _medians(results["qwen"])
    naive = _medians(results["naive"])
    return {
        "benchmark": NAME,
        "runs_each": runs,
        "answer_chars": len(answer),
        "answer_bytes": answer_bytes,
        "frames": frames,
        "frame_delay_s": frame_delay,
        "qwen": qwen,
        "naive": naive,
        "per_run": results,
        "target_rate_per_s": TARGET_RATE,
        "target_bytes_multiple": TARGET_BYTES_MULTIPLE,
        "rate_target_met": qwen["rate_per_s"] <= TARGET_RATE,
        "steps_target_met": qwen["visible_steps_per_s"] >= TARGET_STEPS,
        "widgets_target_met": qwen["widgets_created"] <= TARGET_WIDGETS,
        "markers_target_met": max(r["states_with_raw_markers"] for r in results["qwen"]) == 0,
        # Judged on the streaming (live) phase, as the message rate is: the durable output
        # carries the answer as Markdown and as HTML by design (2.2x on its own), and it is
        # reported beside it, with the whole cell.
        "bytes_target_met": qwen["live"]["content_multiple"] <= TARGET_BYTES_MULTIPLE,
        "whole_cell_within_bytes_target": qwen["total"]["content_multiple"] <= TARGET_BYTES_MULTIPLE,
    }


def _row(figures: dict[str, Any]) -> str:
    return (
        f"{figures['messages']:>5.0f} msgs  {figures['content_bytes'] / 1000:>9.1f} KB content "
        f"({figures['content_multiple']:.2f}x)  {figures['full_bytes'] / 1000:>9.1f} KB full "
        f"({figures['full_multiple']:.2f}x)"
    )


def summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    q, n = result["qwen"], result["naive"]
    return [
        ("answer", f"{result['answer_chars']} chars, {result['answer_bytes']} bytes, "
                   f"{result['frames']} frames of {CHUNK} chars, {result['frame_delay_s'] * 1000:.1f} ms apart"),
        ("runs (each, interleaved)", str(result["runs_each"])),
        ("%%qwen streaming time", f"{q['streaming_s']:.2f} s"),
        ("%%qwen visible steps per second (steps; characters per step)",
         f"{q['visible_steps_per_s']:.1f} ({q['visible_steps']:.0f}; {q['chars_per_step']:.0f})  target >= {TARGET_STEPS:.0f}: "
         + ("met" if result["steps_target_met"] else "NOT met")),
        ("%%qwen widgets created per answer", f"{q['widgets_created']:.0f}  target <= {TARGET_WIDGETS}: "
         + ("met" if result["widgets_target_met"] else "NOT met")),
        ("%%qwen states showing raw markers (worst run)",
         f"{max(r['states_with_raw_markers'] for r in result['per_run']['qwen'])}  target 0: "
         + ("met" if result["markers_target_met"] else "NOT met")),
        ("%%qwen msgs/s while streaming (peak 1 s; with teardown)",
         f"{q['rate_per_s']:.1f} ({q['peak_per_1s']:.0f}; {q['peak_per_1s_whole_cell']:.0f})  target <= {TARGET_RATE:.0f}: "
         + ("met" if result["rate_target_met"] else "NOT met")),
        ("%%qwen live", _row(q["live"]) + f"  target content <= {TARGET_BYTES_MULTIPLE:.0f}x: "
         + ("met" if result["bytes_target_met"] else "NOT met")),
        *[(f"  live: {kind}", f"{k['messages']:>5.0f} msgs  {k['content_bytes'] / 1000:>9.1f} KB content, "
                             f"{k['value_bytes'] / 1000:.1f} KB of it HTML values")
          for kind, k in q["live_breakdown"].items()],
        ("%%qwen durable output", _row(q["durable"])),
        *[(f"  durable: {part}", f"{size / 1000:.1f} KB") for part, size in q["durable_breakdown"].items()],
        ("%%qwen teardown", _row(q["teardown"])),
        ("%%qwen whole cell", _row(q["total"]) + "  (durable output included)"),
        ("naive streaming time", f"{n['streaming_s']:.2f} s"),
        ("naive msgs/s while streaming (peak 1 s)", f"{n['rate_per_s']:.1f} ({n['peak_per_1s']:.0f})"),
        ("naive visible steps per second; states showing raw markers",
         f"{n['visible_steps_per_s']:.1f}; {n['states_with_raw_markers']:.0f}"),
        ("naive whole cell", _row(n["total"])),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result = {"environment": environment(), **run(args.runs)}
    print_rows("Front-end traffic (~20 KB answer over ~4 s)", summary(result))
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
