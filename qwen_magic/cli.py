"""``qwen-magic``: run the offline gateway, or run the tutorials as a demo."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-magic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gateway = commands.add_parser("gateway", help="serve the offline DashScope gateway on 127.0.0.1")
    gateway.add_argument("--port", type=int, default=8765)

    demo = commands.add_parser(
        "demo",
        help="execute the tutorial notebooks (against the offline gateway unless a key is set)",
    )
    demo.add_argument("--offline", action="store_true", help="use the offline gateway even with a key")
    demo.add_argument("--out", type=Path, default=Path("qwen-magic-demo"), help="where executed notebooks go")
    demo.add_argument("--timeout", type=int, default=120, help="seconds a cell may take")

    args = parser.parse_args(argv)
    if args.command == "gateway":
        from .gateway import serve

        serve(port=args.port)
        return 0
    return run_demo(offline=args.offline, out=args.out, timeout=args.timeout)


@contextlib.contextmanager
def _backend(offline: bool) -> Iterator[dict[str, str]]:
    """Environment for the notebooks' kernels: DashScope with the user's key, or the gateway."""
    if os.environ.get("DASHSCOPE_API_KEY") and not offline:
        print("Using DashScope with your DASHSCOPE_API_KEY: the calls are billed to your account.")
        yield dict(os.environ)
        return
    from .gateway import Gateway

    with Gateway() as gateway:
        print(
            f"No DASHSCOPE_API_KEY set (or --offline): using the offline gateway at {gateway.base_url}. "
            "Answers are scripted stand-ins, not a real model."
        )
        yield {**os.environ, "DASHSCOPE_API_KEY": "sk-offline-demo", "DASHSCOPE_BASE_URL": gateway.base_url}


def run_demo(*, offline: bool, out: Path, timeout: int) -> int:
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        print('The demo needs nbclient and ipykernel: pip install "qwen-magic[demo]"', file=sys.stderr)
        return 2
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    if not notebooks:
        print(f"No notebooks found in {NOTEBOOKS}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    with _backend(offline) as env:
        for source in notebooks:
            notebook = nbformat.read(source, as_version=4)
            target = out / source.name
            try:
                NotebookClient(notebook, timeout=timeout, store_widget_state=True).execute(
                    env=env, cwd=str(out)
                )
            except Exception as error:  # report and go on to the next notebook
                failures += 1
                print(f"FAILED {source.name}: {str(error).strip().splitlines()[-1]}", file=sys.stderr)
            nbformat.write(notebook, target)
            print(f"executed {source.name} -> {target.resolve()}")
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
