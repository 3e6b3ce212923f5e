"""The tutorial notebooks, run top to bottom as a reader would, against the offline gateway.

Each notebook is executed by nbclient in a fresh kernel (its own HOME, history file and
working directory), then checked for what a person following it expects to see: no errors
but the refusals it announces, an answer with its footer under every ``%%qwen`` cell, the
tables of the ``%qwen`` commands, and never the API key.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from qwen_magic.gateway import Gateway

from .conftest import TEST_KEY
from .kernel_harness import kernel_env

pytestmark = pytest.mark.kernel

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

RAISES = "raises-exception"
FOOTER = re.compile(r"[\d,]+ in / [\d,]+ out tokens.*(¥\d|cost unknown)")
CJK = re.compile(r"[\u4e00-\u9fff]")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What a tutorial cell must not contain: it has to run unchanged against DashScope.
OFFLINE_ONLY = ("gateway", "127.0.0.1", "localhost", "DASHSCOPE_BASE_URL", "base_url", "--base-url", "Reply(", "sk-")


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _first_line(cell: Any) -> str:
    return cell.source.strip().splitlines()[0] if cell.source.strip() else ""


def _text(output: Any) -> str:
    """What a reader sees of an output, as plain text."""
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return ANSI.sub("", "\n".join(output.traceback)) or f"{output.ename}: {output.evalue}"
    data = output.get("data", {})
    return data.get("text/plain") or data.get("text/markdown") or ""


def _shown(cell: Any) -> str:
    return "\n".join(_text(output) for output in cell.outputs)


def _is_cell_magic(cell: Any) -> bool:
    return cell.cell_type == "code" and _first_line(cell).startswith("%%qwen")


def _sends(cell: Any) -> bool:
    """A %%qwen cell (or %qwen fix) that asks the model (not a dry run, not a refusal the notebook announces)."""
    asks = _is_cell_magic(cell) or _line_magic(cell, "fix")
    return asks and "--dry-run" not in _first_line(cell) and RAISES not in _tags(cell)


def _line_magic(cell: Any, command: str) -> bool:
    return cell.cell_type == "code" and re.fullmatch(rf"%qwen {command}\b.*", cell.source.strip()) is not None


def test_four_tutorials_in_reading_order() -> None:
    assert len(NOTEBOOKS) >= 4, f"expected at least four tutorials in {NOTEBOOK_DIR}"
    names = [path.name for path in NOTEBOOKS]
    assert all(re.fullmatch(r"\d\d-[a-z0-9-]+\.ipynb", name) for name in names), names
    # Numbered in reading order from 01; a number may be held for a tutorial still to come.
    numbers = [int(name[:2]) for name in names]
    assert numbers[0] == 1 and numbers == sorted(set(numbers)), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_is_saved_clean_and_bilingual(path: Path) -> None:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    assert 15 <= len(nb.cells) <= 32
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids), "every cell needs its own id"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"saved with outputs: {cell.source[:60]!r}"
            assert not any(word in cell.source for word in OFFLINE_ONLY), f"not for DashScope: {cell.source!r}"
            assert "%qwen login" not in cell.source, "login waits for a key at a prompt: show it, do not run it"
        else:
            # English, then Chinese.
            english = re.search(r"[A-Za-z]{3,}", cell.source)
            chinese = CJK.search(cell.source)
            assert english and chinese and english.start() < chinese.start(), f"not bilingual: {cell.source[:80]!r}"
    assert any(_sends(cell) for cell in nb.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_runs_top_to_bottom(path: Path, gateway: Gateway, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    env = kernel_env(
        tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url, JPY_SESSION_NAME=path.name
    )
    NotebookClient(nb, timeout=120, store_widget_state=True).execute(env=env, cwd=str(tmp_path))

    assert TEST_KEY not in nbformat.writes(nb), "the API key is in the executed notebook"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), "a cell did not run"

    for position, cell in enumerate(code_cells):
        where = f"{path.name}: {_first_line(cell)!r}"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        stderr = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        following = code_cells[position + 1] if position + 1 < len(code_cells) else None
        if RAISES in _tags(cell) and following is not None and _line_magic(following, "fix"):
            # An error made on purpose, for the %qwen fix that follows: a real traceback.
            assert errors and errors[0].ename not in ("UsageError", "QwenAPIError"), f"{where}: {cell.outputs}"
            continue
        if RAISES in _tags(cell):
            # The refusal the notebook announces: one line, no traceback, no answer.
            report = "".join(_text(o) for o in errors + stderr).strip()
            assert report, f"{where}: tagged {RAISES} but nothing failed"
            assert len(report.splitlines()) == 1, f"{where}: more than one line:\n{report}"
            assert "Traceback" not in report and 'File "' not in report and "--->" not in report
            assert report.startswith("UsageError: Refused, nothing sent"), f"{where}: {report}"
            assert not [o for o in cell.outputs if o.output_type == "display_data"], f"{where}: shows an answer"
            continue
        assert not errors, f"{where}: {[_text(o) for o in errors]}"
        assert not stderr, f"{where}: {''.join(o.text for o in stderr)}"

        if _sends(cell):
            shown = [o for o in cell.outputs if o.output_type == "display_data"]
            assert len(shown) == 1, f"{where}: {len(shown)} display_data outputs"
            data = shown[0].data
            assert {"text/markdown", "text/html"} <= set(data), f"{where}: {sorted(data)}"
            assert 'class="qwen-footer"' in data["text/html"]
            footer = [line for line in data["text/markdown"].splitlines() if FOOTER.search(line)]
            assert footer, f"{where}: no footer in\n{data['text/markdown']}"
            assert "qwen_magic" in shown[0].metadata, f"{where}: the output does not carry its turn"
        elif _is_cell_magic(cell):  # --dry-run
            assert "Dry run: nothing was sent." in _shown(cell), where

    # Every announced refusal sent nothing: one request per %%qwen cell that asks, two for a
    # cell with --tools (offline, the gateway calls the tools once, then answers), and for a job
    # over rows (--map, qwen_magic.map) the requests its summary counts.
    jobs = [o.metadata["qwen_magic"] for cell in code_cells for o in cell.outputs
            if o.output_type == "display_data" and o.metadata.get("qwen_magic", {}).get("kind") == "map"]
    asked = sum(_sends(cell) * (2 if " --tools " in _first_line(cell) else 1)
                for cell in code_cells if "--map" not in _first_line(cell))
    assert len(gateway.requests) == asked + sum(job["requests"] for job in jobs)
    assert all(request.api_key == TEST_KEY for request in gateway.requests)

    for cell in code_cells:
        shown = _shown(cell)
        if _line_magic(cell, "models"):
            if cell.source.strip() == "%qwen models":
                for expected in ("qwen-plus", "qwen-max", "¥/1M in→out", "QPM", "Override:"):
                    assert expected in shown
            else:
                name = cell.source.split()[-1]
                for expected in (name, "max input", "price,", "rate limit"):
                    assert expected in shown
        elif _line_magic(cell, "usage"):
            assert "total: ¥" in shown and "complete" in shown and "in ░ out" in shown
        elif _line_magic(cell, "config"):
            assert "api key" in shown and "sk-…" in shown and "environment variable DASHSCOPE_API_KEY" in shown
            assert gateway.base_url in shown and "model" in shown
        elif _line_magic(cell, "chats"):
            assert f"Chats of {path.name}" in shown
        elif _line_magic(cell, "count"):
            assert "as a one-message request" in shown and "input cost" in shown
        elif _line_magic(cell, "budget"):
            assert ("Budget ¥" in shown) or ("No budget set" in shown)
        elif _line_magic(cell, "resume"):
            assert shown.startswith("Restored chat 'default'"), shown
        elif _line_magic(cell, "export"):
            target = tmp_path / cell.source.split()[-1]
            assert target.read_text(encoding="utf-8").startswith("# Chat: default")
        elif cell.source.strip() == "facts.value":
            value = ast.literal_eval(shown)
            assert isinstance(value, dict) and value, shown


def test_tutorials_cover_the_magic() -> None:
    """Between them, the tutorials run every option and command the README documents."""
    sources = "\n".join(
        cell.source for path in NOTEBOOKS for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    )
    for option in ("-m", "-t", "--max-tokens", "-o", "-c", "-s", "-n", "--no-history", "--max-history",
                   "--dry-run", "--max-cost", "-f json", "-f code", "-f text", "--no-interp", "--thinking",
                   "--search", "--image", "--cells", "--file", "--tools", "--schema"):
        assert re.search(rf"^%%qwen .*(?<![\w-]){re.escape(option)}(\s|$)", sources, re.MULTILINE), option
    for command in ("config", "models", "help", "chats", "history", "undo", "export", "resume", "reset",
                    "count", "usage", "budget", "fix"):
        assert re.search(rf"^%qwen {command}\b", sources, re.MULTILINE), command
    for setting in ("QwenMagic.model ", "QwenMagic.models", "QwenMagic.stream"):
        assert f"%config {setting}" in sources, setting
    assert sources.count("%load_ext qwen_magic") == len(NOTEBOOKS), "each tutorial loads the extension once"


FOOTER_ZH = re.compile(r"输入 [\d,]+ / 输出 [\d,]+ tokens.*(¥\d|费用未知)")
# One tutorial is run in Chinese: the language is chosen once, from the kernel's locale, the same
# way for every notebook; this one shows the most of what is said under a cell (priced and
# unpriced footers, a dry run, a budget and a --max-cost refusal, the usage table), and its
# Chinese half shows the footer as it is printed.
CHINESE_RUN = NOTEBOOK_DIR / "03-tokens-and-money.ipynb"
_NUMBERS = re.compile(r"\d[\d,.]*")


def _footer_shape(footer: str) -> str:
    """A footer with its figures blanked and without the speed (which a quick answer may lack)."""
    return re.sub(r" · N tokens/秒$", "", _NUMBERS.sub("N", footer.strip("*` ")))


def test_a_tutorial_run_with_a_chinese_locale_shows_chinese_footers(gateway: Gateway, tmp_path: Path) -> None:
    path = CHINESE_RUN
    nb = nbformat.read(path, as_version=4)
    env = kernel_env(tmp_path, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     JPY_SESSION_NAME=path.name, LANG="zh_CN.UTF-8")
    NotebookClient(nb, timeout=120, store_widget_state=True).execute(env=env, cwd=str(tmp_path))

    footers, refusals, unpriced = [], 0, 0
    for cell in (cell for cell in nb.cells if cell.cell_type == "code"):
        where = f"{path.name}: {_first_line(cell)!r}"
        if _sends(cell):
            (shown,) = [o for o in cell.outputs if o.output_type == "display_data"]
            markdown, html = shown.data["text/markdown"], shown.data["text/html"]
            footer = [line for line in markdown.splitlines() if FOOTER_ZH.search(line)]
            assert footer, f"{where}: no Chinese footer in\n{markdown}"
            assert not FOOTER.search(markdown) and "out tokens" not in html, f"{where}: an English footer"
            assert 'class="qwen-footer"' in html and "输入 " in html
            footers.append(footer[0])
            unpriced += "费用未知" in footer[0]
        elif RAISES in _tags(cell):
            report = _shown(cell).strip()
            assert report.startswith("UsageError: 已拒绝，未发送："), f"{where}: {report}"
            assert len(report.splitlines()) == 1 and "Refused" not in report
            refusals += 1
        elif "--dry-run" in _first_line(cell):
            assert "试运行：未发送任何内容。" in _shown(cell), where
        elif _line_magic(cell, "usage"):
            shown_text = _shown(cell)
            assert "合计：¥" in shown_text and "完成" in shown_text and "总计" not in shown_text, shown_text
    assert refusals == 2 and unpriced == 1 and len(footers) == sum(_sends(cell) for cell in nb.cells)

    # The Chinese half of "The footer, field by field" shows a footer the way the run printed one.
    documented = re.search(r"`(qwen-plus · 输入[^`]+)`", "".join(c.source for c in nb.cells if c.cell_type == "markdown"))
    assert documented, "the tutorial shows no Chinese footer"
    assert _footer_shape(documented.group(1)) in {_footer_shape(footer) for footer in footers}
