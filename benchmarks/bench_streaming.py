"""What ``%%qwen`` adds to streaming one long answer, against a raw dashscope loop.

One real kernel; the offline gateway (in a process of its own) sends a 2,000-frame answer
with no delays. Baseline: a cell that loops over ``dashscope.Client().chat.completions
.create(..., stream=True)`` and only joins the text. Candidate: the same request through
``%%qwen`` (display ``auto`` = the widget view; also ``markdown`` and ``text``), and the raw
loop once more as a candidate (``raw-again``: what the machine's noise alone gives). Each cell
times itself inside the kernel (``perf_counter`` and ``process_time`` around the call), so
the figures exclude the front end's round trip; the round trip is recorded too. Each
candidate run is paired with a baseline run beside it; the target is judged on the median of
the pairs' ratios. Every pair is run again with a short answer (200 frames): the two lengths
split what ``%%qwen`` adds into a cost per cell and a cost per frame.

    python benchmarks/bench_streaming.py [--rounds 120] [--modes auto,markdown,text,raw-again]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_KEY,
    bench_report,
    check_ok,
    environment,
    gateway_process,
    running_kernel,
    median,
    print_rows,
    write_result,
)
from qwen_magic.gateway import Reply

NAME = "streaming"
FRAMES = 2000
SHORT_FRAMES = 200  # the second length: what a cell adds whatever its answer's length
# The widget view's whole-cell ratio at 2,000 frames: no worse than before this round's
# changes (1.07x); the goal, 1.03x.
TARGET_RATIO = 1.07
GOAL_RATIO = 1.03
MODES = ("auto", "markdown", "text")
SETTLE_SECONDS = 0.05
# Two runs side by side differ by up to +-40% on this shared machine (the A/A pairs): 120
# pairs put a median within ~2% where 40 left it within ~4%.
ROUNDS = 120
# A candidate that is the raw loop itself: its ratio is the machine's noise (A/A).
RAW_AGAIN = "raw-again"
DEFAULT_MODES = (*MODES, RAW_AGAIN)
PROMPT = "Benchmark question: explain streaming."

_WORDS = (
    "the model streams tokens as they are generated and each frame carries a short piece "
    "of text so the answer grows word by word until the paragraph ends"
).split()


def answer_chunks(frames: int = FRAMES) -> list[str]:
    """Short token-like pieces; a blank line every 60 frames makes Markdown paragraphs."""
    chunks = []
    for index in range(frames):
        word = _WORDS[index % len(_WORDS)]
        chunks.append(f"{word}.\n\n" if index % 60 == 59 else f"{word} ")
    return chunks


SETUP = f"""
%load_ext qwen_magic
%config QwenMagic.timeout = None
import os, time, json, warnings
import dashscope
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _bench_client = dashscope.Client(
        api_key=os.environ["DASHSCOPE_API_KEY"], base_url=os.environ["DASHSCOPE_BASE_URL"]
    )
_bench_times = []
_bench_prompt = {PROMPT!r}
"""

RAW_CELL = """
_w0 = time.perf_counter(); _c0 = time.process_time()
_stream = _bench_client.chat.completions.create(
    model="qwen-plus", messages=[{{"role": "user", "content": _bench_prompt}}], stream=True
)
try:
    _bench_text = "".join(chunk.choices[0].delta.content or "" for chunk in _stream if chunk.choices)
finally:
    _stream.close()
