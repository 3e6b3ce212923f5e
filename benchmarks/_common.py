"""What the benchmarks share: paths, statistics, the environment, the gateway process, results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"

# The kernel harness lives in tests/; it is imported with the repository root on sys.path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH_KEY = "sk-benchmark-0000000000000000"
PACKAGES = (
    "qwen-magic",
    "ipython",
    "ipykernel",
    "ipywidgets",
    "dashscope",
    "httpx",
    "markdown-it-py",
    "tiktoken",
    "jupyter_client",
)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(REPO), timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": date.today().isoformat(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "package_tree_modified": bool(_git("status", "--porcelain", "--", "qwen_magic")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")


class GatewayProcess:
    """The offline gateway in a process of its own, scripted over its control endpoint.

    A separate process keeps the gateway's frame encoding off the benchmark's own GIL
    (the harness decodes and sizes every IOPub message), as a remote service would be.
    """

    _CODE = (
        "import sys, time\n"
        "from qwen_magic.gateway import Gateway\n"
        "gateway = Gateway().start()\n"
        "print(gateway.url, flush=True)\n"
        "sys.stdin.read()\n"  # runs until the parent closes stdin
        "gateway.stop()\n"
    )

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", self._CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError("the gateway process did not start")
        self.base_url = self.url + "/api/v1"
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/_gateway/health")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def script(self, *replies: Any, times: int | None = 1) -> None:
        self._call("POST", "/_gateway/script", {"replies": [r.to_dict() for r in replies], "times": times})

    def reset(self) -> None:
        self._call("POST", "/_gateway/reset", {})

    def load(self, *, delay: float = 0.0, throttle_rate: float = 0.0, seed: int = 0) -> None:
        """Every unscripted answer after ``delay`` s; ``throttle_rate`` of requests answered 429."""
        self._call("POST", "/_gateway/load", {"delay": delay, "throttle_rate": throttle_rate, "seed": seed})

    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_gateway/requests")["requests"]

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.close()
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@contextmanager
def gateway_process() -> Iterator[GatewayProcess]:
    gateway = GatewayProcess()
    try:
        yield gateway
    finally:
        gateway.close()


@contextmanager
def running_kernel(tmp: Path, **env: str) -> Iterator[Any]:
    """One real kernel (tests/kernel_harness.py), isolated from the user's settings."""
    from tests.kernel_harness import KernelSession, kernel_env

    kernel = KernelSession(kernel_env(tmp, **env), cwd=tmp)
    try:
        yield kernel
    finally:
        kernel.shutdown()


def bench_report(stdout: str) -> Any:
    """The JSON a benchmark cell or process printed after ``BENCH ``."""
    line = next(line for line in stdout.splitlines() if line.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def check_ok(execution: Any, what: str) -> Any:
    if execution.status != "ok":
        raise RuntimeError(f"{what} failed in the kernel: {execution.error or execution.reply}")
    return execution
