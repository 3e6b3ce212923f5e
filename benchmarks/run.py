"""Run the benchmarks, print a compact table, write benchmarks/results/latest.json.

    python benchmarks/run.py

Exits non-zero only if a benchmark crashed; timings are reported, never asserted.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    bench_contention,
    bench_instructions,
    bench_load_ext,
    bench_map,
    bench_preflight,
    bench_resume,
    bench_streaming,
    bench_traffic,
)
from benchmarks._common import RESULTS, environment

BENCHMARKS: list[tuple[str, Any]] = [
    ("load_ext", bench_load_ext),
    ("streaming", bench_streaming),
    ("instructions", bench_instructions),
    ("contention", bench_contention),
    ("traffic", bench_traffic),
    ("preflight", bench_preflight),
    ("resume", bench_resume),
    ("map", bench_map),
]


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    r = results.get("load_ext")
    if r:
        rows.append(("load_ext", "%load_ext call, median", f"{r['load_ext_ms_median']:.1f} ms",
                     f"< {r['target_ms']:.0f} ms: {_met(r['load_ext_ms_median'] < r['target_ms'])}"))
        rows.append(("load_ext", "wall, bare shell -> + load_ext",
                     f"{r['wall_ms_median_baseline']:.0f} -> {r['wall_ms_median_candidate']:.0f} ms "
                     f"({r['wall_ms_difference_of_medians']:+.0f} ms)",
                     f"< {r['target_ms']:.0f} ms: {_met(r['wall_ms_difference_of_medians'] < r['target_ms'])}"))
        rows.append(("load_ext", "heavy modules after load_ext",
                     ", ".join(r["heavy_modules_loaded"]) or "none", ""))
    r = results.get("streaming")
    if r:
        rows.append(("streaming", "raw loop, in-kernel wall / CPU",
                     f"{r['baseline']['wall_ms_median']:.0f} / {r['baseline']['cpu_ms_median']:.0f} ms", ""))
        for mode, m in r["modes"].items():
            target = f"paired <= {r['target_ratio']:.2f}x: {_met(m['target_met'])}" if mode == "auto" else ""
            if mode == "auto":
                target += f" (CPU: {_met(m['cpu_ratio_paired_median'] <= r['target_ratio'])})"
            what = "raw loop again (A/A)" if mode == bench_streaming.RAW_AGAIN else f"%%qwen {mode}"
            rows.append(("streaming", f"{what}: wall ratio, paired (of medians) / CPU, paired",
                         f"{m['wall_ratio_paired_median']:.2f}x ({m['wall_ratio']:.2f}x) / "
                         f"{m['cpu_ratio_paired_median']:.2f}x",
                         target))
            rows.append(("streaming", f"{what}: per frame / added per cell ({r['short_frames']} frames)",
                         f"{m['per_frame_ratio_paired_median']:.3f}x / {m['added_ms_per_cell_short_answer']:+.1f} ms",
                         ""))
    r = results.get("instructions")
    if r:
        rows.append(("instructions", "raw loop cell under callgrind",
                     f"{r['raw_cell_instructions_median'] / 1e6:.1f} M instructions", ""))
        for mode, m in r["modes"].items():
            rows.append(("instructions", f"%%qwen {mode}: added to the raw loop cell",
                         f"{m['added_instructions'] / 1e6:+.1f} M ({m['added_fraction_of_raw_cell']:+.1%})", ""))
    r = results.get("contention")
    if r:
        added = ", ".join(f"{count}: {m['added_ms_paired_median']:+.1f}" for count, m in r["with_messages"].items())
        rows.append(("contention", "messages sent during the raw loop: ms added",
                     f"{added} (loop {r['loop_ms_median']:.0f} ms)", ""))
    r = results.get("traffic")
    if r:
        q, n = r["qwen"], r["naive"]
        rows.append(("traffic", "%%qwen msgs/s streaming (peak 1 s)",
                     f"{q['rate_per_s']:.1f} ({q['peak_per_1s']:.0f})",
                     f"<= {r['target_rate_per_s']:.0f}/s: {_met(r['rate_target_met'])}"))
        for phase in ("live", "durable", "teardown", "total"):
            p = q[phase]
            target = f"content <= {r['target_bytes_multiple']:.0f}x: {_met(r['bytes_target_met'])}" if phase == "live" else ""
            rows.append(("traffic", f"%%qwen {'whole cell' if phase == 'total' else phase}: msgs, content, full",
                         f"{p['messages']:.0f}, {p['content_multiple']:.2f}x, {p['full_multiple']:.2f}x", target))
        rows.append(("traffic", "naive: msgs/s, msgs, content, full",
                     f"{n['rate_per_s']:.0f}/s, {n['total']['messages']:.0f}, "
                     f"{n['total']['content_multiple']:.0f}x, {n['total']['full_multiple']:.0f}x", ""))
    r = results.get("preflight")
    if r:
        rows.append(("preflight", "count before turn 101 (vs re-encoding)",
                     f"{r['candidate_ms_median']:.2f} ms ({r['baseline_ms_median']:.1f} ms, {r['ratio']:.3f}x)",
                     f"< {r['target_ms']:.0f} ms: {_met(r['target_met'])}"))
    r = results.get("resume")
    if r:
        rows.append(("resume", "resume 1,000 turns / append one / the request",
                     f"{r['resume_ms_median']:.1f} / {r['append_ms_median']:.2f} / {r['request_ms_median']:.1f} ms",
                     ""))
    r = results.get("map")
    if r:
        t, o, s, m, st = r["throughput"], r["overhead"], r["scale"], r["resume"], r["storm"]
        rows.append(("map", f"{t['rows']:,} rows at 200 ms, concurrency 16: rows/s, of ideal",
                     f"{t['rows_per_s']:.1f}, {t['ratio_to_ideal']:.0%}", f">= 90%: {_met(t['ratio_to_ideal'] >= 0.9)}"))
        rows.append(("map", "against single %%qwen calls in a loop", f"{t['speedup_over_sequential']:.1f}x",
                     f">= 12x: {_met(t['speedup_over_sequential'] >= 12)}"))
        rows.append(("map", "kernel CPU per row vs a raw concurrent SDK loop", f"{o['cpu_ratio']:.2f}x",
                     f"<= 1.2x: {_met(o['cpu_ratio'] <= 1.2)}"))
        rows.append(("map", f"{s['rows']:,} rows: memory growth; progress messages/s",
                     f"{s['rss_growth_mb']:.0f} MB; {s['progress_per_s']:.1f}",
                     f"< 200 MB, <= ~10/s: {_met(s['rss_growth_mb'] < 200 and s['progress_per_s'] <= 10.5)}"))
        rows.append(("map", f"resume, {m['done_before']:,} of {m['rows']:,} done: first request after",
                     f"{m['first_request_after_s']:.2f} s", f"< 2 s: {_met(m['first_request_after_s'] < 2)}"))
        rows.append(("map", "429 storm (30%): requests / rows", f"{st['request_ratio']:.2f}x, {st['done']:,} done",
                     f"<= 1.5x, all done: {_met(st['request_ratio'] <= 1.5 and st['done'] == st['rows'])}"))
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main() -> int:
    results: dict[str, Any] = {}
    crashed: list[str] = []
    started = time.perf_counter()
    for name, module in BENCHMARKS:
        step = time.perf_counter()
        try:
            main_of: Callable[[list[str]], dict[str, Any] | None] = module.main
            result = main_of([])
            if result is not None:  # None: the benchmark cannot run here and said why
                results[name] = result
        except Exception:
            crashed.append(name)
            traceback.print_exc()
        print(f"  ({name}: {time.perf_counter() - step:.0f} s)")
    for result in results.values():
        result.pop("environment", None)
    latest = {"environment": environment(), "seconds": time.perf_counter() - started,
              "crashed": crashed, **results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    rows = table(results)
    if rows:
        print_table(rows)
    print(f"\nwrote {RESULTS / 'latest.json'}")
    if crashed:
        print(f"crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
