"""The pre-flight count before turn 101 of a chat holding ~50,000 tokens.

    python benchmarks/bench_preflight.py [--runs N]

Candidate: what a %%qwen cell does before sending (qwen_magic.preflight.prepare over the
window of the chat), in a session where the earlier turns were counted at their own
pre-flight, so only the newest turn (a new answer) is encoded. Baseline, side by side:
re-encoding the whole rendered history with the same tokenizer. Target: under 5 ms median.
"""

from __future__ import annotations

import argparse
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, median, print_rows, write_result
from qwen_magic.catalog import builtin_catalog
from qwen_magic.client import Usage
from qwen_magic.conversation import Turn, fit_window, messages_for
from qwen_magic.preflight import prepare
from qwen_magic.result import QwenResult
from qwen_magic.tokens import _encoding, count_chat_input

NAME = "preflight"
TARGET_MS = 5.0
SENTENCES = [
    "The Qwen models read the whole history again on every turn.",
    "通义千问在每一轮对话中都会重新读取全部历史。",
    "A budget refuses a call whose worst case would pass it.",
    "每个答案下面都显示输入和输出的 token 数以及费用。",
]


def _text(seed: int, sentences: int) -> str:
    return " ".join(f"{SENTENCES[(seed + i) % len(SENTENCES)]} ({seed}.{i})" for i in range(sentences))


def _turn(number: int) -> Turn:
    result = QwenResult(text=_text(number * 7, 17), model="qwen-plus", usage=Usage(0, 0))
    return Turn(prompt=_text(number, 6), result=result, cell_id=f"cell-{number}")


def _preflight(turns: list[Turn], question: str) -> int:
    """The engine's steps before a request: the window, the messages, the count and cost."""
    model = builtin_catalog().get("qwen-plus")
    window = fit_window(turns, fixed_tokens=count_chat_input(messages_for(None, [], question), extra_tokens=4),
                        input_limit=model.max_input, max_turns=None, max_history_tokens=None, model_name=model.name)
    messages = messages_for(None, window.turns, question)
    return prepare(model.name, model, messages, max_tokens=None, thinking=False).input_tokens


def _reencode(turns: list[Turn], question: str) -> int:
    """Baseline: render the chat template of the whole request and encode it all again."""
    parts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
    for message in messages_for(None, turns, question):
        parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    text = unicodedata.normalize("NFC", "".join(parts))
    return len(_encoding().encode(text, allowed_special="all"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31)
    args = parser.parse_args(argv)

    history = [_turn(n) for n in range(1, 100)]
    question = "What did we decide about budgets?"
    _preflight(history, question)  # turns 1-99 were counted at their own pre-flights
    tokens = _preflight(history + [_turn(100)], question)
    candidate_ms, baseline_ms = [], []
    for run in range(args.runs):
        newest = _turn(1000 + run)  # a new answer each time: encoded once, as in a session
        turns = history + [newest]
        pair = [("candidate", _preflight), ("baseline", _reencode)]
        for label, function in pair if run % 2 == 0 else reversed(pair):
            started = time.perf_counter()
            function(turns, question)
            elapsed = (time.perf_counter() - started) * 1000
            (candidate_ms if label == "candidate" else baseline_ms).append(elapsed)
    result = {
        "benchmark": NAME,
        "environment": environment(),
        "history_turns": 100,
        "request_tokens": tokens,
        "baseline_tokens": _reencode(history + [_turn(100)], question),
        "runs": args.runs,
        "candidate_ms_median": median(candidate_ms),
        "baseline_ms_median": median(baseline_ms),
        "ratio": median(candidate_ms) / median(baseline_ms),
        "target_ms": TARGET_MS,
        "target_met": median(candidate_ms) < TARGET_MS,
    }
    write_result(NAME, result)
    print_rows("Pre-flight before turn 101", [
        ("request (100 turns of history + question)", f"{tokens:,} tokens (re-encoded: {result['baseline_tokens']:,})"),
        ("pre-flight, median", f"{result['candidate_ms_median']:.2f} ms  target < {TARGET_MS:.0f} ms: "
                               f"{'met' if result['target_met'] else 'NOT met'}"),
        ("re-encoding the history, median", f"{result['baseline_ms_median']:.2f} ms"),
        ("ratio", f"{result['ratio']:.3f}x ({1 / result['ratio']:.0f}x faster)"),
    ])
    return result


if __name__ == "__main__":
    main()
