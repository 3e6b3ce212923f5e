"""Hostile input and faults around the history file, the chats and the %qwen commands.

Each case ends in one clear line (or a note under the answer), loses nothing it did not say
it lost, and leaves the session usable. Real shells, real kernels, real SQLite files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.client import Usage
from qwen_magic.conversation import Turn
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.result import QwenResult
from qwen_magic.store import Store

from .conftest import TEST_KEY, refusal, shown
from .conftest import run_cell as run
from .kernel_harness import KernelSession, kernel_env


def session_of(shell):
    return shell.magics_manager.registry["QwenMagic"].session


def stored_prompts(path: Path, notebook: str | None = None, chat: str = "default") -> list[str]:
    db = sqlite3.connect(path)
    try:
        query = "SELECT record FROM turns WHERE chat = ?" + (" AND notebook = ?" if notebook else "") + " ORDER BY position"
        rows = db.execute(query, (chat, notebook) if notebook else (chat,)).fetchall()
    finally:
        db.close()
    return [json.loads(row[0])["prompt"] for row in rows]


def store_path(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"  # QWEN_MAGIC_STORE of the isolated_env fixture


# ---- 1. %qwen usage after a --no-history call


def test_usage_lists_a_one_off_call_and_keeps_working(shell, gateway: Gateway, capsys) -> None:
    assert run(shell, "%%qwen --no-history\nOne-off question").success
    assert run(shell, "%%qwen\nIn the chat").success
    for _ in range(2):  # the rest of the session, not only the next command
        report = shell.run_line_magic("qwen", "usage")
        text = pretty(report)
        html = report._repr_html_()
        assert "(one-off)" in text and "(one-off)" in html
        assert "default" in text and "total:" in text
    assert run(shell, "%qwen usage").success
    assert "Traceback" not in shown(capsys)


# ---- 5. %qwen resume --from a notebook of the wrong shape


def _answer_output(record: Any, *, markdown: Any = "An answer.\n\n*footer*") -> dict[str, Any]:
    return {"output_type": "display_data", "data": {"text/markdown": markdown},
            "metadata": {"qwen_magic": record}}


def _record(**fields: Any) -> dict[str, Any]:
    record = {"version": 1, "prompt": "A question", "text": "An answer.", "chat": "default", "turn": 1,
              "model": "qwen-plus", "usage": {"input_tokens": 3, "output_tokens": 4}, "status": "complete",
              "cost": 0.001, "cell_id": "c1"}
    record.update(fields)
    return record


def _notebook(*outputs: Any, cells: Any = None) -> dict[str, Any]:
    if cells is None:
        cells = [{"cell_type": "code", "id": "c1", "source": "%%qwen\nA question", "metadata": {},
                  "outputs": list(outputs)}]
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}


BAD_NOTEBOOKS = {
    "output metadata is text": _notebook({"output_type": "display_data", "data": {}, "metadata": "qwen"}),
    "cells are numbers": _notebook(cells=[1, 2]),
    "a cell's outputs are an object": _notebook(cells=[{"cell_type": "code", "outputs": {"a": 1}}]),
    "an output is a list": _notebook(["not", "an", "output"]),
    "the record is a list": _notebook(_answer_output(["default"])),
    "the prompt is a list": _notebook(_answer_output(_record(prompt=["a", "list"]))),
    "the prompt is a number": _notebook(_answer_output(_record(prompt=7))),
    "the text is an object": _notebook(_answer_output(_record(text={"a": 1}))),
    "the usage is text": _notebook(_answer_output(_record(usage="lots"))),
    "a token count is text": _notebook(_answer_output(_record(usage={"input_tokens": "3"}))),
    "a token count is negative": _notebook(_answer_output(_record(usage={"output_tokens": -4}))),
    "the cost is text": _notebook(_answer_output(_record(cost="cheap"))),
    "the cost is infinite": _notebook(_answer_output(_record(cost=float("inf")))),
    "the status is unknown": _notebook(_answer_output(_record(status="exploded"))),
    "the turn number is text": _notebook(_answer_output(_record(turn="2"))),
    "the elapsed time is a list": _notebook(_answer_output(_record(elapsed=[1]))),
    "the cell id is a number": _notebook(_answer_output(_record(cell_id=5))),
    "the system prompt is a list": _notebook(_answer_output(_record(system=["be brief"]))),
    "the Markdown is a number": _notebook(_answer_output(_record(text=None, footer=["footer"]), markdown=5)),
    "the footer is text": _notebook(_answer_output(_record(text=None, footer="footer"))),
}


@pytest.mark.parametrize("shape", list(BAD_NOTEBOOKS))
def test_resume_from_a_notebook_of_the_wrong_shape_is_refused_and_changes_nothing(
    shell, gateway: Gateway, capsys, tmp_path: Path, shape: str
) -> None:
    assert run(shell, "%%qwen\nKept question").success
    before = stored_prompts(store_path(tmp_path))
    notebook = tmp_path / "bad.ipynb"
    notebook.write_text(json.dumps(BAD_NOTEBOOKS[shape], allow_nan=True), encoding="utf-8")
    message = refusal(shell, capsys, f"%qwen resume --from {notebook}")
    assert str(notebook) in message and "nothing was changed" in message
    assert [t.prompt for t in session_of(shell).chat("default").turns] == ["Kept question"]
    assert stored_prompts(store_path(tmp_path)) == before == ["Kept question"]
    # The chat is not poisoned: the next cell carries it on.
    assert run(shell, "%%qwen\nAnd then?").success
    assert [m["content"] for m in gateway.requests[-1].messages if m["role"] == "user"] == ["Kept question", "And then?"]


def test_a_well_shaped_notebook_still_resumes(shell, gateway: Gateway, capsys, tmp_path: Path) -> None:
    notebook = tmp_path / "good.ipynb"
    notebook.write_text(json.dumps(_notebook(_answer_output(_record(text=None, footer=["footer"])))))
    assert run(shell, f"%qwen resume --from {notebook}").success
    assert "Restored chat 'default': 1 turn(s)" in shown(capsys)
    assert session_of(shell).chat("default").turns[0].result.text == "An answer."
    assert stored_prompts(store_path(tmp_path)) == ["A question"]


def test_resume_of_a_stored_turn_of_the_wrong_shape_is_one_line(shell, gateway: Gateway, capsys,
                                                                 tmp_path: Path) -> None:
    assert run(shell, "%%qwen\nStored question").success
    db = sqlite3.connect(store_path(tmp_path))
    db.execute("UPDATE turns SET record = ?", (json.dumps(_record(prompt=["poison"])),))
    db.commit()
    db.close()
    message = refusal(shell, capsys, "%qwen resume")
    assert "'prompt' is a list, not text" in message and str(store_path(tmp_path)) in message
    assert [t.prompt for t in session_of(shell).chat("default").turns] == ["Stored question"]


# ---- 8. the history directory deleted while the kernel runs


def test_a_deleted_history_directory_is_started_afresh_with_the_whole_chat(
    shell, gateway: Gateway, capsys, tmp_path: Path
) -> None:
    directory = tmp_path / "data"
    path = directory / "history.sqlite3"
    run(shell, f"%config QwenMagic.store_path = {str(path)!r}")
    assert run(shell, "%%qwen\nBefore the deletion").success
    assert stored_prompts(path) == ["Before the deletion"]
    shutil.rmtree(directory)
    assert run(shell, "%%qwen\nAfter the deletion").success
    text = shown(capsys)
    assert f"The history file {path} was deleted or replaced while this kernel ran" in text
    # As after a restart: a new connection to the file finds the chat whole.
    assert stored_prompts(path) == ["Before the deletion", "After the deletion"]
    assert run(shell, "%%qwen\nLater").success
    assert "was deleted or replaced" not in shown(capsys)  # said once
    assert stored_prompts(path) == ["Before the deletion", "After the deletion", "Later"]


def test_a_history_file_replaced_by_another_is_noticed(shell, gateway: Gateway, capsys, tmp_path: Path) -> None:
    path = store_path(tmp_path)
    assert run(shell, "%%qwen\nFirst").success
    os.replace(path, tmp_path / "moved.sqlite3")  # e.g. a backup tool moved it
    Store(path).close()  # and another kernel started a new file there
    assert run(shell, "%%qwen\nSecond").success
    assert "was deleted or replaced" in shown(capsys)
    assert stored_prompts(path) == ["First", "Second"]


# ---- 9. a history file with damaged pages


def damage(path: Path, *, first_page: int, every: int) -> None:
    """Overwrite every ``every``-th page from ``first_page`` (0-based) on with random bytes."""
    data = bytearray(path.read_bytes())
    page_size = 4096
    noise = random.Random(14)
    for start in range(first_page * page_size, len(data), every * page_size):
        data[start:start + page_size] = bytes(noise.randrange(256) for _ in range(page_size))
    path.write_bytes(bytes(data))


def filled_store(path: Path, turns: int) -> None:
    store = Store(path)
    for number in range(1, turns + 1):
        record = Turn(f"Question {number} " + "x" * 400,
                      QwenResult(text="y" * 800, model="qwen-plus", usage=Usage(10, 20), cost=0.01),
                      cell_id=f"c{number}").to_record()
        store.save_turn("ipython:" + os.getcwd(), "default", number, f"c{number}", record)
        store.add_call("ipython:" + os.getcwd(), "default", "qwen-plus", 10, 20, 0.01, "complete")
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, none in the WAL
    db.close()


def test_a_damaged_history_file_is_one_line_everywhere_and_repair_keeps_what_it_can(
    shell, gateway: Gateway, capsys, tmp_path: Path
) -> None:
    path = store_path(tmp_path)
    filled_store(path, 40)
    pages = path.stat().st_size // 4096
    damage(path, first_page=5, every=4)  # pages of both tables and of their indexes
    for command in ("%qwen resume", "%qwen usage --all"):
        message = refusal(shell, capsys, command)
        assert f"the history file {path} is damaged".capitalize() in message.removeprefix("UsageError: ").capitalize(), message
        assert "%qwen repair" in message
    chats = pretty(shell.run_line_magic("qwen", "chats"))
    assert str(path) in chats and "%qwen repair" in chats
    assert run(shell, "%%qwen\nA question meanwhile").success
    answer = shown(capsys)
    assert "History not saved: the history file" in answer and "%qwen repair" in answer
    assert session_of(shell).chat("default").turns[-1].prompt == "A question meanwhile"

    assert run(shell, "%qwen repair").success
    said = shown(capsys)
    assert "was damaged" in said and "It is kept as" in said
    (aside,) = tmp_path.glob("history.sqlite3.damaged-*")
    assert aside.stat().st_size >= pages * 4096  # the damaged file is kept whole
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = [json.loads(r[0])["prompt"].split(" x")[0] for r in db.execute("SELECT record FROM turns ORDER BY position")]
    calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    db.close()
    assert 0 < len(kept) < 40  # what the damaged pages held is gone, the rest is kept, in order
    assert kept == sorted(kept, key=lambda prompt: int(prompt.split()[1]))
    assert set(kept) <= {f"Question {n}" for n in range(1, 41)}
    assert calls > 0
    assert f"with the {len(kept)} turn(s) and {calls} call(s)" in said
    # The fresh file serves every command again.
    assert run(shell, "%qwen usage --all").success
    assert run(shell, "%%qwen\nAfter the repair").success
    assert "History not saved" not in shown(capsys)
    assert run(shell, "%qwen repair").success
    assert "reads whole; nothing was changed" in shown(capsys)


def test_a_file_that_is_not_a_database_is_one_line_and_repairable(shell, gateway: Gateway, capsys,
                                                                  tmp_path: Path) -> None:
    path = store_path(tmp_path)
    path.write_bytes(b"this is not SQLite at all\n" * 400)
    message = refusal(shell, capsys, "%qwen usage --all")
    assert str(path) in message and "%qwen repair" in message
    assert run(shell, "%qwen repair").success
    assert "It is kept as" in shown(capsys)
    assert run(shell, "%%qwen\nNow saved").success
    assert stored_prompts(path) == ["Now saved"]


def test_repair_and_odd_chat_names_in_a_store_path_with_uri_characters(shell, gateway: Gateway, capsys,
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "odd ?#% dir" / "history.sqlite3"
    run(shell, f"%config QwenMagic.store_path = {str(path)!r}")
    names = ["it's", "默认", "a@2", "default@2", "x y", "%qwen"]
    for name in names:
        assert run(shell, f"%%qwen -c {json.dumps(name, ensure_ascii=False)}\nAbout {name}").success
    assert "History not saved" not in shown(capsys)
    for name in names:
        assert stored_prompts(path, chat=name) == [f"About {name}"]
    assert run(shell, "%qwen repair").success
    assert "reads whole; nothing was changed" in shown(capsys)
    session_of(shell).close_store(path)
    path.write_bytes(b"garbage" * 1000)
    assert run(shell, "%qwen repair").success
    assert "It is kept as" in shown(capsys)
    assert run(shell, "%%qwen -c \"it's\"\nAgain").success
    assert stored_prompts(path, chat="it's") == ["About it's", "Again"]  # the chat, written whole


# ---- 10. a history file locked by another program


def test_a_locked_history_file_costs_about_a_second_and_says_so(shell, gateway: Gateway, capsys,
                                                                tmp_path: Path) -> None:
    gateway.script(Reply(text="The whole answer, every word of it."))
    assert run(shell, "%qwen chats").success  # the file exists, in WAL mode
    shown(capsys)
    other = sqlite3.connect(store_path(tmp_path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        outcome = run(shell, "%%qwen -o answer\nA question")
        elapsed = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    text = shown(capsys)
    assert outcome.success, text
    assert elapsed < 4, elapsed  # was 15 s
    assert text.index("The whole answer, every word of it.") < text.index("History not saved: locked")
    assert "History not saved: locked" in " ".join(shell.user_ns["answer"].notes)
    assert session_of(shell).chat("default").turns[-1].prompt == "A question"
    assert run(shell, "%%qwen\nUnlocked now").success
    assert "History not saved" not in shown(capsys)


# ---- 15. commands with odd arguments


@pytest.mark.parametrize("amount", ["inf", "nan", "-0", "1e309", "-inf", "¥inf", "0"])
def test_a_budget_must_be_positive_and_finite(shell, gateway: Gateway, capsys, amount: str) -> None:
    message = refusal(shell, capsys, f"%qwen budget {amount}")
    assert "positive, finite amount of yuan" in message
    assert session_of(shell).budget is None


ODD_LINES = {
    "unbalanced quote": '%qwen resume "unbalanced',
    "escaped NUL in a name": "%qwen history 'a\\x00b'",
    "NUL in a chat name to reset": "%qwen reset 'chat\x00name'",
    "NUL in a chat name to undo": "%qwen undo 'chat\x00name'",
    "NUL in a chat name to resume": "%qwen resume 'chat\x00name'",
    "NUL in an export path": "%qwen export 'out\x00.md'",
    "NUL in a notebook path": "%qwen resume --from 'nb\x00.ipynb'",
    "huge chat name": "%qwen history " + "h" * 5_000,  # IPython's $-expansion of longer lines is slow itself
    "huge export path": "%qwen export default " + "d" * 5_000 + ".md",
    "huge notebook path": "%qwen resume --from " + "n" * 5_000 + ".ipynb",
    "huge budget": "%qwen budget " + "9" * 400,
    "huge model name": "%qwen models " + "m" * 5_000,
    "repair with an argument": "%qwen repair now",
}


@pytest.mark.parametrize("line", list(ODD_LINES.values()), ids=list(ODD_LINES))
def test_odd_command_arguments_end_in_one_line(shell, gateway: Gateway, capsys, line: str) -> None:
    run(shell, "%%qwen\nSomething to export")
    shown(capsys)
    started = time.monotonic()
    message = refusal(shell, capsys, line)
    assert time.monotonic() - started < 5
    assert len(message) < 1_000, message[:300]


# ---- faults that already end well, kept so


def test_a_full_disk_keeps_the_answer_and_says_history_not_saved(shell, gateway: Gateway, capsys,
                                                                  tmp_path: Path) -> None:
    assert run(shell, "%%qwen\nSaved first").success
    shown(capsys)
    store = session_of(shell).store(shell.magics_manager.registry["QwenMagic"].settings())
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite: "database or disk is full"
    gateway.script(Reply(text="A long answer. " * 2_000))
    assert run(shell, "%%qwen -o answer\nNot saved").success
    text = shown(capsys)
    note = "History not saved: the disk holding"
    assert text.count(note) == 1 and "Traceback" not in text
    assert shell.user_ns["answer"].text == "A long answer. " * 2_000
    assert [t.prompt for t in session_of(shell).chat("default").turns] == ["Saved first", "Not saved"]
    assert stored_prompts(store_path(tmp_path)) == ["Saved first"]


def test_a_store_path_that_is_a_directory_is_a_note(shell, gateway: Gateway, capsys,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    run(shell, f"%config QwenMagic.store_path = {str(folder)!r}")
    assert run(shell, "%%qwen\nQuestion one").success
    assert f"History not saved: cannot open the history file {folder}" in shown(capsys)
    assert "is a directory" in refusal(shell, capsys, "%qwen repair")
    assert str(folder) in refusal(shell, capsys, "%qwen resume")
    assert [t.prompt for t in session_of(shell).chat("default").turns] == ["Question one"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files")
def test_a_read_only_history_file_is_a_note(shell, gateway: Gateway, capsys, tmp_path: Path) -> None:
    read_only = tmp_path / "ro.sqlite3"
    Store(read_only).close()
    read_only.chmod(0o400)
    run(shell, f"%config QwenMagic.store_path = {str(read_only)!r}")
    assert run(shell, "%%qwen\nQuestion two").success
    text = shown(capsys)
    assert f"History not saved: the history file {read_only} cannot be used" in text and "Traceback" not in text
    assert [t.prompt for t in session_of(shell).chat("default").turns] == ["Question two"]


def test_a_chat_is_claimed_by_one_live_kernel_and_taken_over_from_an_ended_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    from qwen_magic.store import Claim, Owner

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = Store(tmp_path / "history.sqlite3")
    gone, live, me = Owner(pid=int(ended.stdout)), Owner(pid=os.getppid()), Owner()
    assert store.claim("nb", "default", gone).name == "default"
    store.save_turn("nb", "default", 1, "c1", _record())
    taken = store.claim("nb", "default", me)  # its kernel ended: taken over, its turns set aside
    assert taken.name == "default" and taken.new and taken.kept and taken.kept.startswith("default@")
    assert store.claim("nb", "default", me).new is False  # held: checked, not re-taken
    assert store.claim("nb", "other", live).name == "other"
    assert store.claim("nb", "other", me).name == "other@2"  # its kernel runs: kept apart
    # A later session of this process (after %reload_ext) takes over the earlier one's chats.
    assert store.claim("nb", "other", Owner()).name == "other@2"
    db = sqlite3.connect(store.path)
    db.execute("INSERT INTO claims VALUES ('nb', 'odd', 'x', ?, 0)", (me.host,))  # pid 0: no process
    db.execute("INSERT INTO claims VALUES ('nb', 'odder', 'x', ?, 'text')", (me.host,))
    db.execute("INSERT INTO claims VALUES ('nb', 'far', 'x', 'another-host', ?)", (int(ended.stdout),))
    db.commit()
    db.close()
    assert store.claim("nb", "odd", me).name == "odd"
    assert store.claim("nb", "odder", me).name == "odder"
    assert store.claim("nb", "far", me).name == "far@2"  # cannot be checked: taken as alive
    # A kernel keeps the name it holds, even once the kernel it stood aside for has ended.
    first = Owner(pid=live.pid)
    assert store.claim("nb", "s", first).name == "s"
    assert store.claim("nb", "s", me).name == "s@2"
    store.save_turn("nb", "s", 1, "c1", _record(prompt="the first kernel's"))
    db = sqlite3.connect(store.path)
    db.execute("UPDATE claims SET pid = ? WHERE chat = 's'", (int(ended.stdout),))  # the first kernel ends
    db.commit()
    db.close()
    assert store.claim("nb", "s", me, holds="s@2") == Claim("s@2", new=False)
    assert stored_prompts(store.path, "nb", "s") == ["the first kernel's"]
    # A chat resumed from an ended kernel's copy carries that copy on, without setting it aside.
    assert store.claim("nb", "r", gone).name == "r"
    store.save_turn("nb", "r", 1, "c1", _record(prompt="resumed"))
    assert store.claim("nb", "r", me, holds="r") == Claim("r", new=True)
    assert stored_prompts(store.path, "nb", "r") == ["resumed"]
    mine = Owner(pid=live.pid)
    assert store.claim("nb", "mine", mine).name == "mine"
    store.release(mine)  # its kernel closes: the next one takes the name, though that pid still runs
    assert store.claim("nb", "mine", live).name == "mine"


# ---- in real kernels: the answer before the wait, two kernels, a kill mid-write, login


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def start_kernel(gateway: Gateway, workdir: Path, notebook: str) -> KernelSession:
    env = kernel_env(workdir, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     JPY_SESSION_NAME=notebook)
    return KernelSession(env, cwd=workdir)


def durable_outputs(execution) -> list[tuple[float, str]]:
    """(arrival, Markdown) of every display message that carries the turn's record."""
    return [(m.received, m.content["data"]["text/markdown"]) for m in execution.messages
            if m.msg_type in ("display_data", "update_display_data")
            and "qwen_magic" in m.content.get("metadata", {})]


