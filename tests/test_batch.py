"""Batch jobs: the client (qwen_magic.jobs.batch) against the gateway's Batch API over real
HTTP, the job records in the history file, and %qwen jobs in a real IPython shell."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dashscope  # noqa: F401  (imported before the gateway thread warms the tokenizer up, which imports it too)
import pytest
from IPython.core.error import UsageError

from qwen_magic.catalog import builtin_catalog
from qwen_magic.client import Connection, QwenAPIError, Usage
from qwen_magic.gateway import INVALID_API_KEY, Gateway, Reply, default_answer
from qwen_magic.jobs import batch
from qwen_magic.jobs.batch import BatchLine, PollPolicy
from qwen_magic.pricing import batch_line_cost, call_cost
from qwen_magic.store import Store

from .conftest import TEST_KEY, run_cell, shown

FAST = PollPolicy(first=0.02, most=0.1)


@pytest.fixture
def gw(gateway):
    gateway.configure_batches(stage_seconds=0.1)
    return gateway


@pytest.fixture
def connection(gw, isolated_env) -> Connection:
    return Connection(api_key=TEST_KEY, base_url=gw.base_url)


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def rows(count: int, model: str = "qwen-plus", start: int = 0) -> list[BatchLine]:
    return [BatchLine(str(key), model, ({"role": "user", "content": f"Review {key}: fine."},), {"temperature": 0.2})
            for key in range(start, start + count)]


def uploads(gw) -> list:
    return [r for r in gw.all_requests if r.method == "POST" and r.path.endswith("/files")]


def submit(connection, store, lines, **options):
    options.setdefault("notebook", "reviews.ipynb")
    options.setdefault("cell_key", "cell-1")
    return batch.submit_job(connection, lines, store=store, **options)


def test_a_job_is_submitted_polled_to_completion_and_collected(gw, connection, store):
    lines = rows(5)
    job = submit(connection, store, lines, template_digest="t1")
    assert job.status == "validating" and len(job.parts) == 1 and job.rows == 5
    sent = gw.all_requests
    assert [r.path for r in sent if r.method == "POST"] == [
        "/compatible-mode/v1/files", "/compatible-mode/v1/batches"]
    created = next(r for r in sent if r.path.endswith("/batches"))
    assert created.body["endpoint"] == "/v1/chat/completions" and created.body["completion_window"] == "24h"
    seen: list[str] = []
    batch.wait(connection, job, store, poll=FAST, on_change=lambda j: seen.append(j.status))
    assert job.status == "completed" and seen[-1] == "completed" and ("in_progress" in seen or "finalizing" in seen)
    outcomes = batch.collect(connection, job, store)
    assert sorted(outcomes, key=int) == [line.custom_id for line in lines]
    plus = builtin_catalog().get("qwen-plus")
    for line in lines:
        outcome = outcomes[line.custom_id]
        assert outcome.ok and outcome.request_id and outcome.finish_reason == "stop"
        assert outcome.text == default_answer("qwen-plus", list(line.messages))
        assert outcome.usage.input_tokens > 0 and outcome.usage.output_tokens > 0
        assert outcome.cost == pytest.approx(call_cost(plus, outcome.usage) / 2)
    assert job.cost == pytest.approx(sum(o.cost for o in outcomes.values()))
    stored = store.batch_job(job.id)
    assert (stored["status"], stored["completed"], stored["failed"], stored["rows"]) == ("completed", 5, 0, 5)
    assert stored["cost"] == pytest.approx(job.cost) and stored["finished_at"] >= stored["submitted_at"]
    assert stored["template_digest"] == "t1" and stored["batch_ids"] == job.batch_ids


def test_each_line_goes_out_as_the_service_expects(gw, connection, store):
    submit(connection, store, rows(2))
    # The gateway keeps the uploaded file; read it back through the client's own transport.
    client, region = batch.batch_client(connection)
    assert region == "cn-beijing" and client.base_url == gw.compatible_base_url
    job = batch.find_job(store, "reviews.ipynb", "cell-1")
    content = client.content(job.parts[0].input_file_id).decode()
    import json

    first = json.loads(content.splitlines()[0])
    assert first == {"custom_id": "0", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "Review 0: fine."}],
                              "temperature": 0.2}}


def test_output_in_any_order_is_matched_by_custom_id(gw, connection, store):
    gw.configure_batches(lines={str(key): Reply(text=f"answer for row {key}") for key in range(30)})
    job = submit(connection, store, rows(30))
    batch.wait(connection, job, store, poll=FAST)
    client, _ = batch.batch_client(connection)
    written = client.content(job.parts[0].output_file_id).decode().splitlines()
    order = [batch.parse_line(text).custom_id for text in written]
    assert sorted(order, key=int) == [str(key) for key in range(30)]
    assert order != [str(key) for key in range(30)]  # the gateway wrote them out of order
    outcomes = batch.collect(connection, job, store)
    assert {key: outcome.text for key, outcome in outcomes.items()} == {
        str(key): f"answer for row {key}" for key in range(30)}


def test_failed_lines_carry_their_error_and_cost_nothing(gw, connection, store):
    gw.configure_batches(lines={"1": Reply(error_code="DataInspectionFailed"),
                                "3": Reply(status=500)})
    job = submit(connection, store, rows(4))
    batch.wait(connection, job, store, poll=FAST)
    assert (job.completed, job.failed) == (2, 2)
    outcomes = batch.collect(connection, job, store)
    assert not outcomes["1"].ok and outcomes["1"].error_code == "DataInspectionFailed"
    assert outcomes["1"].error_message and outcomes["1"].request_id and outcomes["1"].cost == 0
    assert outcomes["3"].error_code == "InternalError" and outcomes["3"].text is None
    assert outcomes["0"].ok and outcomes["2"].ok
    assert job.cost == pytest.approx(outcomes["0"].cost + outcomes["2"].cost) and job.cost > 0


def test_cancel_keeps_the_finished_lines(gw, connection, store):
    gw.configure_batches(stage_seconds=0.5)
    job = submit(connection, store, rows(20))
    deadline = time.monotonic() + 5
    while job.completed == 0 and time.monotonic() < deadline:
        batch.refresh(connection, job, store)
        time.sleep(0.05)
    batch.cancel(connection, job, store)
    assert job.status == "cancelling" and store.batch_job(job.id)["status"] == "cancelling"
    finished = job.completed
    assert 0 < finished < 20
    batch.wait(connection, job, store, poll=FAST)
    assert job.status == "cancelled" and job.completed == finished
    outcomes = batch.collect(connection, job, store)
    assert len(outcomes) == finished and all(outcome.ok for outcome in outcomes.values())


def test_a_job_over_the_line_limit_is_split_into_several_batches(gw, connection, store):
    job = submit(connection, store, rows(7), max_lines=3)
    assert [part.rows for part in job.parts] == [3, 3, 1] and len(uploads(gw)) == 3
    assert len(set(job.batch_ids)) == 3
    batch.wait(connection, job, store, poll=FAST)
    assert job.status == "completed" and job.completed == 7
    assert sorted(batch.collect(connection, job, store), key=int) == [str(key) for key in range(7)]
    assert store.batch_job(job.batch_ids[2])["id"] == job.id  # found by any of its batch ids


def test_split_by_size_keeps_every_line_whole():
    encoded = [line.encoded() for line in rows(10)]
    files = batch.split(encoded, max_bytes=len(encoded[0]) * 4)
    assert [len(f) for f in files] == [4, 4, 2] and [l for f in files for l in f] == encoded
    assert batch.split([], max_lines=2) == []


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        (rows(2, model="qwen-turbo-0206"), "does not serve qwen-turbo-0206 in Beijing"),
        (rows(2) + rows(1, model="qwen-max", start=2), "One batch job takes one model"),
        (rows(1, model="my-own-model"), "batch_regions"),
        (rows(1) + rows(1), "share the key '0'"),
        ([], "at least one row"),
    ],
)
def test_refused_before_any_upload(gw, connection, store, lines, said):
    with pytest.raises(UsageError) as refused:
        submit(connection, store, lines)
    message = str(refused.value)
    assert said in message and "\n" not in message and TEST_KEY not in message
    assert uploads(gw) == [] and store.batch_jobs() == []


def test_a_region_without_the_model_in_batch_refuses_it_before_sending(isolated_env, store):
    singapore = Connection(api_key=TEST_KEY, base_url="https://dashscope-intl.aliyuncs.com/api/v1")
    with pytest.raises(UsageError, match="does not serve qwen3-max in Singapore; there it serves qwen-flash, "
                                         "qwen-max, qwen-plus, qwen-turbo"):
        submit(singapore, store, rows(1, model="qwen3-max"))
    with pytest.raises(UsageError, match="completion window"):
        submit(singapore, store, rows(1), window="12h")
    assert batch.window_hours("14d") == 336 and batch.window_hours("48h") == 48


def test_rerunning_after_a_restart_attaches_to_the_same_job(gw, connection, tmp_path):
    path = tmp_path / "history.sqlite3"
    first = Store(path)
    job = submit(connection, first, rows(3), template_digest="t1")
    first.close()  # the kernel goes away

    again = Store(path)  # a new kernel on the same history file
    try:
        found = batch.find_job(again, "reviews.ipynb", "cell-1", "t1")
        assert found is not None and found.id == job.id and found.batch_ids == job.batch_ids
        assert batch.find_job(again, "reviews.ipynb", "cell-1", "another template") is None
        assert batch.find_job(again, "other.ipynb", "cell-1") is None
        batch.wait(connection, found, again, poll=FAST)
        assert found.status == "completed" and len(batch.collect(connection, found, again)) == 3
        assert len(uploads(gw)) == 1  # attached: nothing was submitted twice
    finally:
        again.close()


def test_capacity_refusal_is_one_line_and_leaves_no_job(gw, connection, store):
    gw.configure_batches(capacity_refusals=1)
    with pytest.raises(QwenAPIError) as refused:
        submit(connection, store, rows(2))
    line = str(refused.value)
    assert refused.value.status == 429 and "capacity" in line and "\n" not in line and TEST_KEY not in line
    assert store.batch_jobs() == []  # nothing runs: the next run submits afresh


def test_a_later_batch_refused_cancels_those_already_created(gw, connection, store):
    gw.configure_batches(stage_seconds=5, capacity_refusals=1, capacity_after=1)
    with pytest.raises(QwenAPIError):
        submit(connection, store, rows(4), max_lines=2)
    [row] = store.batch_jobs()
    job = batch.BatchJob.from_row(row)
    assert len(job.parts) == 1 and job.status == "cancelling"
    cancels = [r for r in gw.all_requests if r.path.endswith("/cancel")]
    assert [r.path for r in cancels] == [f"/compatible-mode/v1/batches/{job.batch_ids[0]}/cancel"]


def test_a_wrong_key_is_one_line_that_never_shows_the_key(gw, isolated_env, store):
    wrong = Connection(api_key=INVALID_API_KEY, base_url=gw.base_url)
    with pytest.raises(QwenAPIError) as refused:
        submit(wrong, store, rows(1))
    assert refused.value.code == "invalid_api_key" and "region" in str(refused.value)
    with pytest.raises(UsageError, match="No DashScope API key"):
        submit(Connection(base_url=gw.base_url), store, rows(1))


def test_the_key_is_in_no_error_record_or_file(isolated_env, store, tmp_path):
    with Gateway() as own:
        connection = Connection(api_key=TEST_KEY, base_url=own.base_url)
        job = submit(connection, store, rows(2))
    # The server went away mid-job.
    with pytest.raises(QwenAPIError) as failed:
        batch.refresh(connection, job, store)
    assert failed.value.code == "ConnectionError" and TEST_KEY not in str(failed.value)
    assert TEST_KEY not in repr(job) and TEST_KEY not in repr(store.batch_job(job.id))
    for path in tmp_path.glob("jobs.sqlite3*"):
        assert TEST_KEY.encode() not in path.read_bytes()


def test_batch_price_is_half_the_real_time_price_without_cache_discount():
    plus = builtin_catalog().get("qwen-plus")
    usage = Usage(input_tokens=1000, output_tokens=500)
    assert batch_line_cost(plus, usage) == pytest.approx(call_cost(plus, usage) / 2)
    cached = Usage(input_tokens=1000, output_tokens=500, cached_tokens=800)
    assert batch_line_cost(plus, cached) == batch_line_cost(plus, usage)
    assert batch_line_cost(None, usage) is None


def test_a_background_refresher_reports_changes_and_completion(gw, connection, store, tmp_path):
    job = submit(connection, store, rows(4))
    changes: list[str] = []
    done = threading.Event()
    refresher = batch.JobRefresher(connection, job, store.path, poll=FAST,
                                   on_change=lambda j: changes.append(j.status), on_done=lambda j: done.set())
    refresher.start()
    assert done.wait(5) and refresher.error is None
    stages = ["validating", "in_progress", "finalizing", "completed"]
    assert changes[-1] == "completed" and changes == sorted(changes, key=stages.index)
    refresher.stop()
    assert not refresher.running and store.batch_job(job.id)["status"] == "completed"


def test_a_refresher_stops_when_asked(gw, connection, store):
    gw.configure_batches(stage_seconds=30)
    job = submit(connection, store, rows(1))
    refresher = batch.JobRefresher(connection, job, None, poll=FAST).start()
    time.sleep(0.1)
    started = time.monotonic()
    refresher.stop()
    assert not refresher.running and time.monotonic() - started < 1 and job.status == "validating"


def test_poll_intervals_grow_to_at_most_a_minute():
    intervals = batch.PollPolicy().intervals()
    seen = [next(intervals) for _ in range(20)]
    assert seen[0] == 2.0 and seen == sorted(seen) and seen[-1] == 60.0


# --------------------------------------------------------------------------- %qwen jobs


def _magics(shell):
    return shell.magics_manager.registry["QwenMagic"]


def test_qwen_jobs_lists_cancels_and_waits_in_the_shell(shell, gw, capsys, monkeypatch):
    monkeypatch.setattr(batch, "DEFAULT_POLL", FAST)
    gw.configure_batches(stage_seconds=0.5)
    magics = _magics(shell)
    assert shell.run_line_magic("qwen", "jobs").rows == ()  # the magic sets the session's notebook key
    store = magics.session.store(magics.settings())
    connection = magics.session.connection(magics.settings())
    job = submit(connection, store, rows(20), notebook=magics.session.notebook, cell_key="cell-abc")
    other = submit(connection, store, rows(2), notebook=magics.session.notebook, cell_key="cell-def")

    table = shell.run_line_magic("qwen", "jobs")
    assert table.header == ("job", "notebook · cell", "rows", "status", "counts", "submitted", "cost")
    listed = {row[0]: row for row in table.rows}
    assert set(listed) == {job.id, other.id}
    assert listed[job.id][1] == f"{magics.session.notebook} · cell-abc" and listed[job.id][2] == "20"
    assert listed[job.id][3] in ("validating", "in_progress")

    time.sleep(0.6)  # into in_progress: some rows finish before the cancel
    said = shell.run_line_magic("qwen", f"jobs cancel {job.id}")
    assert said.startswith(f"Cancelling job {job.id} (1 batch(es))")
    assert store.batch_job(job.id)["status"] == "cancelling"
    with pytest.raises(UsageError, match="No batch job 'job-nope'"):
        shell.run_line_magic("qwen", "jobs cancel job-nope")

    finished = shell.run_line_magic("qwen", f"jobs wait {other.batch_ids[0]}")
    assert finished.startswith(f"Job {other.id} completed: 2 row(s) answered, 0 failed, ¥0.")
    waited = shell.run_line_magic("qwen", "jobs wait")  # the notebook's running job: the cancelled one
    assert waited.startswith(f"Job {job.id} cancelled:")
    with pytest.raises(UsageError, match="already finished"):
        shell.run_line_magic("qwen", f"jobs cancel {job.id}")
    with pytest.raises(UsageError, match="No batch job of this notebook is running"):
        shell.run_line_magic("qwen", "jobs wait")

    outcome = run_cell(shell, "%qwen jobs")
    text = shown(capsys)
    assert outcome.success and "Batch jobs (newest first)" in text and "cancelled" in text
    assert f"{other.id}" in text and "2 done, 0 failed" in text
    assert TEST_KEY not in text


def test_qwen_jobs_mistakes_are_one_line(shell, capsys):
    from .conftest import refusal

    assert "%qwen jobs cancel ID" in refusal(shell, capsys, "%qwen jobs stop now")
    assert "No batch job" in refusal(shell, capsys, "%qwen jobs wait job-unknown")
    empty = shell.run_line_magic("qwen", "jobs")
    assert empty.rows == () and empty.notes == ("No batch jobs yet.",)


def test_an_interrupt_stops_the_waiting_not_the_job(shell, gw, capsys, monkeypatch):
    import os
    import signal

    monkeypatch.setattr(batch, "DEFAULT_POLL", FAST)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # ■ in a kernel: KeyboardInterrupt
    gw.configure_batches(stage_seconds=30)
    magics = _magics(shell)
    shell.run_line_magic("qwen", "jobs")
    job = submit(connection=magics.session.connection(magics.settings()), store=magics.session.store(magics.settings()),
                 lines=rows(3), notebook=magics.session.notebook)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        started = time.monotonic()
        said = shell.run_line_magic("qwen", "jobs wait")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 2
    assert said == (f"Stopped waiting: job {job.id} goes on at DashScope (validating, 0/3 done). "
                    f"%qwen jobs wait {job.id} picks it up again.")
    assert f"\r{job.id}: validating, 0/3 done" in shown(capsys)
    batch_id = job.batch_ids[0]
    assert not any(r.path.endswith(f"{batch_id}/cancel") for r in gw.all_requests)


def test_a_model_the_gateway_does_not_batch_is_a_404_line_with_advice(gw, connection, store):
    # The catalog may be told a model is batched when the service does not batch it (yet).
    catalog = builtin_catalog().with_overrides({"qwen-turbo-0206": {"batch_regions": ["cn-beijing"]}}, "test")
    with pytest.raises(QwenAPIError) as refused:
        submit(connection, store, rows(1, model="qwen-turbo-0206"), catalog=catalog)
    assert refused.value.status == 404 and refused.value.code == "model_not_found"
    assert "not offered in the Batch API of this region" in str(refused.value)
    assert store.batch_jobs() == []


def test_an_older_history_file_gains_the_jobs_table_and_keeps_its_turns(tmp_path):
    import sqlite3

    from qwen_magic import store as store_module

    ours = next(i for i, script in enumerate(store_module.MIGRATIONS) if "CREATE TABLE batch_jobs" in script)
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for script in store_module.MIGRATIONS[:ours]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version = {ours}")
    db.execute("INSERT INTO turns (notebook, chat, position, cell_id, record, updated_at) "
               "VALUES ('nb', 'default', 1, NULL, '{}', 0)")
    db.commit()
    db.close()
    upgraded = Store(path)
    try:
        assert upgraded.turns("nb", "default") == [{}] and upgraded.batch_jobs() == []
        job = batch.BatchJob(id="job-1", notebook="nb", cell_key="c", template_digest="", model="qwen-plus",
                             rows=1, window="24h", parts=[batch.BatchPart("batch_1", "file-1", 1)])
        upgraded.save_batch_job(job.to_row())
        assert batch.load_job(upgraded, "batch_1") == job
    finally:
        upgraded.close()


# --------------------------------------------------------------------------- %%qwen --map ... --batch


BATCH_CELL = "%%qwen --map reviews --batch -o labels -m qwen-flash\nClassify: {item}"


@pytest.fixture
def quick_polls(monkeypatch):
    monkeypatch.setattr(batch, "DEFAULT_POLL", FAST)


def chat_requests(gw) -> list:
    return [r for r in gw.all_requests if r.path.endswith(("/generation", "/chat/completions"))]


def stored_rows(magics, job_key: str) -> dict:
    return magics.session.store(magics.settings()).job_rows(job_key)


def test_a_batch_cell_returns_at_once_and_fills_in_at_the_batch_price(shell, gw, capsys, quick_polls):
    from IPython.lib.pretty import pretty

    from qwen_magic.jobs.results import MapResult

    gw.configure_batches(stage_seconds=0.3)
    shell.user_ns["reviews"] = ["good kettle", "bad lamp", "fine cup"]
    started = time.monotonic()
    outcome = run_cell(shell, BATCH_CELL)
    assert outcome.success and time.monotonic() - started < 1.0  # the job runs at DashScope, not in the cell
    said = shown(capsys)
    labels = shell.user_ns["labels"]
    assert isinstance(labels, MapResult) and labels.pending == [0, 1, 2] and labels.job
    assert f"Batch job {labels.job}: 3 rows on qwen-flash · validating" in said
    assert "labels fills in when the job ends; labels.wait() waits for it" in said

    assert labels.wait() is labels
    assert labels.pending == [] and labels.done == 3 and labels.failed == []
    flash = builtin_catalog().get("qwen-flash")
    for position, review in enumerate(shell.user_ns["reviews"]):
        row = labels[position]
        assert f"You said: Classify: {review}" in row.text and row.key == position
        assert row.cost == pytest.approx(call_cost(flash, row.usage) / 2) and row.cost > 0
    assert chat_requests(gw) == [] and len(uploads(gw)) == 1
    # Lines matched by custom_id: the row's digest, one line per row.
    [uploaded] = uploads(gw)
    summary = pretty(labels)
    assert "3 rows on qwen-flash: 3 done" in summary and "at the batch price (50%)" in summary
    assert TEST_KEY not in said + summary
    # One line of the ledger and of %qwen usage, with the row count; one call in the history.
    magics = _magics(shell)
    [record] = magics.session.ledger.records
    assert record.rows == 3 and record.cost == pytest.approx(labels.cost) and record.currency == "CNY"
    assert "(batch, 3 rows)" in pretty(run_cell(shell, "%qwen usage").result) and record.batch
    store = magics.session.store(magics.settings())
    [(currency, cost)] = store._db.execute("SELECT currency, cost FROM calls").fetchall()
    assert currency == "CNY" and cost == pytest.approx(labels.cost)
    job = batch.load_job(store, labels.job)
    assert job.status == "completed" and len(stored_rows(magics, job.cell_key)) == 3


def test_running_the_cell_again_attaches_and_never_submits_twice(shell, gw, capsys, quick_polls):
    gw.configure_batches(stage_seconds=0.5)
    shell.user_ns["reviews"] = ["a", "b"]
    assert run_cell(shell, BATCH_CELL).success
    first = shell.user_ns["labels"]
    assert run_cell(shell, BATCH_CELL).success  # while it runs
    assert shell.user_ns["labels"] is first and len(uploads(gw)) == 1
    first.wait()
    capsys.readouterr()
    assert run_cell(shell, BATCH_CELL).success  # once it has ended: the stored answers, nothing sent
    again = shell.user_ns["labels"]
    assert again.texts == first.texts and again.done == 2 and again.resumed == 2
    assert "resumed: 2 done before, 0 sent in this run" in shown(capsys)
    assert len(uploads(gw)) == 1 and chat_requests(gw) == []
    assert len(_magics(shell).session.ledger.records) == 1  # counted once


def test_a_later_map_resumes_from_the_batch_and_a_batch_from_a_map(shell, gw, capsys, quick_polls):
    shell.user_ns["reviews"] = ["a", "b", "c"]
    assert run_cell(shell, BATCH_CELL).success
    shell.user_ns["labels"].wait()
    assert run_cell(shell, "%%qwen --map reviews -o again -m qwen-flash\nClassify: {item}").success
    assert chat_requests(gw) == [] and shell.user_ns["again"].texts == shell.user_ns["labels"].texts
    assert "resumed: 3 done, 0 to go" in shown(capsys)
    # The other way round: rows answered in real time are not sent in the batch.
    shell.user_ns["reviews"] = ["a", "b", "c", "d"]
    assert run_cell(shell, "%%qwen --map reviews -m qwen-flash -t 0.5\nSort: {item}").success
    assert len(chat_requests(gw)) == 4
    shell.user_ns["reviews"].append("e")
    assert run_cell(shell, "%%qwen --map reviews --batch -o more -m qwen-flash -t 0.5\nSort: {item}").success
    more = shell.user_ns["more"].wait()
    assert more.done == 5 and more.resumed == 4 and len(chat_requests(gw)) == 4
    client, _ = batch.batch_client(_magics(shell).session.connection(_magics(shell).settings()))
    job = batch.load_job(_magics(shell).session.store(_magics(shell).settings()), more.job)
    sent = client.content(job.parts[0].input_file_id).decode().splitlines()
    assert len(sent) == 1 and "Sort: e" in sent[0]


def test_cancel_from_qwen_jobs_keeps_the_rows_answered(shell, gw, capsys, quick_polls):
    gw.configure_batches(stage_seconds=0.5)
    shell.user_ns["reviews"] = [f"review {n}" for n in range(20)]
    assert run_cell(shell, BATCH_CELL).success
    labels = shell.user_ns["labels"]
    deadline = time.monotonic() + 5
    store = _magics(shell).session.store(_magics(shell).settings())
    while batch.load_job(store, labels.job).completed == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    said = shell.run_line_magic("qwen", f"jobs cancel {labels.job}")
    assert said.startswith(f"Cancelling job {labels.job}")
    labels.wait()
    assert 0 < labels.done < 20 and len(labels.not_run) == 20 - labels.done
    assert f"Batch job {labels.job} ended cancelled" in pretty_of(labels)
    assert _magics(shell).session.ledger.records[-1].status == "interrupted"


def pretty_of(value) -> str:
    from IPython.lib.pretty import pretty

    return pretty(value)


def test_qwen_jobs_wait_fills_the_cells_result_and_counts_it_once(shell, gw, capsys, quick_polls):
    shell.user_ns["reviews"] = ["x", "y"]
    assert run_cell(shell, BATCH_CELL).success
    labels = shell.user_ns["labels"]
    said = shell.run_line_magic("qwen", f"jobs wait {labels.job}")
    assert said.startswith(f"Job {labels.job} completed: 2 row(s) answered, 0 failed, ¥0.")
    assert labels.pending == [] and labels.done == 2
    labels.wait()
    assert len(_magics(shell).session.ledger.records) == 1


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        ("%%qwen --map reviews --batch -m qwen-turbo-0206\nW {item}", "does not serve qwen-turbo-0206 in Beijing"),
        ("%%qwen --map reviews --batch --batch-window 12h -m qwen-flash\nW {item}", "completion window"),
        ("%%qwen --map reviews --batch --concurrency 4 -m qwen-flash\nW {item}", "--concurrency cannot be used with --batch"),
        ("%%qwen --batch -m qwen-flash\nW", "--batch is for jobs over rows: add --map NAME."),
        ("%%qwen --map reviews --batch-window 48h -m qwen-flash\nW {item}", "--batch-window is the completion window"),
        ("%%qwen --map reviews --tools len\nW {item}", "--tools cannot be used with --map"),
        ("%%qwen --map reviews --fix\nW {item}", "--fix cannot be used with --map"),
        ("%%qwen --map reviews --cells 2\nW {item}", "--cells cannot be used with --map"),
        ("%%qwen --map reviews --file notes.md\nW {item}", "--file cannot be used with --map"),
    ],
)
def test_a_batch_job_that_cannot_be_sent_is_one_line_before_any_upload(shell, gw, capsys, cell, said):
    from .conftest import refusal

    shell.user_ns["reviews"] = ["a"]
    assert said in refusal(shell, capsys, cell)
    assert uploads(gw) == [] and chat_requests(gw) == []


def test_a_batch_job_over_the_budget_is_refused_at_the_batch_price(shell, gw, capsys):
    from .conftest import refusal

    shell.user_ns["reviews"] = [f"review {n}" for n in range(40)]
    run_cell(shell, "%qwen budget 0.0001")
    line = refusal(shell, capsys, "%%qwen --map reviews --batch -m qwen-plus\nClassify {item}")
    assert "Refused, nothing sent: these 40 rows could cost up to" in line and "the session budget" in line
    assert uploads(gw) == []


def test_the_dry_run_says_when_the_job_would_be_split(shell, gw, monkeypatch):
    from IPython.lib.pretty import pretty

    shell.user_ns["reviews"] = [f"review {n}" for n in range(5)]
    text = pretty(run_cell(shell, "%%qwen --map reviews --batch --dry-run -m qwen-flash\nW {item}").result)
    assert "5 requests" in text and "in one batch" in text
    monkeypatch.setattr(batch, "MAX_LINES", 2)
    text = pretty(run_cell(shell, "%%qwen --map reviews --batch --dry-run -m qwen-flash\nW {item}").result)
    assert "split into 3 batches: a batch takes at most 50,000 requests and 500 MB" in text
    assert uploads(gw) == []


@pytest.mark.kernel
def test_after_a_kernel_restart_the_cell_attaches_to_its_job(gw, tmp_path):
    import json

    from .kernel_harness import KernelSession, kernel_env

    gw.configure_batches(stage_seconds=1.0)
    env = kernel_env(tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gw.base_url,
                     JPY_SESSION_NAME="batch.ipynb")
    setup = ("%load_ext qwen_magic\nfrom qwen_magic.jobs import batch\n"
             "batch.DEFAULT_POLL = batch.PollPolicy(first=0.05, most=0.2)\nreviews = ['good', 'bad', 'meh']")
    cell = "%%qwen --map reviews --batch -o labels -m qwen-flash\nClassify: {item}"
    kernel = KernelSession(env, cwd=tmp_path)
    try:
        assert kernel.execute(setup).status == "ok"
        submitted = kernel.execute(cell)
        assert submitted.status == "ok"
        [view] = [o for o in submitted.outputs if o["output_type"] == "display_data"]
        assert "· validating" in view["data"]["text/plain"] and "qwen-batch-progress" in view["data"]["text/html"]
        job = kernel.execute("print(labels.job)").stdout.strip()
    finally:
        kernel.shutdown()  # the kernel goes away; the job goes on at DashScope
    kernel = KernelSession(env, cwd=tmp_path)
    try:
        assert kernel.execute(setup).status == "ok"
        again = kernel.execute(cell)
        assert again.status == "ok"
        text = "".join(o["data"]["text/plain"] for o in again.outputs if o["output_type"] == "display_data")
        assert f"attached to batch job {job}" in text
        waited = kernel.execute("labels.wait(); print(json.dumps([labels.job, labels.done, labels.texts]))"
                                .replace("json.", "__import__('json')."))
        assert waited.status == "ok", waited.error
        done_job, done, texts = json.loads(waited.stdout.strip().splitlines()[-1])
        assert done_job == job and done == 3 and "You said: Classify: bad" in texts[1]
        assert len(uploads(gw)) == 1  # attached: never submitted twice
        # The summary replaced the status under the submitting cell of this kernel.
        summaries = [m for m in waited.messages if m.msg_type == "update_display_data"]
        assert any("3 rows on qwen-flash: 3 done" in m.content["data"]["text/plain"] for m in summaries)
    finally:
        kernel.shutdown()


def test_a_daily_limit_holds_a_batch_jobs_worst_case_until_it_ends(shell, gw, capsys, quick_polls):
    from .conftest import refusal

    gw.configure_batches(stage_seconds=0.3)
    magics = _magics(shell)
    store = magics.session.store(magics.settings())
    shell.user_ns["reviews"] = [f"review {n}" for n in range(30)]
    run_cell(shell, "%qwen limit daily 0.0001")
    line = refusal(shell, capsys, "%%qwen --map reviews --batch -m qwen-plus\nClassify {item}")
    assert "more than is left of your daily limit" in line and uploads(gw) == []
    run_cell(shell, "%qwen limit daily 5")
    assert run_cell(shell, "%%qwen --map reviews --batch -o labels -m qwen-plus --max-tokens 300\n"
                           "Classify {item}").success
    [(amount, what)] = store._db.execute("SELECT amount, what FROM reservations").fetchall()
    assert what == "--map reviews --batch (30 rows)" and amount > 0
    labels = shell.user_ns["labels"].wait()
    assert store._db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    assert labels.cost < amount and store.spent_since("CNY", 0) == pytest.approx(labels.cost)


def test_an_interrupt_stops_waiting_for_a_batch_cell_with_one_line(shell, gw, capsys, quick_polls):
    import os
    import signal

    from qwen_magic.jobs.batched import BatchWaitStopped

    gw.configure_batches(stage_seconds=30)
    shell.user_ns["reviews"] = ["a", "b"]
    assert run_cell(shell, BATCH_CELL).success
    labels = shell.user_ns["labels"]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(BatchWaitStopped) as stopped:
            labels.wait()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    [line] = stopped.value._render_traceback_()
    assert line.startswith(f"KeyboardInterrupt: Stopped waiting: batch job {labels.job} goes on at DashScope")
    assert "labels.wait() waits again" in line and labels.pending == [0, 1]
    assert not any(r.path.endswith("/cancel") for r in gw.all_requests)
