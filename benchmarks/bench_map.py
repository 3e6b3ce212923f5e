"""``%%qwen --map``: throughput, kernel CPU per row, 50,000 rows, resume, a 429 storm.

    python benchmarks/bench_map.py [--scale 1.0]

One real kernel (tests/kernel_harness.py); the offline gateway in a process of its own, its
load set over the control endpoint (a delay for every answer, a share of requests throttled).
Every figure is measured in the kernel (wall and process CPU around the cell) or counted at
the gateway. ``--scale`` shrinks every row count (0.1 for a quick look); the issue's targets
are for scale 1.
"""

from __future__ import annotations

import argparse
import sqlite3
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
    print_rows,
    running_kernel,
    write_result,
)
from qwen_magic.gateway import Reply

NAME = "map"
DELAY = 0.2
CONCURRENCY = 16
SEQUENTIAL_CALLS = 25

# Runs a --map cell in the kernel and prints its wall time, CPU time, and the result's counts.
_MAP_CELL = """
import json, time
from qwen_magic.jobs.job import MapInterrupted
_rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
_rss_before = _rss()
_wall, _cpu = time.perf_counter(), time.process_time()
get_ipython().run_cell_magic('qwen', {line!r}, 'Row {{item}}: say ok')
_wall, _cpu = time.perf_counter() - _wall, time.process_time() - _cpu
print("BENCH " + json.dumps({{"wall": _wall, "cpu": _cpu, "done": out.done, "failed": len(out.failed),
                              "requests": out.requests, "resumed": out.resumed,
                              "rss_growth": _rss() - _rss_before}}))
"""

# A raw concurrent SDK loop: the same requests through dashscope.Client on 16 threads.
_RAW_CELL = """
import json, time, dashscope
from concurrent.futures import ThreadPoolExecutor
_client = dashscope.Client(api_key={key!r}, base_url={base_url!r}, max_retries=0)
def _one(i):
    done = _client.chat.completions.create(model="qwen-flash", messages=[{{"role": "user", "content": f"Row {{i}}: say ok"}}],
                                           stream=False)
    return done.choices[0].message.content
_wall, _cpu = time.perf_counter(), time.process_time()
with ThreadPoolExecutor({concurrency}) as _pool:
    _texts = list(_pool.map(_one, range({rows})))
_wall, _cpu = time.perf_counter() - _wall, time.process_time() - _cpu
print("BENCH " + json.dumps({{"wall": _wall, "cpu": _cpu, "done": len(_texts)}}))
"""

# Single %%qwen calls in a loop, one after the other: what a notebook does without --map.
_SEQUENTIAL_CELL = """
import json, time
_wall = time.perf_counter()
for _i in range({calls}):
    get_ipython().run_cell_magic('qwen', '--no-history -m qwen-flash -f text', f'Row {{_i}}: say ok')
_wall = time.perf_counter() - _wall
print("BENCH " + json.dumps({{"wall": _wall}}))
"""


