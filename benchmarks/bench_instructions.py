"""What ``%%qwen`` adds to one answer, counted in instructions: a figure the machine's noise cannot move.

The streaming benchmark's wall times swing by tens of percent from one run to the next on a
shared machine. Here the same cells run in a kernel under valgrind's callgrind, which counts
the instructions the kernel process executes (all its threads); the counters are dumped after
each cell, so each cell's count is its own. The gateway (a process of its own, not counted)
sends the benchmark's 2,000-frame answer; the raw loop and ``%%qwen`` read it through the real
SDK over HTTP, as in ``bench_streaming.py``. Both cells start with the same ``%config`` line,
so that their difference is the magic's alone. One cell's count strays by well under 1% from
run to run, so a few rounds settle it.

The timer thread's paced updates are left out (its period is set to an hour): under valgrind
the clock runs ~50x too fast for the code, so they would come ~50x too often. Natively an
answer of this benchmark gets 1 or 2 of them, ~0.5 ms in all.

    python benchmarks/bench_instructions.py [--rounds 5] [--modes auto,markdown,text]

Needs valgrind (``apt-get install valgrind``); without it, says so and counts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_KEY,
    check_ok,
    environment,
    gateway_process,
    median,
    print_rows,
    write_result,
)
from benchmarks.bench_streaming import FETCH, FRAMES, QWEN_CELL, RAW_CELL, SETUP, answer_chunks, fetched_times
from qwen_magic.gateway import Reply

NAME = "instructions"
MODES = ("auto", "markdown", "text")
KERNEL_NAME = "qwen-magic-callgrind"
_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.MULTILINE)

# The raw loop runs the same %config line as the %%qwen cells, so the difference is the magic's.
RAW_WITH_CONFIG = 'get_ipython().run_line_magic("config", "QwenMagic.display = \'auto\'")\n' + RAW_CELL
# No paced updates from the timer thread (see the docstring).
NO_PACED_UPDATES = "import qwen_magic.engine as _engine\n_engine._Ticker.PERIOD = 3600.0\n"


def _spread(counts: list[int]) -> float:
    """Max minus min over the median: how far one cell's count strays."""
    return (max(counts) - min(counts)) / median(counts)


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class _Counter:
    """Dumps the kernel's instruction counters and reads each dump's total."""

    def __init__(self, out_dir: Path, pid: int) -> None:
        self._out_dir = out_dir
        self._pid = pid
        self._dumps = 0

    def dump(self) -> int:
        """Instructions executed since the previous dump."""
        subprocess.run(["callgrind_control", "--dump", str(self._pid)], check=True, capture_output=True, timeout=120)
        self._dumps += 1
        path = self._out_dir / f"callgrind.{self._pid}.out.{self._dumps}"
        deadline = time.monotonic() + 120
        while True:
            found = _TOTALS.search(path.read_text()) if path.exists() else None
            if found:
                return int(found.group(1))
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no dump {path.name}")
            time.sleep(0.2)


def _kernel_spec(share: Path, out_dir: Path) -> None:
    spec = share / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.%p.out",
        sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
    ]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "callgrind", "language": "python"}))


def run(rounds: int = 5, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    from tests.kernel_harness import KernelSession, kernel_env

    variants = ("raw", *modes)
    counts: dict[str, list[int]] = {variant: [] for variant in variants}
    chunks = answer_chunks()
    reply = Reply(chunks=chunks, usage={"input_tokens": 12, "output_tokens": FRAMES})
    with gateway_process() as gateway, tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        share, out_dir = Path(tmp) / "share", Path(tmp) / "callgrind"
        out_dir.mkdir()
        _kernel_spec(share, out_dir)
        previous = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = str(share)  # where the kernel manager finds the spec
        try:
            env = kernel_env(Path(tmp), DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url)
            kernel = KernelSession(env, Path(tmp), kernel_name=KERNEL_NAME, ready_timeout=600)
        finally:
            if previous is None:
                del os.environ["JUPYTER_PATH"]
            else:
                os.environ["JUPYTER_PATH"] = previous
        try:
            counter = _Counter(out_dir, kernel.manager.provisioner.pid)

            def once(variant: str) -> None:
                gateway.script(reply)
                cell = (RAW_WITH_CONFIG.format(label=variant) if variant == "raw"
                        else QWEN_CELL.format(mode=variant, label=variant))
                cell_id = "bench-raw" if variant == "raw" else "bench-qwen"
                check_ok(kernel.execute(cell, cell_id=cell_id, timeout=900, quiet=True), f"the {variant} cell")

            check_ok(kernel.execute(SETUP + NO_PACED_UPDATES, timeout=900), "setup")
            for _ in range(2):  # warm-up: imports, first connections, caches
                for variant in variants:
                    once(variant)
            counter.dump()
            for index in range(rounds):
                for variant in variants if index % 2 == 0 else variants[::-1]:
                    once(variant)
                    counts[variant].append(counter.dump())
            fetched = check_ok(kernel.execute(FETCH, timeout=900), "fetch")
        finally:
            kernel.shutdown()
    fetched_times(fetched, len("".join(chunks)))

    raw = median(counts["raw"])
    result: dict[str, Any] = {
        "benchmark": NAME,
        "frames": FRAMES,
        "rounds": rounds,
        "counts": counts,
        "raw_cell_instructions_median": raw,
        "raw_cell_spread": _spread(counts["raw"]),
        "modes": {},
    }
    for mode in modes:
        added = median(counts[mode]) - raw
        result["modes"][mode] = {
            "cell_instructions_median": median(counts[mode]),
            "added_instructions": added,
            "added_fraction_of_raw_cell": added / raw,
            "cell_spread": _spread(counts[mode]),
        }
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("raw loop cell", f"{result['raw_cell_instructions_median'] / 1e6:.1f} M instructions "
                               f"(min to max {result['raw_cell_spread']:.1%})")]
    for mode, m in result["modes"].items():
        label = "%%qwen widget view (auto)" if mode == "auto" else f"%%qwen {mode}"
        rows.append((f"{label}: added", f"{m['added_instructions'] / 1e6:+.1f} M = "
                     f"{m['added_fraction_of_raw_cell']:+.1%} of the raw loop cell "
                     f"(min to max {m['cell_spread']:.1%})"))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of auto, markdown, text")
    args = parser.parse_args(argv)
    if not available():
        print("bench_instructions: valgrind is not installed (apt-get install valgrind); nothing counted.")
        return None
    result = {"environment": environment(), **run(args.rounds, tuple(args.modes.split(",")))}
    print_rows("Instructions per answer (one kernel under callgrind, 2,000 frames)", summary(result))
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