_w1 = time.perf_counter(); _c1 = time.process_time()
_bench_times.append([{label!r}, _w1 - _w0, _c1 - _c0, len(_bench_text)])
"""

# One %%qwen run, timed, recorded under its label (the lines before it set it up, untimed).
TIMED_QWEN_CELL = """
_w0 = time.perf_counter(); _c0 = time.process_time()
get_ipython().run_cell_magic("qwen", "-o _bench_answer", _bench_prompt)
_w1 = time.perf_counter(); _c1 = time.process_time()
_bench_times.append([{label!r}, _w1 - _w0, _c1 - _c0, len(_bench_answer.text)])
"""
QWEN_CELL = '\nget_ipython().run_line_magic("config", "QwenMagic.display = {mode!r}")' + TIMED_QWEN_CELL
SHORT = ":short"  # the label's suffix of a run with the short answer

FETCH = "print('BENCH ' + json.dumps(_bench_times)); _bench_times.clear()"


def fetched_times(fetched: Any, expected_chars: int, short_chars: int | None = None) -> list[list[Any]]:
    """The cells' timings that FETCH printed, each answer checked complete (``short_chars``:
    the length of the short answers, where there were any)."""
    times = bench_report(fetched.stdout)
    lengths = {(row[0].endswith(SHORT), row[3]) for row in times}
    if lengths != {(False, expected_chars)} | ({(True, short_chars)} if short_chars is not None else set()):
        raise RuntimeError(f"an answer came back incomplete: lengths {lengths}, "
                           f"expected {expected_chars} and {short_chars}")
    return times


def _cell(variant: str, short: bool = False) -> str:
    label = variant + (SHORT if short else "")
    if variant in ("raw", RAW_AGAIN):
        return RAW_CELL.format(label=label)
    return QWEN_CELL.format(mode=variant, label=label)


def run(rounds: int = ROUNDS, modes: tuple[str, ...] = DEFAULT_MODES) -> dict[str, Any]:
    chunks, short_chunks = answer_chunks(), answer_chunks(SHORT_FRAMES)
    expected_chars, short_chars = len("".join(chunks)), len("".join(short_chunks))
    reply = Reply(chunks=chunks, usage={"input_tokens": 12, "output_tokens": FRAMES})
    short_reply = Reply(chunks=short_chunks, usage={"input_tokens": 12, "output_tokens": SHORT_FRAMES})
    round_trip: dict[str, list[float]] = {v: [] for v in ("raw", *modes)}
    iopub: dict[str, list[int]] = {v: [] for v in ("raw", *modes)}
    with gateway_process() as gateway, tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        with running_kernel(Path(tmp), DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url) as kernel:

            def once(variant: str, short: bool = False) -> None:
                gateway.script(short_reply if short else reply)
                # Every run starts on a quiet machine: without a pause, a run that comes right
                # after a short one competes with the tail of its work (the gateway's, the
                # kernel's IOPub thread's), and which runs do depends on the order.
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                # One cell id for every %%qwen run: re-running one cell replaces its turn, so the
                # chat never grows and every request carries the question alone.
                cell_id = "bench-qwen" if variant in MODES else "bench-raw"
                # quiet: this process reads nothing while the cell runs, so it takes no CPU
                # from the kernel on a small machine.
                execution = kernel.execute(_cell(variant, short), cell_id=cell_id, timeout=120, quiet=True)
                if short:
                    check_ok(execution, f"the {variant} cell, short answer")
                    return
                round_trip[variant].append(time.perf_counter() - started)
                check_ok(execution, f"the {variant} cell")
                iopub[variant].append(len([m for m in execution.messages if m.msg_type != "execute_input"]))

            check_ok(kernel.execute(SETUP, timeout=60), "setup")
            # Warm-up: imports (dashscope, ipywidgets, markdown-it), first connections, caches.
            for _ in range(2):
                for variant in ("raw", *modes):
                    once(variant)
                    once(variant, short=True)
            check_ok(kernel.execute("_bench_times.clear()"), "reset")
            for variant in round_trip:
                round_trip[variant].clear()
                iopub[variant].clear()

            # Each candidate run is paired with a baseline run next to it: raw, auto, raw,
            # markdown, raw, text, ... with the order inside each pair flipped every round;
            # each pair is followed by the same pair with the short answer.
            for index in range(rounds):
                for mode in modes:
                    pair = ("raw", mode) if index % 2 == 0 else (mode, "raw")
                    for short in (False, True):
                        for variant in pair:
                            once(variant, short)
            fetched = check_ok(kernel.execute(FETCH), "fetch")
        recorded = gateway.requests()

    every_time = fetched_times(fetched, expected_chars, short_chars)
    if any(len(r["body"]["input"]["messages"]) != 1 for r in recorded):
        raise RuntimeError("a request carried earlier turns: the runs were not alike")

    # Pair each candidate run with the baseline run next to it (same order as executed).
    pairs = []
    for start in range(0, len(every_time), 2):
        a, b = every_time[start], every_time[start + 1]
        pairs.append((a, b) if a[0] in ("raw", "raw" + SHORT) else (b, a))
    times = [row for row in every_time if not row[0].endswith(SHORT)]
    order = [row[0] for row in times]
    wall = {v: [row[1] for row in times if row[0] == v] for v in ("raw", *modes)}
    cpu = {v: [row[2] for row in times if row[0] == v] for v in ("raw", *modes)}
    paired_wall: dict[str, list[float]] = {m: [] for m in modes}
    paired_cpu: dict[str, list[float]] = {m: [] for m in modes}
    # Per round and mode: (raw, mode) at 2,000 frames, then at 200.
    long_pairs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    short_pairs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for raw_row, mode_row in pairs:
        if mode_row[0].endswith(SHORT):
            short_pairs[mode_row[0][: -len(SHORT)]].append((raw_row[1], mode_row[1]))
            continue
        paired_wall[mode_row[0]].append(mode_row[1] / raw_row[1])
        paired_cpu[mode_row[0]].append(mode_row[2] / raw_row[2])
        long_pairs[mode_row[0]].append((raw_row[1], mode_row[1]))

    result: dict[str, Any] = {
        "benchmark": NAME,
        "frames": FRAMES,
        "answer_chars": expected_chars,
        "rounds": rounds,
        "runs": {v: len(wall[v]) for v in wall},
        "order": order,
        # Every run, in the order run: for a look at the spread behind the medians.
        "wall_ms_by_run": [[row[0], round(row[1] * 1000, 2)] for row in times],
        "baseline": {
            "wall_ms_median": median(wall["raw"]) * 1000,
            "cpu_ms_median": median(cpu["raw"]) * 1000,
            "round_trip_ms_median": median(round_trip["raw"]) * 1000,
            "iopub_messages_median": median(iopub["raw"]),
        },
        "modes": {},
        "target_ratio": TARGET_RATIO,
        "goal_ratio": GOAL_RATIO,
        "short_frames": SHORT_FRAMES,
        "short_answer_chars": short_chars,
    }
    for mode in modes:
        ratio = median(wall[mode]) / median(wall["raw"])
        # The time a frame costs is the rise from the short answer to the long one: per round,
        # %%qwen's rise over the raw loop's. What is left at the short length is per cell.
        per_frame = [(m_long - m_short) / (r_long - r_short)
                     for (r_long, m_long), (r_short, m_short) in zip(long_pairs[mode], short_pairs[mode])]
        result["modes"][mode] = {
            "per_frame_ratio_paired_median": median(per_frame),
            "added_ms_per_cell_short_answer": median([m - r for r, m in short_pairs[mode]]) * 1000,
            "added_ms_per_cell_long_answer": median([m - r for r, m in long_pairs[mode]]) * 1000,
            "wall_ms_median": median(wall[mode]) * 1000,
            "cpu_ms_median": median(cpu[mode]) * 1000,
            "round_trip_ms_median": median(round_trip[mode]) * 1000,
            "iopub_messages_median": median(iopub[mode]),
            "wall_ratio": ratio,
            "wall_ratio_paired_median": median(paired_wall[mode]),
            "cpu_ratio": median(cpu[mode]) / median(cpu["raw"]),
            "cpu_ratio_paired_median": median(paired_cpu[mode]),
            "round_trip_ratio": median(round_trip[mode]) / median(round_trip["raw"]),
            # Judged on the paired ratios: each compares two runs a moment apart, so the machine's
            # slow and fast phases cancel out. The medians of the two whole samples do not: the
            # raw loop against itself has come out anywhere from 0.99x to 1.09x on them, and
            # 0.97x-1.00x paired, in the same runs.
            "target_met": median(paired_wall[mode]) <= TARGET_RATIO,
            "goal_met": median(paired_wall[mode]) <= GOAL_RATIO,
        }
    result["target_met"] = result["modes"][modes[0]]["target_met"]
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    base = result["baseline"]
    rows = [
        ("answer", f"{result['frames']} frames, {result['answer_chars']} chars, no delays"),
        ("runs", ", ".join(f"{v} {n}" for v, n in result["runs"].items())),
        ("raw loop: wall / CPU / round trip, IOPub msgs",
         f"{base['wall_ms_median']:.0f} ms / {base['cpu_ms_median']:.0f} ms / {base['round_trip_ms_median']:.0f} ms, "
         f"{base['iopub_messages_median']:.0f}"),
    ]
    for mode, m in result["modes"].items():
        label = {"auto": "%%qwen widget view (auto)", RAW_AGAIN: "raw loop again (A/A)"}.get(mode, f"%%qwen {mode}")
        rows.append((
            f"{label}: wall / CPU / round trip, IOPub msgs",
            f"{m['wall_ms_median']:.0f} ms / {m['cpu_ms_median']:.0f} ms / {m['round_trip_ms_median']:.0f} ms, "
            f"{m['iopub_messages_median']:.0f}",
        ))
        rows.append((
            "  ratio wall (paired) / CPU (paired)",
            f"{m['wall_ratio']:.2f}x ({m['wall_ratio_paired_median']:.2f}x) / "
            f"{m['cpu_ratio']:.2f}x ({m['cpu_ratio_paired_median']:.2f}x)"
            + ("" if mode != "auto" else f"  target <= {result['target_ratio']:.2f}x (paired): "
               + ("met" if m["target_met"] else "NOT met")
               + f"; goal <= {result['goal_ratio']:.2f}x: " + ("met" if m["goal_met"] else "not met")),
        ))
        rows.append((
            f"  per frame (ratio of the rise {result['short_frames']} -> {result['frames']} frames) / added per cell",
            f"{m['per_frame_ratio_paired_median']:.3f}x / {m['added_ms_per_cell_short_answer']:+.1f} ms "
            f"at {result['short_frames']} frames, {m['added_ms_per_cell_long_answer']:+.1f} ms at {result['frames']}",
        ))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, of {', '.join(MODES)}, {RAW_AGAIN}; the first is the target's")
    args = parser.parse_args(argv)
    result = {"environment": environment(), **run(args.rounds, tuple(args.modes.split(",")))}
    print_rows("Streaming overhead (one kernel, 2,000 frames)", summary(result))
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
