"""Behaviour that differs between IPython majors, checked on both: the one installed, and the
other in a virtual environment made for the test (on top of this one's packages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from qwen_magic.gateway import Gateway, Reply

from .conftest import TEST_KEY

REPO = Path(__file__).resolve().parents[1]

# Three cells, numbered by the shell as a notebook numbers them; the second asks, the third
# reads the ledger. Prints what the ledger calls the asking cell and what its prompt number was.
SCRIPT = textwrap.dedent(
    """
    import json, IPython
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext qwen_magic", store_history=True)
    asked = shell.run_cell("%%qwen\\nHello?", store_history=True)
    shell.run_cell("report = %qwen usage", store_history=True)
    magic = shell.magics_manager.registry["QwenMagic"]
    print(json.dumps({
        "ipython": IPython.version_info[0],
        "prompt_number": asked.execution_count,
        "labels": [call.cell for call in magic.session.ledger.records],
        "error": repr(asked.error_in_exec or asked.error_before_exec),
    }))
    """
)


def _other_major() -> str:
    import IPython

    return "ipython>=8.12,<9" if IPython.version_info[0] >= 9 else "ipython>=9,<10"


@pytest.fixture(scope="module")
def other_ipython(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Python whose IPython is the other major version (the rest of the packages are shared)."""
    venv = tmp_path_factory.mktemp("other-ipython")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", _other_major()],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    yield python


def _run(python: Path | str, gateway: Gateway, tmp_path: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DASHSCOPE_", "QWEN_MAGIC_", "JPY_"))}
    env.update(
        PYTHONPATH=str(REPO), HOME=str(tmp_path), IPYTHONDIR=str(tmp_path / "ipython"),
        DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
        QWEN_MAGIC_STORE=str(tmp_path / "history.sqlite3"),
    )
    done = subprocess.run([str(python), "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["installed", "other"])
def test_usage_names_the_cell_by_its_prompt_number(
    which: str, gateway: Gateway, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # IPython 9 counts a cell before it runs, IPython 8 after: the ledger must follow neither
    # blindly, but name the cell as the front end shows it.
    python = sys.executable if which == "installed" else request.getfixturevalue("other_ipython")
    gateway.script(Reply(chunks=["Hi."]))
    seen = _run(python, gateway, tmp_path)
    assert seen["error"] == "None", seen
    assert seen["prompt_number"] == 2, seen  # %load_ext was In [1]
    assert seen["labels"] == ["In [2]"], seen
    if which == "other":
        import IPython

        assert seen["ipython"] != IPython.version_info[0]
