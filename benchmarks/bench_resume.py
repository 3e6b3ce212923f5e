"""Resuming a chat of 1,000 turns from the history file, and appending a turn to it.

    python benchmarks/bench_resume.py [--runs N]

Measured against the cost of the request itself: sending that chat's history with a new
question through the dashscope SDK to the offline gateway (in a process of its own) and
reading the answer. Each figure is a median over interleaved runs.
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

from benchmarks._common import environment, gateway_process, median, print_rows, write_result
from qwen_magic.client import Usage
from qwen_magic.conversation import Turn, messages_for
from qwen_magic.gateway import Reply
from qwen_magic.result import QwenResult
from qwen_magic.store import Store

NAME = "resume"
TURNS = 1000


def _turn(number: int) -> Turn:
    result = QwenResult(text=f"Answer {number}: " + "the river kept its own counsel. " * 8, model="qwen-plus",
                        usage=Usage(1200, 60), cost=0.0011, chat="default", turn=number)
    return Turn(prompt=f"Question {number}: what did the river say?", result=result, cell_id=f"cell-{number}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    import dashscope

    resume_ms, append_ms, request_ms = [], [], []
    with tempfile.TemporaryDirectory() as folder, gateway_process() as gateway:
        store = Store(Path(folder) / "history.sqlite3")
        for number in range(1, TURNS + 1):
            turn = _turn(number)
            store.save_turn("bench.ipynb", "default", number, turn.cell_id, turn.to_record())
        client = dashscope.Client(api_key="sk-bench", base_url=gateway.base_url, max_retries=0)
        turns = [Turn.from_record(record) for record in store.turns("bench.ipynb", "default")]
        for run in range(args.runs):
            started = time.perf_counter()
            turns = [Turn.from_record(record) for record in store.turns("bench.ipynb", "default")]
            resume_ms.append((time.perf_counter() - started) * 1000)

            new = _turn(TURNS + 1 + run)
            started = time.perf_counter()
            with store.transaction():  # as a cell writes them: one commit
                store.add_call("bench.ipynb", "default", "qwen-plus", 1200, 60, 0.0011, "complete")
                store.save_turn("bench.ipynb", "default", TURNS + 1, new.cell_id, new.to_record())
            append_ms.append((time.perf_counter() - started) * 1000)

            gateway.script(Reply(text="Short answer.", usage={"input_tokens": 120_000, "output_tokens": 3}))
            started = time.perf_counter()
            stream = client.chat.completions.create(
                model="qwen-plus", messages=messages_for(None, turns, "And now?"), stream=True)
            "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            request_ms.append((time.perf_counter() - started) * 1000)
            store.delete_position("bench.ipynb", "default", TURNS + 1)  # the next run resumes 1,000 again
        store.close()
    assert len(turns) == TURNS
    result = {
        "benchmark": NAME,
        "environment": environment(),
        "turns": TURNS,
        "runs": args.runs,
        "resume_ms_median": median(resume_ms),
        "append_ms_median": median(append_ms),
        "request_ms_median": median(request_ms),
        "resume_vs_request": median(resume_ms) / median(request_ms),
        "append_vs_request": median(append_ms) / median(request_ms),
    }
    write_result(NAME, result)
    print_rows(f"Resume a chat of {TURNS:,} turns, append one", [
        ("resume (read + rebuild the turns), median", f"{result['resume_ms_median']:.1f} ms"),
        ("append a turn (call + turn, one commit), median", f"{result['append_ms_median']:.2f} ms"),
        ("the request with that history, median", f"{result['request_ms_median']:.1f} ms"),
        ("resume / request; append / request",
         f"{result['resume_vs_request']:.2f}x; {result['append_vs_request']:.3f}x"),
    ])
    return result


if __name__ == "__main__":
    main()
