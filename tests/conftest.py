"""Shared fixtures: the offline gateway, a real IPython shell, a real kernel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from qwen_magic.gateway import Gateway

TEST_KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="session")
def gateway_server() -> Iterator[Gateway]:
    with Gateway() as server:
        yield server


@pytest.fixture
def gateway(gateway_server: Gateway) -> Iterator[Gateway]:
    """The session's gateway, with no scripts or recorded requests left from other tests."""
    gateway_server.reset()
    yield gateway_server
    gateway_server.reset()


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No settings of the developer's own: HOME, DASHSCOPE_* and the history file are the test's."""
    for name in list(os.environ):
        if name.startswith(("DASHSCOPE_", "QWEN_MAGIC_", "JPY_")) or name in ("LC_ALL", "LC_MESSAGES", "LANGUAGE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LANG", "C.UTF-8")  # messages in English unless a test asks for another language
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("QWEN_MAGIC_STORE", str(tmp_path / "history.sqlite3"))
    return home


@pytest.fixture
def shell(gateway: Gateway, isolated_env: Path, monkeypatch: pytest.MonkeyPatch):
    """A real InteractiveShell with qwen_magic freshly loaded, pointed at the gateway."""
    from IPython.testing import globalipapp

    globalipapp.start_ipython()  # once per process; later calls do nothing
    ip = globalipapp.get_ipython()
    monkeypatch.setenv("DASHSCOPE_API_KEY", TEST_KEY)
    monkeypatch.setenv("DASHSCOPE_BASE_URL", gateway.base_url)
    ip.config.pop("QwenMagic", None)  # %config of an earlier test lives in the shell's config
    ip.run_line_magic("reload_ext", "qwen_magic")
    yield ip
    ip.run_line_magic("unload_ext", "qwen_magic")
    ip.config.pop("QwenMagic", None)
    from qwen_magic import i18n

    i18n.use("en")  # a test that switched language leaves the next one in English


def run_cell(shell, cell: str):
    """One cell in the shell, kept out of its history (tests run many)."""
    return shell.run_cell(cell, store_history=False)


def shown(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def refusal(shell, capsys, cell: str) -> str:
    """Run a cell that must be refused with one UsageError line (no traceback, never the key);
    return that line as shown."""
    from IPython.core.error import UsageError

    outcome = run_cell(shell, cell)
    text = shown(capsys)
    assert not outcome.success, text
    assert isinstance(outcome.error_in_exec, UsageError), repr(outcome.error_in_exec)
    assert "Traceback" not in text and TEST_KEY not in text, text
    assert "\n" not in str(outcome.error_in_exec), str(outcome.error_in_exec)
    lines = [line for line in text.splitlines() if line.startswith("UsageError: ")]
    assert len(lines) == 1, text
    return lines[0]