def _map(kernel: Any, rows: int, *, extra: str = "", what: str) -> dict[str, Any]:
    check_ok(kernel.execute(f"rows = list(range({rows}))"), "rows")
    line = f"--map rows -o out --concurrency {CONCURRENCY} -m qwen-flash -f text {extra}".strip()
    execution = check_ok(kernel.execute(_MAP_CELL.format(line=line), timeout=1800, quiet=True), what)
    report = bench_report(execution.stdout)
    updates = execution.of_type("display_data", "update_display_data")
    report["progress_messages"] = len(updates)
    report["progress_per_s"] = len(updates) / report["wall"] if report["wall"] else 0.0
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    scaled = lambda n: max(int(n * args.scale), 50)  # noqa: E731

    result: dict[str, Any] = {"benchmark": NAME, "environment": environment(), "scale": args.scale}
    with tempfile.TemporaryDirectory() as folder, gateway_process() as gateway:
        tmp = Path(folder)
        env = dict(DASHSCOPE_API_KEY=BENCH_KEY, DASHSCOPE_BASE_URL=gateway.base_url, JPY_SESSION_NAME="bench.ipynb")
        with running_kernel(tmp, **env) as kernel:
            check_ok(kernel.execute("%load_ext qwen_magic\n%config QwenMagic.display = 'markdown'"), "load_ext")

            _map(kernel, CONCURRENCY, what="warm-up")  # the SDK, the tokenizer, the client and its connections

            # 1. Throughput at 200 ms an answer, against the ideal and a sequential loop.
            gateway.load(delay=DELAY)
            rows = scaled(1000)
            throughput = _map(kernel, rows, extra="--fresh", what="throughput")  # not the warm-up's rows
            ideal = CONCURRENCY / DELAY
            sequential = bench_report(check_ok(kernel.execute(
                _SEQUENTIAL_CELL.format(calls=SEQUENTIAL_CALLS), timeout=600, quiet=True), "sequential").stdout)
            sequential_per_row = sequential["wall"] / SEQUENTIAL_CALLS
            result["throughput"] = {
                "rows": rows, "delay_s": DELAY, "concurrency": CONCURRENCY, **throughput,
                "rows_per_s": rows / throughput["wall"], "ideal_rows_per_s": ideal,
                "ratio_to_ideal": rows / throughput["wall"] / ideal,
                "sequential_s_per_row": sequential_per_row,
                "speedup_over_sequential": sequential_per_row / (throughput["wall"] / rows),
            }

            # 2. Kernel CPU per row with an instant gateway, against a raw concurrent SDK loop.
            gateway.load(delay=0.0)
            gateway.script(Reply(text="ok"), times=None)
            rows = scaled(2000)
            cpu_rows = []
            for round_number in range(3):  # interleaved; the job's rows are new each round (--fresh)
                raw = bench_report(check_ok(kernel.execute(_RAW_CELL.format(
                    key=BENCH_KEY, base_url=gateway.base_url, concurrency=CONCURRENCY, rows=rows),
                    timeout=600, quiet=True), "raw loop").stdout)
                mapped = _map(kernel, rows, extra="--fresh", what="overhead")
                cpu_rows.append((raw["cpu"] / rows, mapped["cpu"] / rows, raw["wall"], mapped["wall"]))
            raw_cpu = sorted(r[0] for r in cpu_rows)[1]
            map_cpu = sorted(r[1] for r in cpu_rows)[1]
            result["overhead"] = {
                "rows": rows, "rounds": len(cpu_rows),
                "raw_cpu_ms_per_row": raw_cpu * 1000, "map_cpu_ms_per_row": map_cpu * 1000,
                "cpu_ratio": map_cpu / raw_cpu,
                "raw_rows_per_s": rows / sorted(r[2] for r in cpu_rows)[1],
                "map_rows_per_s": rows / sorted(r[3] for r in cpu_rows)[1],
            }

            # 3. 50,000 rows: memory, progress messages; then resume with 49,000 done.
            rows = scaled(50_000)
            scale = _map(kernel, rows, extra="--fresh", what="scale")
            result["scale"] = {"rows": rows, **scale, "rows_per_s": rows / scale["wall"],
                               "rss_growth_mb": scale["rss_growth"] / 2**20}
            missing = rows // 50
            db = sqlite3.connect(tmp / "history.sqlite3")
            with db:  # 1 row in 50 without a result: 49,000 of 50,000 done
                db.execute("DELETE FROM job_rows WHERE row IN (SELECT row FROM job_rows ORDER BY row LIMIT ?)",
                           (missing,))
            db.close()
            gateway.reset()
            gateway.script(Reply(text="ok"), times=None)
            check_ok(kernel.execute(f"rows = list(range({rows}))"), "rows")
            line = f"--map rows -o out --concurrency {CONCURRENCY} -m qwen-flash -f text"
            started = time.monotonic()
            msg_id = kernel.submit(_MAP_CELL.format(line=line))
            first_request = None
            while first_request is None and time.monotonic() - started < 60:
                if gateway.requests():
                    first_request = time.monotonic() - started
                else:
                    time.sleep(0.01)
            resumed = bench_report(check_ok(kernel.collect(msg_id, timeout=600, quiet=True), "resume").stdout)
            result["resume"] = {"rows": rows, "done_before": rows - missing, "first_request_after_s": first_request,
                                "resumed": resumed["resumed"], "requests": resumed["requests"]}

            # 4. A 429 storm: 30% of requests throttled. Every row completes; requests against a clean run.
            gateway.reset()
            check_ok(kernel.execute("get_ipython().magics_manager.registry['QwenMagic'].session.retry_base_delay"
                                    " = 0.05"), "retry delay")
            gateway.load(delay=0.02, throttle_rate=0.3, seed=15)
            rows = scaled(1000)
            storm = _map(kernel, rows, extra="--fresh", what="storm")
            result["storm"] = {"rows": rows, **storm, "gateway_requests": len(gateway.requests()),
                               "request_ratio": storm["requests"] / rows, "rows_per_s": rows / storm["wall"]}
    write_result(NAME, result)
    t, o, s, r, st = result["throughput"], result["overhead"], result["scale"], result["resume"], result["storm"]
    print_rows("--map", [
        (f"{t['rows']:,} rows at {DELAY * 1000:.0f} ms, concurrency {CONCURRENCY}",
         f"{t['rows_per_s']:.1f} rows/s = {t['ratio_to_ideal']:.0%} of {t['ideal_rows_per_s']:.0f}"),
        ("against single %%qwen calls in a loop", f"{t['speedup_over_sequential']:.1f}x faster "
                                                  f"({t['sequential_s_per_row'] * 1000:.0f} ms a call)"),
        (f"kernel CPU per row, instant gateway ({o['rows']:,} rows)",
         f"{o['map_cpu_ms_per_row']:.2f} ms vs raw SDK loop {o['raw_cpu_ms_per_row']:.2f} ms = {o['cpu_ratio']:.2f}x"),
        (f"{s['rows']:,} rows: memory growth, rows/s", f"{s['rss_growth_mb']:.0f} MB, {s['rows_per_s']:.0f} rows/s"),
        ("progress messages per second", f"{s['progress_per_s']:.1f} ({s['progress_messages']:,} in {s['wall']:.0f} s)"),
        (f"resume with {r['done_before']:,} of {r['rows']:,} done: first request after",
         f"{r['first_request_after_s']:.2f} s ({r['requests']:,} sent)"),
        ("429 storm (30%): rows done, requests / rows",
         f"{st['done']:,} of {st['rows']:,}, {st['request_ratio']:.2f}x ({st['rows_per_s']:.1f} rows/s)"),
    ])
    return result


if __name__ == "__main__":
    main()
