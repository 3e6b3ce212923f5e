"""``qwen-magic``: the demo (JupyterLab on the tutorials) and the offline gateway.

    qwen-magic demo              JupyterLab open on the tutorials (offline gateway unless a key is set)
    qwen-magic demo --headless   execute every tutorial offline; write notebooks and HTML
    qwen-magic gateway           serve the offline DashScope gateway on 127.0.0.1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from . import i18n
from .i18n import N_, _

if TYPE_CHECKING:  # pragma: no cover
    from .gateway import Gateway

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
OFFLINE_ENV = "QWEN_MAGIC_OFFLINE_GATEWAY"  # set for kernels that talk to the offline gateway
# The module's docstring, as --help shows it.
DESCRIPTION = N_(
    "qwen-magic: the demo (JupyterLab on the tutorials) and the offline gateway.\n"
    "\n"
    "    qwen-magic demo              JupyterLab open on the tutorials (offline gateway unless a key is set)\n"
    "    qwen-magic demo --headless   execute every tutorial offline; write notebooks and HTML\n"
    "    qwen-magic gateway           serve the offline DashScope gateway on 127.0.0.1"
)


def _gateway_banner(gateway: "Gateway") -> str:
    return _(
        "qwen_magic offline gateway at {url} - in a notebook: %env DASHSCOPE_BASE_URL={url} and any key, "
        "e.g. %env DASHSCOPE_API_KEY=sk-offline (compatible mode: {compatible_url}; Ctrl-C stops)"
    ).format(url=gateway.base_url, compatible_url=gateway.compatible_base_url)


def main(argv: Sequence[str] | None = None) -> int:
    i18n.use("auto")  # no kernel here: the terminal's locale decides
    parser = argparse.ArgumentParser(prog="qwen-magic", description=_(DESCRIPTION),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help=_("serve the offline DashScope gateway on 127.0.0.1"))
    gateway.add_argument("--port", type=int, default=8765)

    demo = commands.add_parser("demo", help=_("JupyterLab on the tutorials (or --headless: execute them)"))
    demo.add_argument("--headless", action="store_true",
                      help=_("execute every tutorial against the offline gateway and write notebooks and HTML"))
    demo.add_argument("--offline", action="store_true", help=_("use the offline gateway even with a key"))
    demo.add_argument("--out", type=Path, default=Path("qwen-magic-demo"),
                      help=_("the folder for the tutorials' working copies (default: ./qwen-magic-demo)"))
    demo.add_argument("--port", type=int, default=8888, help=_("JupyterLab's port on 127.0.0.1"))
    demo.add_argument("--no-browser", action="store_true", help=_("do not open a browser"))
    demo.add_argument("--timeout", type=int, default=120, help=_("--headless: seconds a cell may take"))

    args = parser.parse_args(argv)
    if args.command == "gateway":
        from .gateway import serve

        serve(port=args.port, announce=_gateway_banner)
        return 0
    if args.headless:
        return run_headless(out=args.out, timeout=args.timeout)
    return run_lab(out=args.out, port=args.port, offline=args.offline, open_browser=not args.no_browser)


def _tutorials() -> list[Path]:
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    if not notebooks:
        raise SystemExit(_("qwen-magic: no tutorials found in {folder}").format(folder=NOTEBOOKS))
    return notebooks


def _has_key() -> bool:
    from .client import key_source

    return key_source(None)[0] is not None


@contextlib.contextmanager
def offline_backend() -> Iterator[dict[str, str]]:
    """The offline gateway on a free loopback port, and the environment that points kernels at it."""
    from .gateway import Gateway

    with Gateway() as gateway:
        yield {
            "DASHSCOPE_API_KEY": "sk-offline-demo",
            "DASHSCOPE_BASE_URL": gateway.base_url,
            OFFLINE_ENV: gateway.base_url,
        }


def run_headless(*, out: Path, timeout: int) -> int:
    """Execute every tutorial against the offline gateway; write the notebooks and HTML."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbconvert import HTMLExporter
    except ImportError:
        print(_('The demo needs its extras: python -m pip install -e ".[demo]"'), file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with offline_backend() as backend:
        print(_("Offline demo: answers come from the qwen_magic offline gateway at {url}, not from a model.")
              .format(url=backend["DASHSCOPE_BASE_URL"]))
        env = {**os.environ, **backend, "QWEN_MAGIC_STORE": str(out.resolve() / "history.sqlite3")}
        for source in _tutorials():
            notebook = nbformat.read(source, as_version=4)
            env["JPY_SESSION_NAME"] = source.name
            try:
                # The answers' outputs need no widget state; nbclient would save the state of every
                # live view's widgets, closed ones too, and the HTML would then load a widget manager.
                NotebookClient(notebook, timeout=timeout, store_widget_state=False).execute(env=env, cwd=str(out))
            except Exception as error:  # report it, write what ran, go on to the next tutorial
                failures += 1
                print(_("FAILED {notebook}: {error}").format(notebook=source.name, error=str(error).strip().splitlines()[-1]),
                      file=sys.stderr)
            executed = out / source.name
            nbformat.write(notebook, executed)
            html, _resources = HTMLExporter().from_notebook_node(notebook)
            executed.with_suffix(".html").write_text(html, encoding="utf-8")
            print(_("executed {notebook}: {path} and {html}").format(
                notebook=source.name, path=executed.resolve(), html=executed.with_suffix(".html").resolve()))
    return 1 if failures else 0


def run_lab(*, out: Path, port: int, offline: bool, open_browser: bool) -> int:
    """JupyterLab on working copies of the tutorials, until Ctrl-C stops everything."""
    if shutil.which("jupyter") is None or subprocess.run(
        [sys.executable, "-c", "import jupyterlab"], capture_output=True
    ).returncode:
        print(_('JupyterLab is not installed: python -m pip install -e ".[demo]"'), file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for source in _tutorials():
        copy = out / source.name
        if not copy.exists():  # the user's edits to an earlier copy are kept
            shutil.copy2(source, copy)
    token = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if offline or not _has_key():
            backend = stack.enter_context(offline_backend())
            env.update(backend)
            said = _("--offline given -> the tutorials run against the qwen_magic offline gateway at {url}: "
                     "answers are canned, nothing is billed. Set DASHSCOPE_API_KEY and run again for real answers.") if offline else _(
                     "No DashScope API key found -> the tutorials run against the qwen_magic offline gateway at {url}: "
                     "answers are canned, nothing is billed. Set DASHSCOPE_API_KEY and run again for real answers.")
            print(said.format(url=backend["DASHSCOPE_BASE_URL"]))
        else:
            print(_("Using DashScope with your API key: calls are billed to your account. "
                    "Each tutorial shows what it spends under every answer."))
        command = [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", f"--port={port}",
                   f"--ServerApp.root_dir={out.resolve()}", f"--IdentityProvider.token={token}",
                   "--ServerApp.port_retries=0", "--LabApp.default_url=/lab/tree/" + _tutorials()[0].name]
        if not open_browser:
            command.append("--no-browser")
        if os.geteuid() == 0:
            command.append("--allow-root")
        lab = subprocess.Popen(command, env=env)
        print(_("JupyterLab: {url}  (Ctrl-C stops JupyterLab and the gateway)").format(
            url=f"http://127.0.0.1:{port}/lab?token={token}"), flush=True)
        try:
            while True:
                # Waited on in short steps: Ctrl-C may reach one of the gateway's threads, and
                # then only a main thread that wakes up notices it.
                try:
                    return lab.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:
            print("\n" + _("Stopping JupyterLab and the gateway…"), flush=True)
            lab.send_signal(signal.SIGTERM)
            try:
                lab.wait(timeout=15)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait()
            return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
