"""Spending limits that outlive the kernel: reserved before sending, settled after, in every kernel.

Real shells and real kernels on one history file, the real SDK, the offline gateway.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.gateway import Gateway, Reply
from qwen_magic.spending import current_user, standings
from qwen_magic.store import Owner, Store

from .conftest import TEST_KEY, refusal, run_cell
from .kernel_harness import KernelSession, kernel_env

# qwen-max with no --max-tokens: up to 8,192 output tokens at ¥9.6 per 1M, about ¥0.079.
WORST_QWEN_MAX = 8_192 * 9.6 / 1e6


def store_path(isolated_env: Path) -> Path:
    return Path(isolated_env).parent / "history.sqlite3"


def open_reservations(path: Path) -> list[tuple]:
    return sqlite3.connect(path).execute("SELECT owner, pid, amount, what FROM reservations").fetchall()


# ---- in one shell


def test_limits_are_set_shown_and_removed(shell, capsys) -> None:
    said = str(run_cell(shell, "%qwen limit").result)
    assert said.startswith("No spending limit in yuan is set.")
    said = str(run_cell(shell, "%qwen limit daily 5").result)
    assert said.startswith("Daily limit ¥5.00: ¥0 spent today, ¥0 reserved by calls in flight, ¥5.00 left.")
    assert "days and months are local time" in said
    said = str(run_cell(shell, "%qwen limit monthly ¥100").result)
    assert "Daily limit ¥5.00" in said and "Monthly limit ¥100.00: ¥0 spent this month" in said
    said = str(run_cell(shell, "%qwen limit daily off").result)
    assert "Daily limit" not in said and "Monthly limit ¥100.00" in said
    run_cell(shell, "%qwen limit monthly off")
    assert str(run_cell(shell, "%qwen limit").result).startswith("No spending limit")
    for bad in ("%qwen limit weekly 5", "%qwen limit daily", "%qwen limit daily -1", "%qwen limit daily nan"):
        refusal(shell, capsys, bad)


def test_a_call_over_the_limit_is_refused_saying_which_limit_what_is_spent_and_reserved(
    shell, gateway: Gateway, capsys
) -> None:
    run_cell(shell, "%qwen limit daily 0.05")
    line = refusal(shell, capsys, "%%qwen -m qwen-max\nHi")
    assert "Refused, nothing sent: this call could cost up to ¥0.0787," in line
    assert "your daily limit of ¥0.05 (¥0 spent today, ¥0 reserved by calls in flight, ¥0.05 left)" in line
    assert "%qwen limit daily 0.08" in line and "lower --max-tokens" in line and "wait until tomorrow" in line
    assert gateway.requests == []
    # A call whose worst case fits goes through, and then counts against the limit.
    gateway.script(Reply(text="ok", usage={"input_tokens": 1_000, "output_tokens": 1_000}))
    assert run_cell(shell, "%%qwen -m qwen-max --max-tokens 1000\nHi").success
    said = str(run_cell(shell, "%qwen limit").result)
    assert "Daily limit ¥0.05: ¥0.012 spent today, ¥0 reserved by calls in flight, ¥0.038 left." in said


def test_the_monthly_limit_is_checked_too(shell, gateway: Gateway, capsys) -> None:
    run_cell(shell, "%qwen limit daily 5")
    run_cell(shell, "%qwen limit monthly 0.01")
    line = refusal(shell, capsys, "%%qwen -m qwen-max\nHi")
    assert "your monthly limit of ¥0.01 (¥0 spent this month" in line and "wait until next month" in line


def test_a_model_of_unknown_price_is_refused_under_a_limit(shell, gateway: Gateway, capsys) -> None:
    run_cell(shell, "%qwen limit daily 5")
    line = refusal(shell, capsys, "%%qwen -m my-finetune\nHi")
    assert "a daily spending limit is set but my-finetune's price is unknown" in line
    assert "%qwen limit daily off" in line


def test_the_reservation_is_settled_to_the_billed_cost_also_when_the_call_fails(
    shell, gateway: Gateway, capsys, isolated_env
) -> None:
    run_cell(shell, "%qwen limit daily 1")
    gateway.script(Reply(chunks=["Some ", "text"], error_after=1, error_code="InternalError",
                         usage={"input_tokens": 2_000, "output_tokens": 10}))
    outcome = run_cell(shell, "%%qwen -m qwen-max\nHi")
    assert not outcome.success
    assert open_reservations(store_path(isolated_env)) == []
    (cost,) = sqlite3.connect(store_path(isolated_env)).execute("SELECT cost FROM calls").fetchone()
    assert cost and cost < WORST_QWEN_MAX / 10  # what it cost, not its worst case
    said = str(run_cell(shell, "%qwen limit").result)
    assert "¥0 reserved by calls in flight" in said


def test_a_reservation_nobody_settles_is_released_after_the_timeout(shell, gateway: Gateway, capsys,
                                                                   isolated_env) -> None:
    run_cell(shell, "%qwen limit daily 0.1")
    # A kernel on another machine holds most of the limit (its process cannot be checked from here).
    store = Store(store_path(isolated_env))
    store.add_reservation(current_user(), Owner(host="another-machine", pid=1), "CNY", 0.09, "qwen-max call")
    store.close()
    shell.run_line_magic("config", "QwenMagic.reservation_timeout = 0.5")
    line = refusal(shell, capsys, "%%qwen -m qwen-max\nHi")
    assert "¥0.09 reserved by calls in flight" in line
    time.sleep(0.6)
    assert run_cell(shell, "%%qwen -m qwen-max\nHi").success
    assert open_reservations(store_path(isolated_env)) == []


def test_the_usage_report_shows_today_the_month_the_limits_models_notebooks_and_quota(
    shell, gateway: Gateway
) -> None:
    run_cell(shell, "%qwen limit daily 2")
    gateway.script(Reply(text="x", usage={"input_tokens": 1_000, "output_tokens": 1_000}), times=2)
    run_cell(shell, "%%qwen -m qwen-max\nOne")
    run_cell(shell, "%%qwen -m qwen-plus\nTwo")
    report = run_cell(shell, "%qwen usage --all").result
    text = pretty(report)
    assert "today        ¥0.0148" in text and "this month   ¥0.0148" in text
    assert "daily limit  ¥2.00: ¥1.99 left" in text
    assert "qwen-max   1      ¥0.012   998,000 of 1,000,000 tokens" in text
    assert "qwen-plus  1      ¥0.0028  998,000 of 1,000,000 tokens" in text
    assert f"ipython:{os.getcwd()}  2      ¥0.0148" in text
    assert "Spend per day, last 30 days:" in text and "¥0.0148  (most: qwen-max)" in text
    page = report._repr_html_()
    assert page.count("<svg") == 1 and "currentColor" in page and "<script" not in page
    assert "qwen-max: ¥0.012</title>" in page and ">qwen-plus</text>" in page


# ---- in real kernels, on one history file


def start_kernel(gateway: Gateway, workdir: Path, notebook: str) -> KernelSession:
    env = kernel_env(workdir, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     JPY_SESSION_NAME=notebook)
    kernel = KernelSession(env, cwd=workdir)
    # Loaded, with the tokenizer and the history file open: the race below is the calls' alone.
    warm = kernel.execute("%load_ext qwen_magic\n%config QwenMagic.display = 'text'\n%qwen count hi\n%qwen limit")
    assert warm.status == "ok", warm.outputs
    return kernel


def usage_error(execution) -> str:
    """The one UsageError line a refused cell shows (IPython prints it, with no traceback)."""
    assert execution.error is None
    text = "".join(o.get("text", "") for o in execution.outputs if o["output_type"] == "stream")
    (line,) = [line for line in text.splitlines() if line.startswith("UsageError: ")]
    return line


def set_daily_limit(workdir: Path, amount: float) -> None:
    store = Store(workdir / "history.sqlite3")
    store.set_limit(current_user(), "daily", "CNY", amount)
    store.close()


@pytest.mark.kernel
def test_two_kernels_racing_for_the_last_of_a_daily_limit_send_exactly_one_call(
    gateway_server: Gateway, tmp_path: Path
) -> None:
    gateway_server.reset()
    set_daily_limit(tmp_path, WORST_QWEN_MAX * 1.5)  # room for one worst case, not two
    gateway_server.script(Reply(text="Answered.", first_token_delay=3.0, usage={"input_tokens": 10, "output_tokens": 3}),
                          times=None)
    kernels = [start_kernel(gateway_server, tmp_path, f"race-{n}.ipynb") for n in range(2)]
    try:
        pending = [(kernel, kernel.submit("%%qwen -m qwen-max\nThe last yuan is mine")) for kernel in kernels]
        executions = [kernel.collect(msg_id) for kernel, msg_id in pending]
    finally:
        for kernel in kernels:
            kernel.shutdown()
        requests = gateway_server.requests
        gateway_server.reset()
    assert len(requests) == 1
    statuses = sorted(execution.status for execution in executions)
    assert statuses == ["error", "ok"], [e.outputs for e in executions]
    (refused,) = [usage_error(e) for e in executions if e.status == "error"]
    assert "more than is left of your daily limit" in refused
    assert "¥0.0787 reserved by calls in flight" in refused  # the other call's worst case, input included
    assert open_reservations(tmp_path / "history.sqlite3") == []


@pytest.mark.kernel
def test_a_killed_kernels_reservation_holds_while_it_lives_and_is_released_once_it_is_dead(
    gateway_server: Gateway, tmp_path: Path
) -> None:
    gateway_server.reset()
    set_daily_limit(tmp_path, 1.0)
    gateway_server.script(Reply(text="Never finished.", first_token_delay=30.0))
    kernel = start_kernel(gateway_server, tmp_path, "killed.ipynb")
    path = tmp_path / "history.sqlite3"
    try:
        kernel.submit("%%qwen -m qwen-max\nA long answer, please")
        gateway_server.wait_for_requests(1, timeout=30)
        ((_, pid, amount, what),) = open_reservations(path)
        assert amount == pytest.approx(WORST_QWEN_MAX, rel=0.05) and what == "qwen-max call"
        store = Store(path)
        (standing,) = standings(store, "CNY")  # seen from another process: the kernel is alive
        assert standing.reserved == pytest.approx(amount)
        kernel.manager.signal_kernel(signal.SIGKILL)  # no chance to settle
        kernel.manager.shutdown_kernel(now=True)  # reaped: its process id names no process now
        assert not _alive(pid)
        (standing,) = standings(store, "CNY")
        assert standing.reserved == 0 and standing.left == 1.0
        store.close()
        assert open_reservations(path) == []
    finally:
        kernel.manager.shutdown_kernel(now=True)
        kernel.client.stop_channels()
        gateway_server.reset()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.kernel
def test_the_limit_holds_across_a_kernel_restart(gateway_server: Gateway, tmp_path: Path) -> None:
    gateway_server.reset()
    first = start_kernel(gateway_server, tmp_path, "restart.ipynb")
    try:
        assert first.execute("%qwen limit daily 0.05").status == "ok"
    finally:
        first.shutdown()
    second = start_kernel(gateway_server, tmp_path, "restart.ipynb")
    try:
        shown = second.execute("%qwen limit")
        assert "Daily limit ¥0.05" in shown.outputs[-1]["data"]["text/plain"]
        refused = second.execute("%%qwen -m qwen-max\nHi")
        assert refused.status == "error" and "your daily limit of ¥0.05" in usage_error(refused)
    finally:
        second.shutdown()
    assert gateway_server.requests == []


@pytest.mark.kernel
def test_the_spend_chart_is_kept_in_a_saved_notebook(gateway_server: Gateway, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    gateway_server.reset()
    gateway_server.script(Reply(text="x", usage={"input_tokens": 1_000, "output_tokens": 1_000}), times=None)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("%load_ext qwen_magic\n%qwen limit daily 1"),
        nbformat.v4.new_code_cell("%%qwen -m qwen-max\nHi"),
        nbformat.v4.new_code_cell("%%qwen -m qwen-plus\nHi again"),
        nbformat.v4.new_code_cell("%qwen usage --all"),
    ]
    env = kernel_env(tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url)
    try:
        NotebookClient(notebook, timeout=60).execute(env=env, cwd=str(tmp_path))
    finally:
        gateway_server.reset()
    path = tmp_path / "usage.ipynb"
    nbformat.write(notebook, path)
    (output,) = nbformat.read(path, as_version=4).cells[3].outputs
    page = output.data["text/html"]
    assert page.count("<svg") == 1 and "</svg>" in page and "<script" not in page
    assert 'stroke="currentColor"' in page and 'fill="currentColor"' in page
    assert ">qwen-max</text>" in page and ">qwen-plus</text>" in page and "<rect" in page
    assert "daily limit" in page
    assert "Spend per day, last 30 days:" in output.data["text/plain"]


def test_a_call_refused_after_its_reservation_does_not_hold_the_limit(shell, gateway: Gateway, capsys,
                                                                      monkeypatch, isolated_env) -> None:
    run_cell(shell, "%qwen limit daily 0.1")  # room for one worst case of qwen-max, not two
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    assert "No DashScope API key is set" in refusal(shell, capsys, "%%qwen -m qwen-max\nHi")
    monkeypatch.setenv("DASHSCOPE_API_KEY", TEST_KEY)
    assert run_cell(shell, "%%qwen -m qwen-max\nHi").success  # the unsent call's hold is gone
    assert open_reservations(store_path(isolated_env)) == []


def test_the_gateways_cache_needs_1024_tokens_and_the_same_marked_prefix() -> None:
    from qwen_magic.gateway.cache import ContextCache

    def marked(text: str) -> dict:
        return {"role": "system", "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}

    cache = ContextCache()
    question = {"role": "user", "content": "Hi"}
    assert cache.figures("qwen-plus", [{"role": "system", "content": "x " * 2000}, question]) is None
    assert cache.figures("qwen-plus", [marked("short"), question]) == (0, 0)
    long_prefix = [marked("word " * 2000), question]
    read, written = cache.figures("qwen-plus", long_prefix)
    assert read == 0 and written > 1024
    assert cache.figures("qwen-plus", long_prefix) == (written, 0)
    assert cache.figures("qwen-max", long_prefix) == (0, written)  # per model
    assert cache.figures("qwen-plus", [marked("other " * 2000), question])[0] == 0


def test_a_job_reserves_its_whole_worst_case_lowers_it_as_rows_finish_and_settles(tmp_path: Path) -> None:
    from IPython.core.error import UsageError

    from qwen_magic.spending import reserve

    store = Store(tmp_path / "history.sqlite3")
    store.set_limit(current_user(), "daily", "CNY", 1.0)
    job, other = Owner(pid=os.getppid()), Owner()  # two live processes (one process runs one session)
    hold = reserve(store, job, 0.8, "CNY", what="--map job (100 rows)")
    with pytest.raises(UsageError, match=r"¥0.8 reserved by calls in flight, ¥0.2 left"):
        reserve(store, other, 0.3, "CNY", what="qwen-max call")
    hold.lower(store, 0.5)  # rows done: their calls are recorded, the rest may still cost 0.5
    store.add_call("nb", None, "qwen-plus", 10, 10, 0.1, "complete")
    assert reserve(store, other, 0.3, "CNY", what="qwen-max call").amount == 0.3
    Hold = type(hold)
    Hold(hold.id, 0.5, "CNY", owner=other).settle(store)  # another kernel's id: not its to settle
    assert [row[2] for row in open_reservations(tmp_path / "history.sqlite3")] == [0.5, 0.3]
    hold.settle(store)
    assert [row[2] for row in open_reservations(tmp_path / "history.sqlite3")] == [0.3]
    store.close()
