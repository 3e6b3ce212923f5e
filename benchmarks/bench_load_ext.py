"""What ``%load_ext qwen_magic`` costs in a fresh process, against a bare IPython shell.

Fresh ``python -c`` processes, interleaved baseline / candidate. Both import IPython and
create an ``InteractiveShell``; the candidate then runs ``%load_ext qwen_magic``. Each
process reports its own ``perf_counter`` timings; the parent times each whole process.

    python benchmarks/bench_load_ext.py [--runs 21]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import REPO, bench_report, environment, median, print_rows, write_result

NAME = "load_ext"
TARGET_MS = 150.0
HEAVY = ("anywidget", "dashscope", "httpx", "ipywidgets", "markdown_it", "tiktoken")

_PROGRAM = """
import json, sys, time
t0 = time.perf_counter()
import IPython
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
t1 = time.perf_counter()
report = {"shell_s": t1 - t0}
if LOAD:
    before = set(sys.modules)
    shell.run_line_magic("load_ext", "qwen_magic")
    t2 = time.perf_counter()
    report["load_ext_s"] = t2 - t1
    report["registered"] = "qwen" in shell.magics_manager.magics["cell"]
    report["new_modules"] = len(set(sys.modules) - before)
    report["heavy_loaded"] = sorted(
        name for name in sys.modules if name.split(".")[0] in HEAVY
    )
    report["heavy_roots"] = sorted({name.split(".")[0] for name in report["heavy_loaded"]})
print("BENCH " + json.dumps(report))
"""


def _run_one(load: bool, env: dict[str, str]) -> dict[str, Any]:
    code = f"LOAD = {load!r}\nHEAVY = {HEAVY!r}\n" + _PROGRAM
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the {'candidate' if load else 'baseline'} process failed:\n{done.stderr}")
    report = bench_report(done.stdout)
    report["wall_s"] = wall
    return report


def run(runs: int = 21, warmup: int = 2) -> dict[str, Any]:
    import os

    with tempfile.TemporaryDirectory(prefix="qwen-bench-") as tmp:
        # A profile of its own: no user configuration or startup files, the same for both variants.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DASHSCOPE_", "JPY_"))}
        env.update(IPYTHONDIR=str(Path(tmp) / "ipython"), HOME=str(Path(tmp) / "home"))
        # Bytecode caches, as an installed package has them (pip compiles on install): a machine
        # that sets PYTHONDONTWRITEBYTECODE would otherwise time compiling the modules' source.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        Path(env["HOME"]).mkdir()
        for _ in range(warmup):  # creates the profile; warms the file cache
            _run_one(False, env)
            _run_one(True, env)
        baseline: list[dict[str, Any]] = []
        candidate: list[dict[str, Any]] = []
        for index in range(runs):
            # A B A B ..., the order flipped every other pair.
            pair = (False, True) if index % 2 == 0 else (True, False)
            for load in pair:
                (candidate if load else baseline).append(_run_one(load, env))

    load_ms = [r["load_ext_s"] * 1000 for r in candidate]
    wall_base = [r["wall_s"] * 1000 for r in baseline]
    wall_cand = [r["wall_s"] * 1000 for r in candidate]
    paired = [c - b for b, c in zip(wall_base, wall_cand)]
    heavy = sorted({name for r in candidate for name in r["heavy_roots"]})
    result = {
        "benchmark": NAME,
        "runs_each": runs,
        "load_ext_ms_median": median(load_ms),
        "load_ext_ms_min": min(load_ms),
        "load_ext_ms_max": max(load_ms),
        "shell_ms_median_baseline": median([r["shell_s"] * 1000 for r in baseline]),
        "shell_ms_median_candidate": median([r["shell_s"] * 1000 for r in candidate]),
        "wall_ms_median_baseline": median(wall_base),
        "wall_ms_median_candidate": median(wall_cand),
        "wall_ms_difference_of_medians": median(wall_cand) - median(wall_base),
        "wall_ms_median_paired_difference": median(paired),
        "new_modules_median": median([r["new_modules"] for r in candidate]),
        "magic_registered_every_run": all(r["registered"] for r in candidate),
        "heavy_modules_checked": list(HEAVY),
        "heavy_modules_loaded": heavy,
        "target_ms": TARGET_MS,
        "target_met": median(load_ms) < TARGET_MS
        and median(wall_cand) - median(wall_base) < TARGET_MS
        and not heavy,
    }
    return result


def summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("runs (each variant, interleaved)", str(result["runs_each"])),
        ("load_ext call, median", f"{result['load_ext_ms_median']:.1f} ms"),
        ("wall, bare IPython shell, median", f"{result['wall_ms_median_baseline']:.0f} ms"),
        ("wall, + %load_ext, median", f"{result['wall_ms_median_candidate']:.0f} ms"),
        ("wall difference (of medians / paired)",
         f"{result['wall_ms_difference_of_medians']:+.1f} ms / {result['wall_ms_median_paired_difference']:+.1f} ms"),
        ("modules added by load_ext, median", f"{result['new_modules_median']:.0f}"),
        ("heavy modules after load_ext", ", ".join(result["heavy_modules_loaded"]) or "none"),
        ("target < 150 ms added", "met" if result["target_met"] else "NOT met"),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args(argv)
    result = {"environment": environment(), **run(args.runs)}
    print_rows("%load_ext qwen_magic (fresh processes)", summary(result))
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
