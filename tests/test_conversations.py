"""Conversations that follow the notebook's cells, in real kernels, with cell ids as JupyterLab sends them."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import nbformat
import pytest

from qwen_magic.gateway import Gateway, Reply

from .conftest import TEST_KEY
from .kernel_harness import Execution, KernelSession, kernel_env

pytestmark = pytest.mark.kernel
NOTEBOOK = "work/analysis.ipynb"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conversations")


def start_kernel(gateway: Gateway, workdir: Path, notebook: str = NOTEBOOK) -> KernelSession:
    env = kernel_env(workdir, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     JPY_SESSION_NAME=notebook)
    return KernelSession(env, cwd=workdir)


@pytest.fixture(scope="module")
def kernel(gateway_server: Gateway, workdir: Path) -> Iterator[KernelSession]:
    session = start_kernel(gateway_server, workdir)
    yield session
    session.shutdown()


class Notebook:
    """Cells with ids, run as JupyterLab runs them."""

    def __init__(self, kernel: KernelSession, gateway: Gateway) -> None:
        self.kernel = kernel
        self.gateway = gateway

    def run(self, code: str, cell_id: str | None = None) -> Execution:
        execution = self.kernel.execute(code, cell_id=cell_id)
        assert TEST_KEY not in json.dumps([m.content for m in execution.messages])
        return execution

    def ask(self, cell_id: str, prompt: str, options: str = "") -> list[dict]:
        """Run a %%qwen cell; return the messages its request carried."""
        before = len(self.gateway.requests)
        execution = self.run(f"%%qwen {options}\n{prompt}", cell_id)
        assert execution.status == "ok", execution.outputs
        assert len(self.gateway.requests) == before + 1
        return self.gateway.requests[-1].messages

    def turns(self, chat: str = "default") -> list[str]:
        code = (
            "import json\n"
            "_session = get_ipython().magics_manager.registry['QwenMagic'].session\n"
            f"print(json.dumps([t.prompt for t in _session.chat({chat!r}).turns]))"
        )
        return json.loads(self.run(code).stdout)


def user_prompts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


@pytest.fixture
def notebook(kernel: KernelSession, gateway: Gateway) -> Notebook:
    nb = Notebook(kernel, gateway)
    setup = nb.run("%reload_ext qwen_magic\n%config QwenMagic.max_history_tokens = None\n%qwen reset")
    assert setup.status == "ok", setup.outputs
    return nb


def test_the_second_cell_carries_the_first_turn(notebook: Notebook, gateway: Gateway) -> None:
    gateway.script(Reply(text="Paris."))
    assert notebook.ask("cell-a", "Capital of France?") == [{"role": "user", "content": "Capital of France?"}]
    assert notebook.ask("cell-b", "And of Italy?") == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_rerunning_a_cell_replaces_its_turn_with_only_earlier_turns_as_context(notebook: Notebook) -> None:
    notebook.ask("cell-a", "First")
    notebook.ask("cell-b", "Second")
    assert user_prompts(notebook.ask("cell-a", "First, edited")) == ["First, edited"]
    assert notebook.turns() == ["First, edited", "Second"]  # two turns, not three, nothing cut
    assert user_prompts(notebook.ask("cell-b", "Second")) == ["First, edited", "Second"]


def test_running_the_notebook_twice_gives_the_same_chat_as_once(notebook: Notebook) -> None:
    cells = [("c1", "One"), ("c2", "Two"), ("c3", "Three")]
    first_pass = [user_prompts(notebook.ask(cell, prompt)) for cell, prompt in cells]
    second_pass = [user_prompts(notebook.ask(cell, prompt)) for cell, prompt in cells]
    assert first_pass == second_pass == [["One"], ["One", "Two"], ["One", "Two", "Three"]]
    assert notebook.turns() == ["One", "Two", "Three"]


def test_named_chats_are_independent(notebook: Notebook) -> None:
    notebook.ask("x1", "About cats", "-c cats")
    notebook.ask("y1", "About dogs", "-c dogs")
    assert user_prompts(notebook.ask("x2", "More cats", "-c cats")) == ["About cats", "More cats"]
    assert notebook.turns("dogs") == ["About dogs"]
    assert notebook.turns() == []


def test_new_starts_the_chat_afresh_and_system_is_kept(notebook: Notebook) -> None:
    notebook.ask("a", "Old topic")
    messages = notebook.ask("b", "New topic", '-n -s "Answer in haiku."')
    assert messages == [{"role": "system", "content": "Answer in haiku."}, {"role": "user", "content": "New topic"}]
    assert notebook.turns() == ["New topic"]
    later = notebook.ask("c", "Go on")
    assert later[0] == {"role": "system", "content": "Answer in haiku."}  # kept for the chat's later turns
    assert notebook.ask("d", "Start over", "-n")[0] == {"role": "user", "content": "Start over"}  # afresh


def test_no_history_is_a_one_off_question(notebook: Notebook) -> None:
    notebook.ask("a", "Remember me")
    assert user_prompts(notebook.ask("b", "Unrelated", "--no-history")) == ["Unrelated"]
    assert notebook.turns() == ["Remember me"]
    execution = notebook.run("%%qwen --no-history\nAgain", "b")
    assert "one-off, not in a chat" in execution.outputs[-1]["data"]["text/markdown"]


def test_undo_and_reset(notebook: Notebook) -> None:
    for cell in ("a", "b", "c"):
        notebook.ask(cell, f"Question {cell}")
    undo = notebook.run("%qwen undo")
    assert "Removed turn 3 of chat 'default': 'Question c'" in undo.outputs[0]["data"]["text/plain"]
    assert notebook.turns() == ["Question a", "Question b"]
    notebook.run("%qwen reset")
    assert notebook.turns() == []
    assert user_prompts(notebook.ask("d", "Fresh")) == ["Fresh"]


def test_old_turns_are_left_out_to_fit_the_history_budget_and_the_footer_says_so(notebook: Notebook) -> None:
    for n in range(4):
        notebook.ask(f"t{n}", f"Question {n} " + "word " * 40)
    notebook.run("%config QwenMagic.max_history_tokens = 200")
    execution = notebook.run("%%qwen\nLast one", "t4")
    carried = user_prompts(notebook.gateway.requests[-1].messages)
    assert 1 <= len(carried) - 1 < 4 and carried[-1] == "Last one"
    left_out = 4 - (len(carried) - 1)
    markdown = execution.outputs[-1]["data"]["text/markdown"]
    assert f"{left_out} oldest turn" in markdown and "QwenMagic.max_history_tokens = 200" in markdown
    limited = notebook.run("%%qwen --max-history 1\nOnly the last", "t5")
    assert limited.status == "ok"
    assert len(user_prompts(notebook.gateway.requests[-1].messages)) == 2


def test_history_chats_and_export(notebook: Notebook, workdir: Path) -> None:
    notebook.gateway.script(Reply(text="**Bold** answer", usage={"input_tokens": 100, "output_tokens": 10}))
    notebook.ask("a", "Show me")
    notebook.gateway.script(Reply(chunks=["cut ", "short"], cut_after=1))
    notebook.run("%%qwen\nThis one fails", "b")
    history = notebook.run("%qwen history").outputs[0]["data"]
    assert "turn 1 · qwen-plus · 100 in / 10 out · ¥0.0001" in history["text/plain"]
    assert "✖ failed (StreamCut)" in history["text/plain"]
    assert "<strong>Bold</strong>" in history["text/html"]
    chats = notebook.run("%qwen chats").outputs[0]["data"]["text/plain"]
    assert "default" in chats and " 2 " in chats
    notebook.run(f"%qwen export {workdir / 'chat.md'}")
    notebook.run(f"%qwen export default {workdir / 'chat.json'}")
    assert "## Turn 1" in (workdir / "chat.md").read_text() and "**Bold** answer" in (workdir / "chat.md").read_text()
    exported = json.loads((workdir / "chat.json").read_text())
    assert [t["prompt"] for t in exported["turns"]] == ["Show me", "This one fails"]
    assert exported["turns"][1]["status"] == "failed" and exported["notebook"] == NOTEBOOK
    bad = notebook.run(f"%qwen export {workdir / 'chat.txt'}")
    assert bad.status == "error" and "extension, .md or .json" in bad.stdout + json.dumps(bad.outputs)


def test_after_a_restart_the_notebook_starts_clean_and_resume_brings_the_chat_back(
    notebook: Notebook, kernel: KernelSession
) -> None:
    notebook.ask("a", "Before the restart")
    notebook.ask("b", "Also before")
    kernel.manager.restart_kernel(now=True)
    kernel.client.wait_for_ready(timeout=60)
    notebook.run("%load_ext qwen_magic")
    assert notebook.turns() == []
    restored = notebook.run("%qwen resume")
    assert "Restored chat 'default': 2 turn(s)" in restored.outputs[0]["data"]["text/plain"]
    assert user_prompts(notebook.ask("c", "After")) == ["Before the restart", "Also before", "After"]
    # The restored turns keep their cells: re-running one replaces it in place.
    assert user_prompts(notebook.ask("a", "Before, again")) == ["Before, again"]
    assert notebook.turns() == ["Before, again", "Also before", "After"]


def test_resume_from_a_saved_notebook_file(notebook: Notebook, kernel: KernelSession, workdir: Path) -> None:
    saved = nbformat.v4.new_notebook()
    for cell_id, prompt in (("s1", "Saved question one"), ("s2", "Saved question two")):
        execution = notebook.run(f"%%qwen -c saved\n{prompt}", cell_id)
        cell = nbformat.v4.new_code_cell(f"%%qwen -c saved\n{prompt}")
        cell.id = cell_id
        cell.outputs = [nbformat.from_dict(output) for output in execution.outputs]
        saved.cells.append(cell)
    path = workdir / "saved.ipynb"
    nbformat.write(saved, path)
    metadata = saved.cells[1].outputs[0]["metadata"]["qwen_magic"]
    assert metadata["prompt"] == "Saved question two" and metadata["chat"] == "saved" and metadata["turn"] == 2

    kernel.manager.restart_kernel(now=True)
    kernel.client.wait_for_ready(timeout=60)
    notebook.run("%load_ext qwen_magic\n%qwen reset saved")
    restored = notebook.run(f"%qwen resume saved --from {path}")
    assert "Restored chat 'saved': 2 turn(s)" in restored.outputs[0]["data"]["text/plain"]
    assert user_prompts(notebook.ask("s3", "Next", "-c saved")) == [
        "Saved question one", "Saved question two", "Next"]


def test_usage_all_adds_every_notebooks_calls(notebook: Notebook) -> None:
    notebook.gateway.script(Reply(text="x", usage={"input_tokens": 1000, "output_tokens": 0}))
    notebook.ask("u", "Count me", "-m qwen-max")
    table = notebook.run("%qwen usage --all").outputs[0]["data"]["text/plain"]
    assert "Usage across notebooks, Beijing (mainland site), in yuan" in table
    line = next(line for line in table.splitlines() if line.strip().startswith("qwen-max"))
    assert "of 1,000,000" in line


def test_two_kernels_writing_the_same_file_lose_nothing(gateway_server: Gateway, workdir: Path) -> None:
    gateway_server.reset()
    gateway_server.script(Reply(chunks=["a", "b", "c"], frame_delay=0.02), times=None)
    kernels = [start_kernel(gateway_server, workdir, f"concurrent-{n}.ipynb") for n in range(2)]
    try:
        for kernel in kernels:
            assert kernel.execute("%load_ext qwen_magic\n%qwen reset").status == "ok"
        pending = [(kernel, kernel.submit(f"%%qwen\nQuestion {i}", cell_id=f"cell-{i}"))
                   for i in range(6) for kernel in kernels]
        for kernel, msg_id in pending:
            assert kernel.collect(msg_id).status == "ok"
    finally:
        for kernel in kernels:
            kernel.shutdown()
        gateway_server.reset()
    db = sqlite3.connect(workdir / "history.sqlite3")
    for n in range(2):
        rows = db.execute("SELECT position, cell_id FROM turns WHERE notebook = ? ORDER BY position",
                          (f"concurrent-{n}.ipynb",)).fetchall()
        assert rows == [(i + 1, f"cell-{i}") for i in range(6)]


def test_a_kernel_killed_mid_stream_leaves_earlier_turns_and_a_readable_file(
    gateway_server: Gateway, workdir: Path
) -> None:
    gateway_server.reset()
    kernel = start_kernel(gateway_server, workdir, "killed.ipynb")
    try:
        kernel.execute("%load_ext qwen_magic\n%qwen reset")
        for cell in ("k1", "k2"):
            assert kernel.execute(f"%%qwen\nKept {cell}", cell_id=cell).status == "ok"
        gateway_server.script(Reply(chunks=[f"w{n} " for n in range(100)], frame_delay=0.05))
        msg_id = kernel.submit("%%qwen\nNever finished", cell_id="k3")
        gateway_server.wait_for_requests(3, timeout=10)
        kernel.manager.signal_kernel(signal.SIGKILL)  # no cleanup of any kind
        kernel.manager.shutdown_kernel(now=True)
    finally:
        kernel.client.stop_channels()
        gateway_server.reset()
    db = sqlite3.connect(workdir / "history.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    prompts = [json.loads(r[0])["prompt"] for r in db.execute(
        "SELECT record FROM turns WHERE notebook = 'killed.ipynb' ORDER BY position")]
    assert prompts == ["Kept k1", "Kept k2"]
    assert msg_id


def test_a_failed_rerun_keeps_the_cells_earlier_answer(notebook: Notebook, gateway: Gateway) -> None:
    gateway.script(Reply(text="Paris."))
    notebook.ask("a", "Capital of France?")
    notebook.run("%config QwenMagic.max_retries = 0")
    gateway.script(Reply(status=503, error_code="ServiceUnavailable"))
    failed = notebook.run("%%qwen\nCapital of France?", "a")
    assert failed.status == "error"
    assert "The cell's earlier answer stays in the chat" in failed.outputs[0]["data"]["text/markdown"]
    assert notebook.ask("b", "And Italy?")[:2] == [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    notebook.run("%config QwenMagic.max_retries = 3")


def test_resume_from_a_notebook_honours_a_new_start(notebook: Notebook, kernel: KernelSession, workdir: Path) -> None:
    saved = nbformat.v4.new_notebook()
    for cell_id, line in (("r1", "%%qwen -c topics\nOld topic"), ("r2", "%%qwen -c topics -n\nNew topic"),
                          ("r3", "%%qwen -c topics\nFollow-up")):
        execution = notebook.run(line, cell_id)
        cell = nbformat.v4.new_code_cell(line)
        cell.id = cell_id
        cell.outputs = [nbformat.from_dict(output) for output in execution.outputs]
        saved.cells.append(cell)
    path = workdir / "restarted.ipynb"
    nbformat.write(saved, path)
    notebook.run("%qwen reset topics")
    notebook.run(f"%qwen resume topics --from {path}")
    assert notebook.turns("topics") == ["New topic", "Follow-up"]


def test_interrupting_a_retry_wait_charges_nothing(notebook: Notebook, kernel: KernelSession, gateway: Gateway) -> None:
    gateway.script(Reply(status=429, error_code="Throttling", retry_after=5))
    msg_id = kernel.submit("%%qwen -o waited\nHi", cell_id="w")
    gateway.wait_for_requests(1, timeout=10)
    time.sleep(0.5)
    kernel.interrupt()
    assert kernel.collect(msg_id).status == "error"
    check = notebook.run("print(waited.status, waited.cost, waited.usage.input_tokens)")
    assert check.stdout.split() == ["interrupted", "0.0", "0"]
