"""Variants of ``%%qwen`` side by side in one kernel, each paired with the raw loop.

For trying a change before making it: each variant is a name and a line of setup code that
runs in the kernel, untimed, before each of its cells (set a display mode, swap a method,
change a constant). The cells and the answer are ``bench_streaming.py``'s (2,000 frames, no
delays); each variant's run is paired with a raw loop run beside it, the order flipped every
round, and the figure is the median of the pairs' ratios. Variants in one run share the
machine's slow and fast phases, which separate runs do not.

    python benchmarks/bench_variants.py --rounds 100 \\
        auto='%config QwenMagic.display = "auto"' text='%config QwenMagic.display = "text"'
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
    median,
    print_rows,
    running_kernel,
    write_result,
)
from benchmarks.bench_streaming import (
    FETCH,
    FRAMES,
    RAW_CELL,
    SETTLE_SECONDS,
    SETUP,
    TIMED_QWEN_CELL,
    answer_chunks,
)
from qwen_magic.gateway import Reply

NAME = "variants"

VARIANT_CELL = "\n{setup}" + TIMED_QWEN_CELL


def run(variants: dict[str, str], rounds: int) -> dict[str, Any]:
    reply = Reply(chunks=answer_chunks(), usage={"input_tokens": 12, "output_tokens": FRAMES})
    cells = {"raw": RAW_CELL.format(label="raw")}
    cells.update({name: VARIANT_CELL.format(setup=setup, label=name) for name, setup in variants.items()})
    with gateway_process() as gateway, tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        with running_kernel(Path(tmp), DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url) as kernel:

            def once(name: str) -> None:
                gateway.script(reply)
                time.sleep(SETTLE_SECONDS)  # as bench_streaming.py: every run starts on a quiet machine
                cell_id = "bench-raw" if name == "raw" else "bench-qwen"
                check_ok(kernel.execute(cells[name], cell_id=cell_id, timeout=120, quiet=True), f"the {name} cell")

            check_ok(kernel.execute(SETUP, timeout=60), "setup")
            for _ in range(2):
                for name in cells:
                    once(name)
            check_ok(kernel.execute("_bench_times.clear()"), "reset")
            for index in range(rounds):
                for name in variants:
                    for each in (("raw", name) if index % 2 == 0 else (name, "raw")):
                        once(each)
            times = bench_report(check_ok(kernel.execute(FETCH), "fetch").stdout)
    paired: dict[str, list[float]] = {name: [] for name in variants}
    paired_cpu: dict[str, list[float]] = {name: [] for name in variants}
    for first, second in zip(times[0::2], times[1::2]):
        raw, variant = (first, second) if first[0] == "raw" else (second, first)
        paired[variant[0]].append(variant[1] / raw[1])
        paired_cpu[variant[0]].append(variant[2] / raw[2])
    return {
        "benchmark": NAME,
        "rounds": rounds,
        "variants": variants,
        "raw_wall_ms_median": median([row[1] for row in times if row[0] == "raw"]) * 1000,
        "results": {
            name: {
                "wall_ms_median": median([row[1] for row in times if row[0] == name]) * 1000,
                "wall_ratio_paired_median": median(paired[name]),
                "cpu_ratio_paired_median": median(paired_cpu[name]),
            }
            for name in variants
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("variants", nargs="+", metavar="NAME=SETUP",
                        help="a name and the setup code of its cells")
    args = parser.parse_args(argv)
    variants = {}
    for given in args.variants:
        name, separator, setup = given.partition("=")
        if not separator or not name or name == "raw":
            parser.error(f"{given!r}: give NAME=SETUP, NAME not 'raw'")
        variants[name] = setup
    result = {"environment": environment(), **run(variants, args.rounds)}
    rows = [("raw loop, wall", f"{result['raw_wall_ms_median']:.0f} ms")]
    rows += [(f"{name}: wall / paired wall ratio / paired CPU ratio",
              f"{r['wall_ms_median']:.0f} ms / {r['wall_ratio_paired_median']:.3f}x / {r['cpu_ratio_paired_median']:.3f}x")
             for name, r in result["results"].items()]
    print_rows(f"Variants side by side (one kernel, {FRAMES:,} frames, {args.rounds} rounds)", rows)
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
