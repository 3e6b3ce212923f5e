"""JupyterLab 4 and Notebook 7 in headless Chromium, as a person uses them.

``start_front_end`` runs a Jupyter server (``jupyterlab`` or ``notebook``) with its config,
data, runtime, settings and workspaces in a temporary folder, pointed at the offline gateway.
Its kernels import the package from ``PYTHONPATH`` when one is given, else from the work tree
these tests are in, so a run tests that code and not whatever is installed.

``NotebookPage`` drives one notebook in a Playwright page: run a cell, read what a cell shows,
save, reload, restart the kernel. The two front ends share JupyterLab's cells and output
areas; they differ in URLs, where the kernel's status shows and how the restart is confirmed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import nbformat.sign

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORK_TREE = Path(__file__).resolve().parents[1]
ARTIFACTS = WORK_TREE / "artifacts" / "browser"
KINDS = ("lab", "notebook")
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# What a widget output shows when its model cannot be had.
WIDGET_TROUBLE = ("Loading widget", "model not found", "Error displaying widget")


@dataclass
class FrontEnd:
    """A running Jupyter server: ``kind`` is "lab" (JupyterLab 4) or "notebook" (Notebook 7)."""

    kind: str
    root: Path
    port: int
    token: str
    process: subprocess.Popen
    data_dir: Path
    runtime_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        if self.kind == "lab":
            # reset: a clean workspace, not the tabs an earlier page left open
            return f"{self.base}/lab/tree/{name}?reset&token={self.token}"
        return f"{self.base}/notebooks/{name}?token={self.token}"

    def notebook(self, name: str, *cells: str) -> str:
        """Write a notebook of code cells (no outputs) into the server's root; return its name."""
        notebook = nbformat.v4.new_notebook()
        notebook.metadata["kernelspec"] = dict(KERNELSPEC)
        notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        nbformat.write(notebook, self.root / name)
        return name

    def saved(self, name: str, until: Callable[[Any], bool] = lambda nb: True, timeout: float = 20) -> Any:
        """The notebook as saved on disk, once ``until`` holds for it (the server may be writing it)."""
        deadline = time.monotonic() + timeout
        notebook = None
        while True:
            try:
                notebook = nbformat.read(self.root / name, as_version=4)
            except (nbformat.reader.NotJSONError, json.JSONDecodeError, FileNotFoundError):
                notebook = None
            if notebook is not None and until(notebook):
                return notebook
            if time.monotonic() > deadline:
                return notebook
            time.sleep(0.1)

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernel_of(self, name: str) -> dict[str, Any] | None:
        """The kernel of the notebook's session as the server sees it (its execution_state)."""
        for session in self.api("sessions"):
            if session.get("path") == name and session.get("kernel"):
                return self.api(f"kernels/{session['kernel']['id']}")
        return None

    def probe(self, name: str) -> "ShellProbe":
        """Ask the notebook's kernel, on its shell channel, for an answer it gives only once
        the cell it runs has ended."""
        kernel = self.kernel_of(name)
        if kernel is None:
            raise AssertionError(f"{name} has no kernel")
        return ShellProbe(self.runtime_dir / f"kernel-{kernel['id']}.json")

    def kill_kernel(self, name: str) -> None:
        """SIGKILL the notebook's kernel process, as a crash would (the server restarts it)."""
        kernel = self.kernel_of(name)
        if kernel is None:
            raise AssertionError(f"{name} has no kernel")
        found = subprocess.run(["pgrep", "-f", f"kernel-{kernel['id']}.json"], capture_output=True, text=True)
        pids = [int(pid) for pid in found.stdout.split()]
        assert pids, f"the kernel process of {name} was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def shut_down_kernels(self) -> None:
        """End every session, so kernels of earlier tests do not share the machine's two cores."""
        for session in self.api("sessions"):
            try:
                self.api(f"sessions/{session['id']}", method="DELETE")
            except urllib.error.HTTPError:  # its kernel was restarting or gone: end it directly
                if session.get("kernel"):
                    try:
                        self.api(f"kernels/{session['kernel']['id']}", method="DELETE")
                    except urllib.error.HTTPError:
                        pass

    def trusted(self, name: str) -> bool:
        """Does the server's notary trust this notebook file (its signature is in the database)?"""
        notary = nbformat.sign.NotebookNotary(data_dir=str(self.data_dir))
        try:
            return notary.check_signature(nbformat.read(self.root / name, as_version=4))
        finally:
            notary.store.close()


