"""``%%qwen --map``: one request per row, concurrent under the limits, resumable.

Shell-level tests run the real IPython shell (terminal progress) against the offline gateway
through the real SDK; the kernel tests interrupt a job with ■ and kill a kernel with SIGKILL.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.gateway import Gateway, Reply
from qwen_magic.jobs.job import MapInterrupted, MapStopped
from qwen_magic.jobs.results import MapResult
from qwen_magic.limits import RateLimiter

from .conftest import TEST_KEY, refusal, run_cell, shown
from .kernel_harness import KernelSession, kernel_env

pd = pytest.importorskip("pandas")


def session_of(shell):
    return shell.magics_manager.registry["QwenMagic"].session


def asked(gateway: Gateway) -> list[str]:
    """The user message of every chat request, in arrival order."""
    return [request.messages[-1]["content"] for request in gateway.requests]


def test_a_list_maps_row_by_row_with_item_and_index(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["reviews"] = ["great phone", "broke in a week", "fine"]
    outcome = run_cell(shell, "%%qwen --map reviews -o labels -m qwen-flash\nReview {index}: {item}")
    printed = shown(capsys)
    assert outcome.success, printed
    assert sorted(asked(gateway)) == ["Review 0: great phone", "Review 1: broke in a week", "Review 2: fine"]
    labels = shell.user_ns["labels"]
    assert isinstance(labels, MapResult) and len(labels) == 3
    for position, review in enumerate(shell.user_ns["reviews"]):  # aligned with the input, whatever the order
        assert f"You said: Review {position}: {review}" in labels[position].text
        assert labels[position].status == "complete" and labels[position].key == position
    assert labels.failed == [] and labels.cost > 0
    assert labels.usage.input_tokens == sum(row.usage.input_tokens for row in labels) > 0
    # No chat history: every request is one user message (and the default system prompt, none sent).
    assert all(len(request.messages) == 1 for request in gateway.requests)
    assert "3 rows on qwen-flash: 3 done" in printed and " in / " in printed and "¥" in printed
    assert TEST_KEY not in printed
    # The job is one line of %qwen usage, with its row count.
    usage = pretty(run_cell(shell, "%qwen usage").result)
    assert "(map, 3 rows)" in usage and usage.count("qwen-flash") == 2  # the job's line and the model total


def test_dict_rows_keep_their_keys(shell, gateway: Gateway) -> None:
    shell.user_ns["cities"] = {"hz": "Hangzhou", "sh": "Shanghai"}
    assert run_cell(shell, "%%qwen --map cities -o out -m qwen-flash\n{index} is short for {item}").success
    assert sorted(asked(gateway)) == ["hz is short for Hangzhou", "sh is short for Shanghai"]
    out = shell.user_ns["out"]
    assert out.keys == ["hz", "sh"] and list(out.to_series().index) == ["hz", "sh"]


def test_a_dataframe_maps_row_by_row_with_columns_and_its_index(shell, gateway: Gateway) -> None:
    df = pd.DataFrame({"title": ["Nice", "Awful"], "city": ["Hangzhou", "Suzhou"]}, index=[10, 20])
    shell.user_ns["df"] = df
    shell.user_ns["tone"] = "short"
    cell = "%%qwen --map df -o out -m qwen-flash\n{tone} answer: {item.title} from {item[city]} (row {index})"
    assert run_cell(shell, cell).success
    assert sorted(asked(gateway)) == ["short answer: Awful from Suzhou (row 20)",
                                      "short answer: Nice from Hangzhou (row 10)"]
    out = shell.user_ns["out"]
    series = out.to_series()
    assert list(series.index) == [10, 20] and "Nice from Hangzhou" in series[10]
    df["label"] = series  # a column added, aligned by the index
    assert "Awful from Suzhou" in df.loc[20, "label"]
    frame = out.to_frame()
    assert list(frame.index) == [10, 20] and list(frame["status"]) == ["complete", "complete"]


def test_rows_are_really_sent_concurrently_up_to_the_cap(shell, gateway: Gateway) -> None:
    gateway.load(delay=0.3)
    shell.user_ns["rows"] = list(range(12))
    started = time.monotonic()
    assert run_cell(shell, "%%qwen --map rows --concurrency 4 -m qwen-flash\nRow {item}").success
    elapsed = time.monotonic() - started
    assert gateway.peak_in_flight == 4
    assert len(gateway.requests) == 12
    assert elapsed < 12 * 0.3 / 2, f"{elapsed:.2f} s: not concurrent"  # 3 waves of 0.3 s, not 12


def test_the_concurrency_setting_is_a_trait(shell, gateway: Gateway) -> None:
    gateway.load(delay=0.2)
    shell.run_line_magic("config", "QwenMagic.concurrency = 3")
    shell.user_ns["rows"] = list(range(9))
    assert run_cell(shell, "%%qwen --map rows -m qwen-flash\nRow {item}").success
    assert gateway.peak_in_flight == 3


def test_rows_share_the_sessions_rate_limiter(shell, gateway: Gateway) -> None:
    # Three requests a window (one second here, a minute for DashScope): six rows need two windows.
    session_of(shell).limiter = RateLimiter(window=1.0)
    shell.run_line_magic("config", "QwenMagic.models = {'qwen-flash': {'qpm': 3}}")
    shell.user_ns["rows"] = list(range(6))
    started = time.monotonic()
    assert run_cell(shell, "%%qwen --map rows --concurrency 6 -m qwen-flash\nRow {item}").success
    assert time.monotonic() - started >= 0.9
    assert len(gateway.requests) == 6


def test_a_429_storm_completes_every_row_without_storming(shell, gateway: Gateway, capsys) -> None:
    session_of(shell).retry_base_delay = 0.01
    gateway.load(throttle_rate=0.3, seed=7)
    shell.user_ns["rows"] = list(range(60))
    assert run_cell(shell, "%%qwen --map rows -o out --concurrency 8 -m qwen-flash\nRow {item}").success
    out = shell.user_ns["out"]
    assert out.failed == [] and out.done == 60
    assert gateway.throttled > 0
    assert len(gateway.requests) == 60 + gateway.throttled  # every throttled row was sent again, once per 429
    assert len(gateway.requests) <= 1.6 * 60


def test_a_server_error_is_retried_per_row(shell, gateway: Gateway) -> None:
    session_of(shell).retry_base_delay = 0.01
    gateway.script(Reply(status=500), Reply(status=503, error_code="ServiceUnavailable"))
    shell.user_ns["rows"] = ["a", "b", "c"]
    assert run_cell(shell, "%%qwen --map rows -o out --concurrency 1 -m qwen-flash\nRow {item}").success
    assert shell.user_ns["out"].done == 3
    assert len(gateway.requests) == 5


def test_an_account_error_stops_the_job_at_once_with_one_line(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(error_code="Arrearage"), times=None)
    shell.user_ns["rows"] = list(range(50))
    outcome = run_cell(shell, "%%qwen --map rows -o out --concurrency 2 -m qwen-flash\nRow {item}")
    printed = shown(capsys)
    assert isinstance(outcome.error_in_exec, MapStopped)
    assert "Traceback" not in printed and TEST_KEY not in printed
    assert len(gateway.requests) <= 2  # the rows in flight, no more
    line = [text for text in printed.splitlines() if text.startswith("The job stopped")]
    assert len(line) == 1 and "Arrearage" in line[0] and "0 of 50 rows are done" in line[0]
    assert len(shell.user_ns["out"].not_run) >= 48


def test_a_failed_row_is_listed_and_the_others_go_on(shell, gateway: Gateway, capsys) -> None:
    gateway.script_matching("bad", Reply(error_code="DataInspectionFailed"))
    shell.user_ns["rows"] = ["good", "bad", "fine"]
    assert run_cell(shell, "%%qwen --map rows -o out -m qwen-flash\nSay {item}").success
    printed = shown(capsys)
    out = shell.user_ns["out"]
    assert out.failed == [1] and out.done == 2
    assert out[1].error == "DataInspectionFailed" and out[1].message
    assert "1 failed" in printed and "Failed rows (DataInspectionFailed ×1): 1." in printed
    # Run again, the service willing this time: only the failed row is sent.
    gateway.reset()
    assert run_cell(shell, "%%qwen --map rows -o out -m qwen-flash\nSay {item}").success
    assert asked(gateway) == ["Say bad"]
    assert "resumed: 2 done, 1 to go" in shown(capsys)
    assert shell.user_ns["out"].done == 3 and shell.user_ns["out"].failed == []


def test_json_rows_give_parsed_values(shell, gateway: Gateway) -> None:
    for word, label in (("love", "positive"), ("hate", "negative")):
        gateway.script_matching(word, Reply(text=json.dumps({"label": label})))
    shell.user_ns["rows"] = ["I love it", "I hate it"]
    assert run_cell(shell, "%%qwen --map rows -f json -o out -m qwen-flash\nLabel: {item}").success
    out = shell.user_ns["out"]
    assert out.values == [{"label": "positive"}, {"label": "negative"}]
    assert all(request.parameters.get("response_format") == {"type": "json_object"} for request in gateway.requests)
    # Resumed rows parse again.
    assert run_cell(shell, "%%qwen --map rows -f json -o again -m qwen-flash\nLabel: {item}").success
    assert shell.user_ns["again"].values == out.values and len(gateway.requests) == 2


def test_dry_run_shows_rows_tokens_both_prices_and_three_prompts(shell, gateway: Gateway) -> None:
    shell.user_ns["rows"] = [f"review {n}" for n in range(5)]
    outcome = run_cell(shell, "%%qwen --map rows --dry-run --max-tokens 10 -m qwen-plus\nClassify {item}")
    assert outcome.success
    text = pretty(outcome.result)
    assert text.startswith("Dry run: nothing was sent.")
    assert "5 in rows" in text and "input tokens" in text
    assert "real time" in text and "batch (50%)" in text and "10 output tokens a row" in text
    assert "[0] Classify review 0" in text and "[2] Classify review 2" in text and "review 3" not in text
    assert gateway.requests == []
    assert "batch (50%)" in outcome.result._repr_html_()


def test_a_job_over_budget_is_refused_whole_and_says_what_fits(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["rows"] = [f"review {n}" for n in range(40)]
    run_cell(shell, "%qwen budget 0.01")
    line = refusal(shell, capsys, "%%qwen --map rows -m qwen-plus\nClassify {item}")
    assert "Refused, nothing sent: these 40 rows could cost up to" in line
    assert "the session budget" in line and "lower --max-tokens to" in line
    line = refusal(shell, capsys, "%%qwen --map rows -m qwen-plus --max-tokens 5 --max-cost 0.0002\nClassify {item}")
    assert "more than --max-cost" in line and "map fewer rows (the first" in line
    assert gateway.requests == []


def test_resume_sends_only_the_rows_without_a_result(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["first"] = ["a", "b", "c"]
    shell.user_ns["rows"] = ["a", "b", "c", "d", "e"]
    assert run_cell(shell, "%%qwen --map first -m qwen-flash\nWord: {item}").success
    gateway.reset()
    capsys.readouterr()
    assert run_cell(shell, "%%qwen --map rows -o out -m qwen-flash\nWord: {item}").success
    assert "resumed: 3 done, 2 to go" in shown(capsys)
    assert sorted(asked(gateway)) == ["Word: d", "Word: e"]
    out = shell.user_ns["out"]
    assert out.done == 5 and out.resumed == 3 and all("Word: a" in out[0].text for _ in [0])
    assert [row.resumed for row in out] == [True, True, True, False, False]


def test_fresh_asks_every_row_again(shell, gateway: Gateway) -> None:
    shell.user_ns["rows"] = ["a", "b"]
    assert run_cell(shell, "%%qwen --map rows -m qwen-flash\nWord: {item}").success
    assert run_cell(shell, "%%qwen --map rows --fresh -m qwen-flash\nWord: {item}").success
    assert len(gateway.requests) == 4


def test_a_fresh_run_refused_by_the_budget_loses_no_stored_row(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["rows"] = ["a", "b"]
    assert run_cell(shell, "%%qwen --map rows -m qwen-flash\nWord: {item}").success
    run_cell(shell, "%qwen budget 0.000001")
    refusal(shell, capsys, "%%qwen --map rows --fresh -m qwen-flash\nWord: {item}")
    run_cell(shell, "%qwen budget off")
    assert run_cell(shell, "%%qwen --map rows -m qwen-flash\nWord: {item}").success
    assert "resumed: 2 done, 0 to go" in shown(capsys)
    assert len(gateway.requests) == 2


@pytest.mark.parametrize("changed", ["%%qwen --map rows -m qwen-flash\nA word: {item}",
                                     "%%qwen --map rows -m qwen-turbo\nWord: {item}",
                                     "%%qwen --map rows -m qwen-flash -t 0.3\nWord: {item}"])
def test_a_new_template_model_or_parameter_starts_afresh(shell, gateway: Gateway, changed: str) -> None:
    shell.user_ns["rows"] = ["a", "b"]
    assert run_cell(shell, "%%qwen --map rows -m qwen-flash\nWord: {item}").success
    assert run_cell(shell, changed).success
    assert len(gateway.requests) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%%qwen --map rows -c other\nW {item}", "-c/--chat cannot be used with --map"),
        ("%%qwen --map rows -n\nW {item}", "-n/--new cannot be used with --map"),
        ("%%qwen --map rows -f code\nW {item}", "-f code cannot be used with --map"),
        ("%%qwen --concurrency 4\nW", "--concurrency is for jobs over rows: add --map NAME."),
        ("%%qwen --fresh\nW", "--fresh is for jobs over rows: add --map NAME."),
        ("%%qwen --map rows --concurrency 0\nW {item}", "--concurrency must be from 1"),
        ("%%qwen --map nothing_here\nW {item}", "the notebook has no variable 'nothing_here'"),
        ("%%qwen --map text\nW {item}", "text is one string, not a collection"),
        ("%%qwen --map gen\nW {item}", "has no length (a generator?)"),
        ("%%qwen --map rows\nThe same question", "the prompt has no {item}"),
    ],
)
def test_a_job_that_makes_no_sense_is_one_line(shell, gateway: Gateway, capsys, line: str, message: str) -> None:
    shell.user_ns.update(rows=["a"], text="abc", gen=(n for n in range(3)))
    assert message in refusal(shell, capsys, line)
    assert gateway.requests == []


def test_map_from_code_shares_the_session(shell, gateway: Gateway) -> None:
    import qwen_magic

    shell.user_ns["suffix"] = "!"
    out = qwen_magic.map("Shout {item}{suffix}", ["a", "b"], model="qwen-flash", concurrency=2)
    assert isinstance(out, MapResult) and out.done == 2
    assert sorted(asked(gateway)) == ["Shout a!", "Shout b!"]
    assert session_of(shell).ledger.records[-1].rows == 2


# ---------------------------------------------------------------- in a kernel


def start_kernel(gateway: Gateway, workdir: Path) -> KernelSession:
    env = kernel_env(workdir, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     JPY_SESSION_NAME="map.ipynb")
    return KernelSession(env, cwd=workdir)


@pytest.mark.kernel
def test_stop_keeps_finished_rows_and_a_rerun_resumes(gateway: Gateway, tmp_path: Path) -> None:
    gateway.load(delay=0.25)
    kernel = start_kernel(gateway, tmp_path)
    cell = "%%qwen --map rows -o out --concurrency 4 -m qwen-flash\nRow {item}"
    try:
        assert kernel.execute("%load_ext qwen_magic\nrows = list(range(40))").status == "ok"
        msg_id = kernel.submit(cell, cell_id="map-cell")
        gateway.wait_for_requests(12, timeout=20)
        interrupted_at = time.monotonic()
        kernel.interrupt()
        stopped = kernel.collect(msg_id, timeout=20)
        assert stopped.status == "error"
        replied = max(m.received for m in stopped.messages) - interrupted_at
        assert replied < 1.5, f"the job took {replied:.2f} s to stop"
        error = stopped.error
        assert error["ename"] == "MapInterrupted" and "rows are done and kept" in error["evalue"]
        summary = [o for o in stopped.outputs if o["output_type"] == "display_data"]
        assert len(summary) == 1 and "not run" in summary[0]["data"]["text/plain"]
        assert 'class="qwen-map-summary"' in summary[0]["data"]["text/html"]
        assert not any("widget" in mime for mime in summary[0]["data"])
        kept = kernel.execute("print(out.done, len(out.not_run))").stdout.split()
        done = int(kept[0])
        assert 8 <= done < 40
        sent_before = len(gateway.requests)
        gateway.load(delay=0.0)
        again = kernel.execute(cell, cell_id="map-cell")
        assert again.status == "ok"
        text = "".join(o["data"]["text/plain"] for o in again.outputs if o["output_type"] == "display_data")
        assert f"resumed: {done} done before" in text
        assert len(gateway.requests) - sent_before == 40 - done
    finally:
        kernel.shutdown()


@pytest.mark.kernel
def test_a_killed_kernels_finished_rows_are_resumed(gateway: Gateway, tmp_path: Path) -> None:
    gateway.load(delay=0.1)
    kernel = start_kernel(gateway, tmp_path)
    cell = "%%qwen --map rows --concurrency 4 -m qwen-flash\nRow {item}"
    try:
        assert kernel.execute("%load_ext qwen_magic\nrows = list(range(60))").status == "ok"
        kernel.submit(cell)
        gateway.wait_for_requests(30, timeout=20)
        time.sleep(0.5)  # past one batch of writes
        kernel.manager.signal_kernel(signal.SIGKILL)  # no cleanup of any kind
        kernel.manager.shutdown_kernel(now=True)
    finally:
        kernel.client.stop_channels()
    db = sqlite3.connect(tmp_path / "history.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = db.execute("SELECT COUNT(*) FROM job_rows").fetchone()[0]
    db.close()
    assert stored >= 20
    gateway.reset()
    kernel = start_kernel(gateway, tmp_path)
    try:
        assert kernel.execute("%load_ext qwen_magic\nrows = list(range(60))").status == "ok"
        again = kernel.execute(cell)
        assert again.status == "ok"
        text = "".join(o["data"]["text/plain"] for o in again.outputs if o["output_type"] == "display_data")
        assert f"resumed: {stored} done before" in text
        assert len(gateway.requests) == 60 - stored
    finally:
        kernel.shutdown()


@pytest.mark.parametrize("template", ["Row {item}: {x} {d[a][1]:>3} {item!r} {{item}} {nope} {index}",
                                      "{item.real} and {index[0]}", "no references", "{x:.2f} {item:>4}"])
def test_a_jobs_filler_fills_each_row_as_fill_does(template: str) -> None:
    from qwen_magic.prompt import fill, filler

    namespace = {"x": 1.5, "d": {"a": [1, 2]}}
    fill_row = filler(template, namespace, ("item", "index"))
    for item, index in ((5, "key"), (7, "other")):
        assert fill_row({"item": item, "index": index}) == fill(template, {**namespace, "item": item, "index": index})


# ---------------------------------------------------------------- limits, regions, schemas


def open_reservations(shell) -> list:
    magics = shell.magics_manager.registry["QwenMagic"]
    return magics.session.store(magics.settings())._db.execute("SELECT amount, what FROM reservations").fetchall()


def test_a_daily_limit_refuses_a_job_whole_and_holds_one_that_fits(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["rows"] = [f"review {n}" for n in range(30)]
    run_cell(shell, "%qwen limit daily 0.001")
    line = refusal(shell, capsys, "%%qwen --map rows -m qwen-plus\nClassify {item}")
    assert "more than is left of your daily limit of ¥0.001" in line and "%qwen limit daily" in line
    assert gateway.requests == [] and open_reservations(shell) == []
    # One that fits: held while it runs, settled to what it cost.
    run_cell(shell, "%qwen limit daily 5")
    gateway.load(delay=0.2)
    seen: list = []
    gateway.script_matching("review 0", Reply(text="ok"))
    import threading

    ended = threading.Event()

    def watch() -> None:  # the hold, seen while the job runs (however long its planning takes)
        while not ended.is_set() and not seen:
            seen.extend(open_reservations(shell))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert run_cell(shell, "%%qwen --map rows -o out --max-tokens 20 -m qwen-plus\nClassify {item}").success
    finally:
        ended.set()
        watcher.join()
    assert len(seen) == 1 and seen[0][1] == "--map rows (30 rows)" and seen[0][0] > 0
    assert open_reservations(shell) == []
    magics = shell.magics_manager.registry["QwenMagic"]
    spent = magics.session.store(magics.settings()).spent_since("CNY", 0)
    assert spent == pytest.approx(shell.user_ns["out"].cost) and spent > 0


def test_a_singapore_job_is_priced_and_shown_in_dollars(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.region = 'singapore'")
    shell.user_ns["rows"] = ["a", "b"]
    assert run_cell(shell, "%%qwen --map rows -o out -m qwen-flash\nWord: {item}").success
    printed = shown(capsys)
    out = shell.user_ns["out"]
    assert out.currency == "USD" and "$" in printed and "¥" not in printed
    assert "$" in repr(out) and "$" in pretty(out)
    session = session_of(shell)
    assert session.ledger.records[-1].currency == "USD"
    assert session.ledger.total_in("USD") == pytest.approx(out.cost) and session.ledger.total_in("CNY") == 0
    magics = shell.magics_manager.registry["QwenMagic"]
    [(currency, region)] = magics.session.store(magics.settings())._db.execute(
        "SELECT currency, region FROM calls").fetchall()
    assert (currency, region) == ("USD", "singapore")
    dry = pretty(run_cell(shell, "%%qwen --map rows --dry-run -m qwen-flash\nOther: {item}").result)
    assert "$" in dry and "¥" not in dry


def test_schema_rows_are_validated_and_give_one_column_per_field(shell, gateway: Gateway, capsys) -> None:
    from dataclasses import dataclass

    @dataclass
    class Review:
        sentiment: str
        stars: int

    shell.user_ns["Review"] = Review
    gateway.script_matching("love", Reply(text=json.dumps({"sentiment": "positive", "stars": 5})))
    gateway.script_matching("hate", Reply(text=json.dumps({"sentiment": "negative", "stars": 1})))
    gateway.script_matching("meh", Reply(text=json.dumps({"sentiment": "neutral", "stars": "three"})))
    shell.user_ns["rows"] = pd.Series(["I love it", "I hate it", "meh"], index=["a", "b", "c"])
    assert run_cell(shell, "%%qwen --map rows --schema Review -o out -m qwen-flash\nRate: {item}").success
    printed = shown(capsys)
    out = shell.user_ns["out"]
    assert out.values[:2] == [Review("positive", 5), Review("negative", 1)] and out.values[2] is None
    assert out.failed == [2] and out[2].error == "SchemaMismatch" and "field stars" in out[2].message
    assert '"three"' in out[2].text  # the answer as it came is kept
    assert "Failed rows (SchemaMismatch ×1): 'c'." in printed
    frame = out.to_frame()
    assert list(frame.columns) == ["sentiment", "stars"] and list(frame.index) == ["a", "b", "c"]
    assert frame.loc["a", "stars"] == 5 and frame.loc["b", "sentiment"] == "negative"
    assert frame.loc["c"].isna().all()
    # qwen-flash has no strict json_schema: json_object, with the schema said in the system prompt.
    request = gateway.requests[0]
    assert request.parameters.get("response_format") == {"type": "json_object"}
    assert '"stars"' in request.messages[0]["content"] and request.messages[0]["role"] == "system"
    # Rows that validated are resumed as instances; the failed one is sent again.
    gateway.reset()
    assert run_cell(shell, "%%qwen --map rows --schema Review -o again -m qwen-flash\nRate: {item}").success
    assert asked(gateway) == ["Rate: meh"] and shell.user_ns["again"].values[0] == Review("positive", 5)


def test_a_schema_model_that_takes_json_schema_asks_strictly(shell, gateway: Gateway) -> None:
    shell.user_ns["Fields"] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    gateway.script_matching("Hangzhou", Reply(text=json.dumps({"city": "Hangzhou"})))
    shell.user_ns["rows"] = ["in Hangzhou"]
    assert run_cell(shell, "%%qwen --map rows --schema Fields -o out -m qwen-plus\nWhere: {item}").success
    [request] = gateway.requests
    assert request.parameters["response_format"]["type"] == "json_schema"
    assert request.parameters["response_format"]["json_schema"]["strict"] is True
    assert shell.user_ns["out"].to_frame().to_dict("records") == [{"city": "Hangzhou"}]