@pytest.mark.kernel
@pytest.mark.parametrize("display", ["markdown", "widget", "text"])
def test_in_a_kernel_a_locked_file_shows_the_whole_answer_then_the_note(
    gateway_server: Gateway, workdir: Path, display: str
) -> None:
    gateway_server.reset()
    answer = "Every word of the answer arrives before the history waits."
    gateway_server.script(Reply(text=answer, chunk_size=4), times=None)
    kernel = start_kernel(gateway_server, workdir, f"locked-{display}.ipynb")
    try:
        setup = kernel.execute(f"%load_ext qwen_magic\n%config QwenMagic.display = {display!r}\n%qwen chats")
        assert setup.status == "ok"
        other = sqlite3.connect(workdir / "history.sqlite3", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            execution = kernel.execute("%%qwen\nA question", cell_id="locked")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert execution.status == "ok"
        reply_at = max(m.received for m in execution.messages)
        assert reply_at - execution.started < 5  # was 15 s and more
        if display == "text":
            printed = execution.stdout
            assert printed.index(answer) < printed.index("History not saved: locked")
            return
        shown_outputs = durable_outputs(execution)
        (first_at, first), (last_at, last) = shown_outputs[0], shown_outputs[-1]
        assert answer in first and "History not saved" not in first  # the whole answer, at once
        assert answer in last and "History not saved: locked" in last  # then the note, in place
        assert last_at - first_at > 0.5  # the wait came after the answer was shown
        (final,) = [o for o in execution.outputs if o["output_type"] == "display_data"]
        assert "History not saved: locked" in final["data"]["text/markdown"]
    finally:
        kernel.shutdown()
        gateway_server.reset()


@pytest.mark.kernel
def test_two_kernels_on_one_notebook_lose_no_turn(gateway_server: Gateway, workdir: Path) -> None:
    gateway_server.reset()
    gateway_server.script(Reply(chunks=["a", "b"], frame_delay=0.005), times=None)
    notebook = "opened-twice.ipynb"
    turns = 25
    kernels = [start_kernel(gateway_server, workdir, notebook) for _ in range(2)]
    try:
        for kernel in kernels:
            assert kernel.execute("%load_ext qwen_magic\n%config QwenMagic.display = 'markdown'").status == "ok"
        # The same cells in both (the same notebook), run at the same time.
        pending = [(n, kernel, kernel.submit(f"%%qwen\nKernel {n} turn {i}", cell_id=f"cell-{i}"))
                   for i in range(turns) for n, kernel in enumerate(kernels)]
        notes: dict[int, list[str]] = {0: [], 1: []}
        for n, kernel, msg_id in pending:
            execution = kernel.collect(msg_id)
            assert execution.status == "ok"
            notes[n] += [text for _, text in durable_outputs(execution) if "Another kernel" in text]
        kept = {name: stored_prompts(workdir / "history.sqlite3", notebook, name) for name in ("default", "default@2")}
        assert sum(len(prompts) for prompts in kept.values()) == 2 * turns  # was 98 of 200 lost
        for prompts in kept.values():  # each copy holds one kernel's turns, in cell order
            assert prompts == [prompts[0].rsplit(" ", 1)[0] + f" {i}" for i in range(turns)]
        # The second kernel's reset and undo touch its own copy, never the first kernel's.
        second = kernels[[n for n in notes if notes[n]][0]]
        assert second.execute("%qwen undo\n%qwen reset").status == "ok"
        assert second.execute("%%qwen\nSecond kernel again", cell_id="cell-0").status == "ok"
    finally:
        for kernel in kernels:
            kernel.shutdown()
        gateway_server.reset()
    path = workdir / "history.sqlite3"
    db = sqlite3.connect(path)
    chats = dict(db.execute("SELECT chat, COUNT(*) FROM turns WHERE notebook = ? GROUP BY chat", (notebook,)))
    db.close()
    assert chats == {"default": turns, "default@2": 1}, chats
    first = 1 - [n for n in notes if notes[n]][0]
    assert sorted(stored_prompts(path, notebook, "default")) == sorted(f"Kernel {first} turn {i}" for i in range(turns))
    assert stored_prompts(path, notebook, "default@2") == ["Second kernel again"]
    # One kernel was told, once, where its turns are kept; the other kernel was told nothing.
    assert sorted(len(found) for found in notes.values()) == [0, 1]
    assert "%qwen resume 'default@2' brings them back" in sum(notes.values(), [])[0]

    # A later kernel on the notebook resumes either copy whole.
    later = start_kernel(gateway_server, workdir, notebook)
    try:
        execution = later.execute("%load_ext qwen_magic\n%qwen resume default@2")
        assert execution.status == "ok", execution.outputs
        assert "Restored chat 'default@2': 1 turn(s)" in execution.outputs[-1]["data"]["text/plain"]
    finally:
        later.shutdown()


@pytest.mark.kernel
def test_a_kernel_on_a_notebook_whose_last_kernel_ended_takes_its_chat_over(
    gateway_server: Gateway, workdir: Path
) -> None:
    gateway_server.reset()
    notebook = "restarted.ipynb"
    first = start_kernel(gateway_server, workdir, notebook)
    try:
        assert first.execute("%load_ext qwen_magic").status == "ok"
        assert first.execute("%%qwen\nBefore the restart", cell_id="a").status == "ok"
        first.manager.signal_kernel(signal.SIGKILL)  # no chance to release its claim
        first.manager.shutdown_kernel(now=True)
    finally:
        first.client.stop_channels()
    second = start_kernel(gateway_server, workdir, notebook)
    try:
        assert second.execute("%load_ext qwen_magic\n%config QwenMagic.display = 'markdown'").status == "ok"
        execution = second.execute("%%qwen\nAfter the restart", cell_id="b")
        text = execution.outputs[-1]["data"]["text/markdown"]
        assert "Another kernel" not in text and "kept as 'default@" in text
    finally:
        second.shutdown()
        gateway_server.reset()
    assert stored_prompts(workdir / "history.sqlite3", notebook) == ["After the restart"]


@pytest.mark.kernel
def test_a_kernel_killed_in_the_middle_of_a_write_leaves_a_readable_file(
    gateway_server: Gateway, workdir: Path
) -> None:
    gateway_server.reset()
    notebook = "killed-mid-write.ipynb"
    kernel = start_kernel(gateway_server, workdir, notebook)
    try:
        assert kernel.execute("%load_ext qwen_magic").status == "ok"
        for cell in ("k1", "k2"):
            assert kernel.execute(f"%%qwen\nKept {cell}", cell_id=cell).status == "ok"
        # Write after write into the same file, each a transaction, until killed.
        kernel.submit(
            "from qwen_magic.store import Store\n"
            "import os\n"
            "_store = Store(__import__('pathlib').Path(os.environ['QWEN_MAGIC_STORE']))\n"
            "_record = {'prompt': 'filler', 'text': 'z' * 20000}\n"
            "for _n in range(10**6):\n"
            "    _store.save_turn('filler.ipynb', 'default', _n, None, _record)\n"
        )
        deadline = time.monotonic() + 20
        db = sqlite3.connect(workdir / "history.sqlite3", timeout=10)
        while db.execute("SELECT COUNT(*) FROM turns WHERE notebook = 'filler.ipynb'").fetchone()[0] < 50:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        db.close()
        kernel.manager.signal_kernel(signal.SIGKILL)
        kernel.manager.shutdown_kernel(now=True)
    finally:
        kernel.client.stop_channels()
    db = sqlite3.connect(workdir / "history.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert stored_prompts(workdir / "history.sqlite3", notebook) == ["Kept k1", "Kept k2"]
    later = start_kernel(gateway_server, workdir, notebook)
    try:
        execution = later.execute("%load_ext qwen_magic\n%qwen resume")
        assert execution.status == "ok", execution.outputs
        assert "Restored chat 'default': 2 turn(s)" in execution.outputs[-1]["data"]["text/plain"]
    finally:
        later.shutdown()
        gateway_server.reset()


@pytest.mark.kernel
def test_login_where_the_front_end_cannot_ask_is_one_line(gateway_server: Gateway, workdir: Path) -> None:
    kernel = start_kernel(gateway_server, workdir, "no-stdin.ipynb")
    try:
        execution = kernel.execute("%load_ext qwen_magic\n%qwen login")  # allow_stdin is False
        assert execution.status == "error"
        (output,) = execution.outputs  # IPython prints a UsageError as one line, no traceback
        assert output["name"] == "stderr" and output["text"].count("\n") == 1
        assert output["text"].startswith("UsageError: This front end cannot ask for input")
        assert "DASHSCOPE_API_KEY" in output["text"] and "config.toml" in output["text"]
        assert TEST_KEY not in json.dumps([m.content for m in execution.messages])
    finally:
        kernel.shutdown()


@pytest.mark.parametrize("amount", ["float('inf')", "float('nan')", "0.0", "-1.0"])
def test_the_budget_setting_must_be_positive_and_finite(shell, gateway: Gateway, amount: str) -> None:
    from traitlets import TraitError

    magic = shell.magics_manager.registry["QwenMagic"]
    with pytest.raises(TraitError, match="positive, finite"):
        magic.budget = eval(amount)
    assert magic.budget is None
