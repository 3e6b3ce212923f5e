"""The live view in a real page (JupyterLab in headless Chromium): a reload mid-stream, and a
kernel that dies mid-stream. The wider browser checks are in test_browser.py."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
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
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class Lab:
    def __init__(self, root: Path, runtime: Path, port: int, token: str) -> None:
        self.root, self.runtime, self.port, self.token = root, runtime, port, token

    def url(self, notebook: str) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def notebook(self, name: str, *cells: str) -> str:
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                           "language": "python"}
        notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        nbformat.write(notebook, self.root / name)
        return name

    def kill_kernel(self, notebook: str) -> None:
        """SIGKILL the notebook's kernel (found by its connection file), as a crash would."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/sessions?token={self.token}") as response:
            (kernel,) = [session["kernel"] for session in json.load(response) if session["path"] == notebook]
        found = subprocess.run(["pgrep", "-f", f"kernel-{kernel['id']}.json"], capture_output=True, text=True)
        pids = [int(pid) for pid in found.stdout.split()]
        assert pids, "the kernel process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def saved(self, name: str, cell: int) -> list:
        deadline = time.monotonic() + 20
        while True:
            try:
                return nbformat.read(self.root / name, as_version=4).cells[cell].outputs
            except nbformat.reader.NotJSONError:  # read while the server was writing it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(scope="module")
def lab(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for the browser tests: bash scripts/test.sh installs it")
    tmp = tmp_path_factory.mktemp("live-view-lab")
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
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
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
    yield Lab(root, dirs["runtime"], port, token)
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture
def page(lab: Lab, gateway: Gateway):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = chromium.new_context(viewport={"width": 1280, "height": 900}).new_page()
        yield page
        chromium.close()


def open_notebook(page, lab: Lab, name: str) -> None:
    page.goto(lab.url(name))
    page.get_by_text("| Idle").first.wait_for(timeout=60_000)


def run_cell(page, index: int) -> None:
    page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def output_text(page, index: int) -> str:
    outputs = page.locator(".jp-NotebookPanel:visible .jp-Cell").nth(index).locator(".jp-OutputArea")
    return outputs.inner_text() if outputs.count() else ""


def wait_for_output(page, index: int, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in (text := output_text(page, index)):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in cell {index}; it shows {output_text(page, index)!r}")


def test_a_page_reloaded_mid_stream_ends_with_its_own_answer_and_never_shows_the_next(
    page, lab: Lab, gateway: Gateway
) -> None:
    name = lab.notebook("reload.ipynb", "%load_ext qwen_magic", "%%qwen\nFirst.", "%%qwen\nSecond.")
    gateway.script(
        Reply(chunks=[f"Alpha {n} with **bold** words.\n\n" for n in range(1, 25)], frame_delay=0.2,
              usage={"input_tokens": 11, "output_tokens": 240}),
        Reply(chunks=[f"Beta {n}.\n\n" for n in range(1, 16)], frame_delay=0.2),
    )
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)
    wait_for_output(page, 1, "Alpha 3 ")
    page.keyboard.press("Control+s")
    time.sleep(1)
    (saved,) = lab.saved(name, 1)  # saved mid-stream: text beside the live view
    assert saved.data["text/markdown"].startswith("Alpha 1 with **bold** words.")
    page.reload()
    page.get_by_text("| Idle").first.wait_for(timeout=60_000)
    first = wait_for_output(page, 1, "out tokens", timeout=30)
    assert "Alpha 24 " in first and "qwen-plus · 11 in / 240 out tokens" in first
    run_cell(page, 2)
    wait_for_output(page, 2, "Beta 3.")
    assert "Beta" not in output_text(page, 1)
    second = wait_for_output(page, 2, "out tokens", timeout=30)
    assert "Alpha" not in second and "Beta" not in output_text(page, 1)


def test_a_kernel_that_dies_mid_stream_leaves_the_text_shown_and_a_saved_notebook_reads_it(
    page, lab: Lab, gateway: Gateway
) -> None:
    name = lab.notebook("killed.ipynb", "%load_ext qwen_magic", "%%qwen\nTalk.")
    gateway.script(Reply(chunks=[f"Gamma {n} **strong**.\n\n" for n in range(1, 200)], frame_delay=0.1))
    open_notebook(page, lab, name)
    run_cell(page, 0)
    run_cell(page, 1)
    wait_for_output(page, 1, "Gamma 6 ")
    lab.kill_kernel(name)
    shown = wait_for_output(page, 1, "The kernel restarted: the answer stopped here.", timeout=30)
    assert shown.startswith("Gamma 1 strong.\n\nGamma 2 strong.") and "Gamma 6 " in shown
    page.keyboard.press("Control+s")
    time.sleep(1.5)
    (saved,) = lab.saved(name, 1)
    assert WIDGET_VIEW not in saved.data
    assert "Gamma 6 " in saved.data["text/html"] and "The kernel restarted" in saved.data["text/html"]
    page.reload()
    page.get_by_text("| Idle").first.wait_for(timeout=60_000)
    reopened = wait_for_output(page, 1, "The kernel restarted")
    assert "Gamma 6 " in reopened and "model not found" not in reopened
