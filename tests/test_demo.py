"""`qwen-magic demo`, as a newcomer runs it: the real command in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel
COMMAND = shutil.which("qwen-magic") or "qwen-magic"



def _ctrl_c_reaches_it() -> None:
    """In the child: Ctrl-C handled as a terminal would, even when the tests run in a
    background job (which starts with SIGINT ignored, and Python then never raises it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

def demo_env(tmp_path: Path) -> dict[str, str]:
    """No key anywhere (so the demo goes offline), and Jupyter's folders in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASHSCOPE_", "QWEN_MAGIC_", "JPY_", "JUPYTER"))}
    for name in ("home", "config", "data", "runtime"):
        (tmp_path / name).mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               IPYTHONDIR=str(tmp_path / "ipython"))
    return env


def test_headless_demo_executes_every_tutorial_offline_and_writes_html(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run([COMMAND, "demo", "--headless", "--out", str(out)], env=demo_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Offline demo: answers come from the qwen_magic offline gateway at http://127.0.0.1:" in done.stdout
    tutorials = sorted(Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb"))
    assert len(tutorials) >= 4
    for tutorial in tutorials:
        executed, html = out / tutorial.name, (out / tutorial.name).with_suffix(".html")
        assert f"executed {tutorial.name}: {executed.resolve()} and {html.resolve()}" in done.stdout
        notebook = json.loads(executed.read_text())
        outputs = [o for cell in notebook["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
        first_text = "".join(outputs[0].get("text", "")) if outputs else ""
        assert "Offline demo: answers come from the qwen_magic offline gateway" in first_text
        assert "离线演示" in first_text
        assert "out tokens" in html.read_text()
        # The answers stand on their own: no widget state is saved, none is needed to show them.
        assert "widgets" not in notebook["metadata"]
        assert "widget-state+json" not in html.read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_demo_opens_jupyterlab_offline_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = _free_port()
    demo = subprocess.Popen([COMMAND, "demo", "--no-browser", "--port", str(port), "--out", str(tmp_path / "demo")],
                            env=demo_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ctrl_c_reaches_it)
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        while not any("JupyterLab: http://127.0.0.1" in line for line in lines):
            line = demo.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        printed = "".join(lines)
        # Keep reading, as a terminal would: a full pipe would block JupyterLab's and the
        # demo's own shutdown messages, and with them Ctrl-C.
        threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True).start()
        assert "No DashScope API key found -> the tutorials run against the qwen_magic offline gateway" in printed
        gateway_port = int(re.search(r"offline gateway at http://127\.0\.0\.1:(\d+)/api/v1", printed).group(1))
        token = re.search(r"token=([0-9a-f]+)", printed).group(1)
        deadline = time.monotonic() + 90
        while True:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start"
                time.sleep(0.5)
        assert status.status == 200
        contents = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}"))
        assert len([item for item in contents["content"] if item["name"].endswith(".ipynb")]) >= 4
        assert _listening(gateway_port)

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("Ctrl-C did not stop the demo; it printed:\n" + "".join(lines[-30:])) from None
        assert code == 0
        assert not _listening(port) and not _listening(gateway_port)
    finally:
        if demo.poll() is None:
            demo.kill()


def test_the_gateway_command_serves_the_sdk_until_ctrl_c(tmp_path: Path) -> None:
    import dashscope

    port = _free_port()
    server = subprocess.Popen([COMMAND, "gateway", "--port", str(port)], env=demo_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=_ctrl_c_reaches_it)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/api/v1" in banner
        client = dashscope.Client(api_key="sk-offline", base_url=f"http://127.0.0.1:{port}/api/v1", max_retries=0)
        answer = client.chat.completions.create(model="qwen-turbo", messages=[{"role": "user", "content": "Hi"}])
        assert answer.output_text.startswith("This is the qwen_magic offline gateway answering as qwen-turbo.")
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=15) == 0
        assert not _listening(port)
        assert "Traceback" not in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
