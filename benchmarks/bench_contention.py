"""What an IOPub message costs a kernel whose main thread is busy reading a stream.

A message is sent by ipykernel's IOPub thread, which needs the GIL to send it. While the
main thread is busy with the SDK's loop (as it is for an answer streamed at full speed
from the local gateway), every handover slows that loop. This benchmark measures it
without ``%%qwen``: one loop over a 2,000-frame stream that only joins the text, run side
by side with the same loop sending N small IOPub messages spread evenly over the frames
(a message type front ends ignore). Paired runs, one kernel, the gateway in a process of
its own. It explains the gap between the widget view (which must send while the answer
streams) and the ``text`` view (which sends once, at the end) in ``bench_streaming``.

    python benchmarks/bench_contention.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    median,
    print_rows,
    running_kernel,
    write_result,
)
from benchmarks.bench_streaming import FRAMES, SETUP, answer_chunks
from qwen_magic.gateway import Reply

NAME = "contention"
MESSAGE_COUNTS = (0, 4, 8, 16)

CELL = """
import gc, json, time
_kernel = get_ipython().kernel
_parent = _kernel.get_parent()

def _loop(messages):
    every = {frames} // messages if messages else 0
    stream = _bench_client.chat.completions.create(
        model="qwen-plus", messages=[{{"role": "user", "content": _bench_prompt}}], stream=True
    )
    parts = []
    try:
        for index, chunk in enumerate(stream):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if every and index % every == 0:
                _kernel.session.send(_kernel.iopub_socket, "qwen_benchmark_noise", {{"n": index}},
                                     parent=_parent, ident=b"noise")
    finally:
        stream.close()
    return "".join(parts)

_times = {{n: [] for n in {counts}}}
for _round in range({warmup} + {rounds}):
    order = list({counts}) if _round % 2 == 0 else list({counts})[::-1]
    for n in order:
        gc.collect()
        started = time.perf_counter()
        text = _loop(n)
        elapsed = time.perf_counter() - started
        assert len(text) == {chars}, len(text)
        if _round >= {warmup}:
            _times[n].append(elapsed)
        time.sleep(0.05)  # let the IOPub thread send the last messages before the next run
print("BENCH " + json.dumps(_times))
"""


def run(rounds: int = 40) -> dict[str, Any]:
    chunks = answer_chunks()
    reply = Reply(chunks=chunks, usage={"input_tokens": 12, "output_tokens": FRAMES})
    cell = CELL.format(frames=FRAMES, counts=MESSAGE_COUNTS, rounds=rounds, warmup=2, chars=len("".join(chunks)))
    with gateway_process() as gateway, tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        with running_kernel(Path(tmp), DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url) as kernel:
            check_ok(kernel.execute(SETUP, timeout=60), "setup")
            gateway.script(reply, times=None)
            execution = check_ok(kernel.execute(cell, timeout=900, quiet=True), "the loops")
    times = {int(n): values for n, values in bench_report(execution.stdout).items()}
    base = times[0]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "frames": FRAMES,
        "rounds": rounds,
        "loop_ms_median": median(base) * 1000,
        "with_messages": {},
    }
    for count in MESSAGE_COUNTS[1:]:
        added = [(with_messages - alone) * 1000 for with_messages, alone in zip(times[count], base)]
        result["with_messages"][count] = {
            "loop_ms_median": median(times[count]) * 1000,
            "added_ms_paired_median": median(added),
            "ratio": median(times[count]) / median(base),
        }
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("loop alone (2,000 frames), median", f"{result['loop_ms_median']:.0f} ms")]
    for count, m in result["with_messages"].items():
        rows.append((f"with {count} messages sent during the loop",
                     f"{m['loop_ms_median']:.0f} ms, {m['ratio']:.2f}x; added {m['added_ms_paired_median']:+.1f} ms "
                     "(paired median)"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    result = {"environment": environment(), **run(args.rounds)}
    print_rows("IOPub messages sent while the main thread streams", summary(result))
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
