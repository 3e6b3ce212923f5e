"""What a person sees: JupyterLab in headless Chromium, driven by Playwright, against the gateway.

Debian's chromium is used through its executable path (no browser download). JupyterLab's
config, data, runtime, settings and workspaces live in a temporary folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import nbformat
import pytest

from qwen_magic.gateway import Gateway, Reply

from .conftest import TEST_KEY

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"


class Lab:
    def __init__(self, root: Path, port: int, token: str, process: subprocess.Popen) -> None:
        self.root, self.port, self.token, self.process = root, port, token, process

    def url(self, notebook: str) -> str:
        # reset: a clean workspace, not the tabs an earlier test left open
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def notebook(self, name: str, *cells: str) -> str:
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                           "language": "python"}
        notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        nbformat.write(notebook, self.root / name)
        return name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for the browser tests: bash scripts/test.sh installs it")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    dirs = {name: tmp / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython", "home")}
    for path in dirs.values():
        path.mkdir()
    news = dirs["settings"] / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DASHSCOPE_", "QWEN_MAGIC_", "JPY_"))}
    env.update(
        HOME=str(dirs["home"]), JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
        DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url,
        QWEN_MAGIC_STORE=str(tmp / "history.sqlite3"),
    )
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp / "lab.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", f"--port={port}", "--no-browser", "--allow-root",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start: {(tmp / 'lab.log').read_text()[-2000:]}") from None
            time.sleep(0.3)
    yield Lab(root, port, token, process)
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser(lab: Lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, gateway: Gateway):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def open_notebook(page, lab: Lab, name: str) -> None:
    page.goto(lab.url(name))
    # The status bar's text, not the execution indicator (idle before any kernel exists).
    page.get_by_text("| Idle").first.wait_for(timeout=60_000)


def run_cell(page, index: int) -> None:
    cell = page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def output_text(page, index: int) -> str:
    outputs = page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index).locator(".jp-OutputArea")
    return outputs.inner_text() if outputs.count() else ""


def wait_for_output(page, index: int, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = output_text(page, index)
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in cell {index}; it shows {output_text(page, index)!r}")


def test_the_answer_grows_then_stays_with_its_footer_after_saving_and_reopening(
    page, lab: Lab, gateway: Gateway
) -> None:
    name = lab.notebook("stream.ipynb", "%load_ext qwen_magic", "%%qwen\nTell me a story in ten paragraphs.")
    paragraphs = [f"Paragraph {n}: the river kept its own counsel.\n\n" for n in range(1, 13)]
    gateway.script(Reply(chunks=paragraphs, frame_delay=0.3, usage={"input_tokens": 31, "output_tokens": 130}))
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)

    seen: list[str] = []
    deadline = time.monotonic() + 60
    while "out tokens" not in (text := output_text(page, 1)) and time.monotonic() < deadline:
        if "Paragraph" in text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    counts = [snapshot.count("Paragraph") for snapshot in seen]
    assert len(set(counts)) >= 3, f"the answer did not grow in visible steps: {counts}"
    assert counts == sorted(counts) and counts[0] < 12

    final = wait_for_output(page, 1, "out tokens")
    assert "Paragraph 12" in final
    assert "qwen-plus · 31 in / 130 out tokens · ¥0.00028 · chat default, turn 1" in final
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "streamed-answer.png"))

    page.locator('[data-command="docmanager:save"]').first.click()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            saved = nbformat.read(lab.root / name, as_version=4)
        except nbformat.reader.NotJSONError:  # read while the server was writing it
            saved = None
        if saved is not None and saved.cells[1].outputs:
            break
        time.sleep(0.2)
    (output,) = saved.cells[1].outputs
    assert output.output_type == "display_data"
    assert "application/vnd.jupyter.widget-view+json" not in output.data
    assert "Paragraph 12" in output.data["text/markdown"] and "out tokens" in output.data["text/html"]

    page.reload()
    page.get_by_text("| Idle").first.wait_for(timeout=60_000)
    reopened = wait_for_output(page, 1, "out tokens")
    assert "Paragraph 12" in reopened and "¥0.00028" in reopened


def test_markup_in_an_answer_runs_nothing(page, lab: Lab, gateway: Gateway) -> None:
    name = lab.notebook("hostile.ipynb", "%load_ext qwen_magic", "%%qwen\nBe naughty.")
    hostile = 'Look <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2"> done.'
    gateway.script(Reply(text=hostile, chunk_size=6, frame_delay=0.02))
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)
    text = wait_for_output(page, 1, "out tokens")
    assert "<script>window.__pwned = 1</script>" in text  # shown as text
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".jp-OutputArea img").count() == 0


def test_interrupting_from_the_toolbar_keeps_the_partial_answer(page, lab: Lab, gateway: Gateway) -> None:
    name = lab.notebook("interrupt.ipynb", "%load_ext qwen_magic", "%%qwen\nCount slowly.")
    gateway.script(Reply(chunks=[f"word{n} " for n in range(300)], frame_delay=0.1))
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)
    wait_for_output(page, 1, "word5 ")
    page.locator('[data-command="notebook:interrupt-kernel"]').first.click()
    # The one-line error comes last, after the durable output with its footer.
    text = wait_for_output(page, 1, "KeyboardInterrupt: the answer was interrupted", timeout=30)
    assert text.startswith("word0 word1 word2 word3 word4 word5")
    assert "interrupted: partial answer" in text
    assert "word299" not in text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "interrupted-answer.png"))


def test_a_second_answer_streams_into_its_own_cell_and_the_first_stays(page, lab: Lab, gateway: Gateway) -> None:
    # The second answer's live view reuses the widgets the first one gave back.
    name = lab.notebook("two.ipynb", "%load_ext qwen_magic", "%%qwen\nFirst question.", "%%qwen\nSecond question.")
    gateway.script(
        Reply(chunks=["The first answer.\n\n", "Its second block."], frame_delay=0.3),  # one block frozen
        Reply(chunks=[f"Step {n} of the second answer.\n\n" for n in range(1, 9)], frame_delay=0.3),
    )
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)
    first = wait_for_output(page, 1, "out tokens")
    run_cell(page, 2)

    seen: list[int] = []
    deadline = time.monotonic() + 60
    while "out tokens" not in (text := output_text(page, 2)) and time.monotonic() < deadline:
        if "Step" in text and (not seen or text.count("Step") != seen[-1]):
            seen.append(text.count("Step"))
        time.sleep(0.05)
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] < 8, seen
    second = wait_for_output(page, 2, "out tokens")
    assert "Step 8 of the second answer." in second and "turn 2" in second
    assert "The first answer" not in second
    assert output_text(page, 1) == first  # the first cell keeps its own answer