class ShellProbe:
    """A ``kernel_info_request`` on a kernel's shell channel, sent by a client of the test's own.

    The kernel answers it only after the cell it is running, so its reply says that the cell
    ended. (The server's ``execution_state`` does not: a page that connects nudges the kernel
    on its control channel too, which reports the kernel idle in the middle of a cell.)
    """

    def __init__(self, connection_file: Path) -> None:
        from jupyter_client.blocking import BlockingKernelClient

        self._client = BlockingKernelClient()
        self._client.load_connection_file(str(connection_file))
        self._client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        self._request = self._client.kernel_info()
        self._answered = False

    def answered(self, timeout: float) -> bool:
        """Has the kernel answered (waiting up to ``timeout`` seconds)?"""
        deadline = time.monotonic() + timeout
        while not self._answered and (left := deadline - time.monotonic()) > 0:
            try:
                reply = self._client.get_shell_msg(timeout=left)
            except queue.Empty:
                break
            self._answered = reply["parent_header"].get("msg_id") == self._request
        return self._answered

    def close(self) -> None:
        self._client.stop_channels()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kernel_pythonpath() -> str:
    """A PYTHONPATH given to the tests first, then this work tree: what the kernels import."""
    given = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(path for path in (given, str(WORK_TREE)) if path)


@contextmanager
def start_front_end(kind: str, tmp: Path, environment: dict[str, str]) -> Iterator[FrontEnd]:
    """Run Jupyter's ``kind`` front end from ``tmp``, with ``environment`` added for its kernels."""
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
        PYTHONPATH=kernel_pythonpath(), **environment,
    )
    port, token = _free_port(), secrets.token_hex(16)
    module = "jupyterlab" if kind == "lab" else "notebook"
    log_path = tmp / f"{kind}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--ip=127.0.0.1", f"--port={port}", "--no-browser", "--allow-root",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             # window.jupyterapp: the tests wait on the page's own kernel connection
             "--LabServerApp.expose_app_in_browser=True"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        front_end = FrontEnd(kind, root, port, token, process, dirs["data"], dirs["runtime"])
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    front_end.api("status")
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{module} did not start: {log_path.read_text()[-2000:]}") from None
                    time.sleep(0.3)
            yield front_end
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class NotebookPage:
    """One notebook open in a Playwright page of either front end."""

    CELLS = ".jp-NotebookPanel:visible .jp-Notebook .jp-Cell"

    def __init__(self, page: Any, front_end: FrontEnd) -> None:
        self.page, self.front_end = page, front_end
        self.name: str | None = None

    # ---------------------------------------------------------------- opening

    def open(self, name: str, *, idle: bool = True) -> None:
        """Open the notebook; with ``idle``, wait until its kernel is ready for a cell."""
        self.name = name
        self.page.goto(self.front_end.url(name))
        self.wait_until_connected(idle=idle)

    def reload(self, *, idle: bool = False) -> None:
        self.page.reload()
        self.wait_until_connected(idle=idle)

    def wait_until_connected(self, *, idle: bool, timeout: float = 60) -> None:
        """Wait until the page shows its kernel's status (and, with ``idle``, that it is idle)."""
        self.page.locator(self.CELLS).first.wait_for(timeout=timeout * 1000)
        wanted = re.compile(r"^connected:idle$" if idle else r"^connected:")
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.kernel_status()
            if status and wanted.match(status):
                return
            time.sleep(0.1)
        raise AssertionError(f"the page never showed its kernel {'idle' if idle else 'connected'}: "
                             f"its kernel status reads {status!r}")

    def kernel_status(self) -> str | None:
        """The page's kernel connection and status ("connected:idle", ...), or None."""
        return self.page.evaluate(_KERNEL_STATUS_JS)

    # ---------------------------------------------------------------- cells

    def cell(self, index: int) -> Any:
        return self.page.locator(self.CELLS).nth(index)

    def run_cell(self, index: int) -> None:
        self.cell(index).locator(".jp-InputArea-editor").click()
        self.page.keyboard.press("Shift+Enter")

    def output_text(self, index: int) -> str:
        outputs = self.cell(index).locator(".jp-OutputArea")
        return outputs.inner_text() if outputs.count() else ""

    def wait_for_output(self, index: int, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output_text(index)
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never appeared in cell {index}; it shows {self.output_text(index)!r}")

    def widget_count(self, index: int) -> int:
        """Widget views (ipywidgets or anywidget) in a cell's output."""
        return self.cell(index).locator(".jupyter-widgets, .widget-output, [class*='anywidget']").count()

    # ---------------------------------------------------------------- the notebook

    def save(self, timeout: float = 20) -> None:
        """Ctrl+S, as a person saves; wait until the file on disk has changed."""
        path = self.front_end.root / str(self.name)
        before = path.stat().st_mtime_ns
        self.page.locator(".jp-NotebookPanel:visible .jp-Notebook").first.click(position={"x": 5, "y": 5})
        self.page.keyboard.press("Control+s")
        deadline = time.monotonic() + timeout
        while path.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                raise AssertionError(f"Ctrl+S did not save {self.name} within {timeout:.0f} s")
            time.sleep(0.1)

    def restart_kernel(self) -> None:
        """Kernel menu, "Restart Kernel…", then the dialog's Restart button (↻, not ■)."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).first.click()
        self.page.locator('.lm-Menu-item[data-command="kernelmenu:restart"]').first.click()
        dialog = self.page.locator(".jp-Dialog")
        dialog.wait_for(timeout=10_000)
        dialog.locator("button.jp-mod-accept").click()
        dialog.wait_for(state="detached", timeout=10_000)

    def acknowledge_dialog(self, timeout: float = 20) -> None:
        """Press OK on the dialog the page shows (e.g. "The kernel appears to have died")."""
        dialog = self.page.locator(".jp-Dialog")
        dialog.wait_for(timeout=timeout * 1000)
        dialog.locator("button.jp-mod-accept").click()
        dialog.wait_for(state="detached", timeout=10_000)

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{self.front_end.kind}-{name}.png"))


# The page's own connection to its kernel: "connected:idle", "connected:busy", ... or None.
_KERNEL_STATUS_JS = r"""
() => {
  const app = window.jupyterapp;
  const widget = app && app.shell.currentWidget;
  const kernel = widget && widget.sessionContext && widget.sessionContext.session
    && widget.sessionContext.session.kernel;
  return kernel ? `${kernel.connectionStatus}:${kernel.status}` : null;
}
"""


def package_under_test() -> Path:
    """Where the kernels import qwen_magic from: the first PYTHONPATH entry that has it."""
    for entry in kernel_pythonpath().split(os.pathsep):
        if (Path(entry) / "qwen_magic" / "__init__.py").is_file():
            return (Path(entry) / "qwen_magic").resolve()
    raise RuntimeError(f"no qwen_magic package on {kernel_pythonpath()!r}")


def qwen_outputs(notebook: Any) -> list[tuple[int, list[dict[str, Any]]]]:
    """The outputs of each ``%%qwen`` cell of a saved notebook, by cell index."""
    return [(index, cell.get("outputs", [])) for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and cell.source.startswith("%%qwen")]


def text_problems(notebook: Any, when: str) -> list[str]:
    """Every %%qwen cell that ran must have a display output holding text/markdown or text/html,
    never only a widget view: a notebook reopened later shows the answer, not an empty widget."""
    problems = []
    for index, outputs in qwen_outputs(notebook):
        displays = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")]
        for output in displays:
            data = output.get("data", {})
            if not any(str(data.get(kind, "")).strip() for kind in ("text/markdown", "text/html")):
                problems.append(f"the file saved {when} keeps cell {index}'s output with only "
                                f"{sorted(data)}: {json.dumps(data, ensure_ascii=False)[:300]}")
    return problems


# What a person sees of an element: its computed type and box.
MEASURE_JS = r"""
([cellIndex, needles]) => {
  const cells = Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell'));
  const area = cells[cellIndex] && cells[cellIndex].querySelector('.jp-OutputArea');
  const found = {};
  if (!area) return found;
  // The innermost visible element whose own text holds the needle.
  const all = Array.from(area.querySelectorAll('*')).filter(e => e.getClientRects().length);
  for (const needle of needles) {
    const holders = all.filter(e => (e.textContent || '').includes(needle));
    const innermost = holders.filter(e => !holders.some(o => o !== e && e.contains(o)));
    const el = innermost[innermost.length - 1];
    if (!el) continue;
    const style = getComputedStyle(el);
    let background = 'rgba(0, 0, 0, 0)';
    for (let node = el; node; node = node.parentElement) {
      const bg = getComputedStyle(node).backgroundColor;
      if (bg && !/rgba\(0, 0, 0, 0\)|transparent/.test(bg)) { background = bg; break; }
    }
    const rect = el.getBoundingClientRect();
    found[needle] = {
      tag: el.tagName.toLowerCase(), cls: el.className || '', color: style.color, background,
      fontSize: parseFloat(style.fontSize), lineHeight: style.lineHeight, opacity: parseFloat(style.opacity),
      height: rect.height, text: (el.textContent || '').slice(0, 80),
    };
  }
  return found;
}
"""


def _rgba(css: str) -> tuple[float, float, float, float]:
    numbers = [float(n) for n in re.findall(r"[\d.]+", css)]
    if len(numbers) < 3:
        return (0.0, 0.0, 0.0, 1.0)
    return (numbers[0], numbers[1], numbers[2], numbers[3] if len(numbers) > 3 else 1.0)


def _luminance(rgb: tuple[float, float, float]) -> float:
    def channel(value: float) -> float:
        value /= 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(color: str, background: str, opacity: float = 1.0) -> float:
    """WCAG contrast of a text colour (its alpha and the element's opacity blended) on its background."""
    bg = _rgba(background)
    bg_rgb = (bg[:3] if bg[3] > 0 else (255.0, 255.0, 255.0))
    r, g, b, a = _rgba(color)
    a *= opacity
    blended = tuple(a * c + (1 - a) * base for c, base in zip((r, g, b), bg_rgb))
    lighter, darker = sorted((_luminance(blended), _luminance(bg_rgb)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)
