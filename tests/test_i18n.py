"""The message catalogs: every message has its translations, and the language follows the setting."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from qwen_magic import i18n
from qwen_magic.gateway import Gateway, Reply

from .conftest import run_cell

ROOT = Path(__file__).resolve().parents[1]


def _messages_script():
    spec = importlib.util.spec_from_file_location("messages_script", ROOT / "scripts" / "messages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


messages = _messages_script()


@pytest.mark.parametrize(
    ("environ", "language"),
    [
        ({"LC_ALL": "zh_CN.UTF-8"}, "zh"),
        ({"LANG": "zh_TW.UTF-8"}, "zh"),
        ({"LANGUAGE": "zh_CN:en_US"}, "zh"),
        ({"LC_MESSAGES": "en_US.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),  # the first one set decides
        ({"LC_ALL": "", "LANG": "zh_SG.UTF-8"}, "zh"),  # empty is unset
        ({"LANG": "C.UTF-8"}, "en"),
        ({"LANG": "ja_JP.UTF-8"}, "en"),
        ({}, "en"),
    ],
)
def test_auto_follows_the_locale(environ: dict[str, str], language: str) -> None:
    assert i18n.resolve("auto", environ) == language
    assert i18n.resolve("zh", environ) == "zh" and i18n.resolve("en", environ) == "en"


def test_every_message_in_the_code_has_its_translations() -> None:
    assert messages.problems() == []


def test_the_compiled_catalogs_are_those_of_the_po_files() -> None:
    # The .mo files ship in the wheel; a .po edited but not compiled would not be what users see.
    assert messages.main(["--check"]) == 0


def test_the_check_finds_a_missing_and_a_mistranslated_message(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "module.py").write_text(
        'from qwen_magic.i18n import _, N_\n'
        'GREETING = N_("Hello, {name}.")\n'
        'def f():\n    return _("Refused: {cost} is over the budget.")\n',
        encoding="utf-8",
    )
    locale = tmp_path / "locale"
    shutil.copytree(i18n.LOCALE_DIR, locale)
    found = messages.problems(package, locale)
    assert "zh: no translation of 'Hello, {name}.'" in found
    assert "zh: no translation of 'Refused: {cost} is over the budget.'" in found

    # Translated, but with a field renamed: the message would fail when filled in.
    po = messages.po_path("zh", locale)
    catalog = messages.updated("zh", messages.extracted(package), locale)
    catalog["Hello, {name}."].string = "你好，{名字}。"
    catalog["Refused: {cost} is over the budget."].string = "已拒绝：{cost} 超出预算。"
    po.write_bytes(messages.po_bytes(catalog))
    assert messages.problems(package, locale) == [
        "zh: the fields of 'Hello, {name}.' differ in '你好，{名字}。'"
    ]


def test_fields_ignore_doubled_braces() -> None:
    assert messages.fields("{{name}} and {model} at {cost:.4f}") == {"model", "cost:.4f"}


def test_an_error_in_each_language(shell, gateway: Gateway, capsys, monkeypatch) -> None:
    gateway.script(Reply(status=401, error_code="InvalidApiKey"), times=None)
    run_cell(shell, "%%qwen --no-history\nhello")
    english = capsys.readouterr()
    assert "DashScope error InvalidApiKey" in english.out + english.err
    assert "keys are region-specific" in english.out + english.err

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    run_cell(shell, "%%qwen --no-history\nhello")
    chinese = capsys.readouterr()
    said = chinese.out + chinese.err
    assert "DashScope 错误 InvalidApiKey" in said and "region-specific" not in said
    assert "）请检查 Key：Key 按地域区分" in said

    # auto follows the locale, read at each cell (so %env LANG=... takes effect at once).
    shell.run_line_magic("config", "QwenMagic.language = 'auto'")
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    run_cell(shell, "%%qwen --no-history\nhello")
    assert "DashScope 错误" in "".join(capsys.readouterr())
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    run_cell(shell, "%%qwen --no-history\nhello")
    assert "DashScope error InvalidApiKey" in "".join(capsys.readouterr())


# ---- the live view, tools, schema and the command line, in Chinese

TOOL_FUNCTIONS = '''
def population(city: str) -> dict:
    """People living in a city."""
    return {"city": city, "people": 1000}
'''


def test_a_tool_calls_live_lines_in_chinese(shell, gateway: Gateway, capsys) -> None:
    from qwen_magic.tools import ToolCall, ask_confirmation

    assert run_cell(shell, TOOL_FUNCTIONS).success
    gateway.script(
        Reply(tool_calls=[{"name": "delete_everything", "arguments": {}},
                          {"name": "population", "arguments": {"town": "杭州"}},
                          {"name": "population", "arguments": {"city": "杭州"}}]),
        Reply(text="杭州有 1000 人。"),
    )
    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    assert run_cell(shell, "%%qwen --tools population -o r\n杭州有多少人？").success
    said = "".join(capsys.readouterr())
    assert "→ delete_everything()" in said
    assert "✖ 没有名为 'delete_everything' 的工具；可用的工具：population" in said
    assert "✖ 参数与 population(city: str) -> dict 不符：多余的参数 'town'" in said
    assert "← {\"city\": \"杭州\", \"people\": 1000}" in said
    assert "no tool named" not in said and "unexpected argument" not in said
    # What the cell showed is what the model was told.
    told = [m["content"] for m in gateway.requests[1].messages if m["role"] == "tool"]
    assert told[0] == "Error: 没有名为 'delete_everything' 的工具；可用的工具：population"
    # Asking before a call runs: the question in Chinese, a Chinese yes accepted.
    asked: list[str] = []
    call = ToolCall("call_1", "population", {"city": "杭州"})
    assert ask_confirmation(call, lambda prompt: asked.append(prompt) or "是")
    assert asked == ["→ population(city='杭州') — 运行吗？[y/N] "]


def test_a_schema_refusal_and_a_validation_line_in_chinese(shell, gateway: Gateway, capsys) -> None:
    from .conftest import refusal

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    line = refusal(shell, capsys, "%%qwen --schema nowhere\nwho?")
    assert line == "UsageError: --schema nowhere：笔记本中没有定义这个名称。"
    assert gateway.requests == []

    person = '{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, ' \
             '"required": ["name", "age"]}'
    assert run_cell(shell, f"person = {person}").success
    gateway.script(Reply(text='{"name": "Li", "age": "thirty"}'), times=None)
    run_cell(shell, "%%qwen --schema person --retries 0 -o who\nwho?")
    said = "".join(capsys.readouterr())
    assert "字段 age：应为 integer，实际为 str" in said and "expected integer" not in said
    gateway.reset()
    gateway.script(Reply(text='{"name": "Li"}'), times=None)
    run_cell(shell, "%%qwen --schema person --retries 0 -o who\nwho?")
    assert "字段 age：缺失" in "".join(capsys.readouterr())


def test_the_widget_views_own_lines_follow_the_language(monkeypatch) -> None:
    """The lines the browser code shows come from the widget's state, in the answer's language:
    also for a widget opened after one in English (the opening state is shared by the class)."""
    import comm

    from qwen_magic.view import WIDGET_VIEW_MIME, WidgetView

    opened: list[dict] = []
    create = comm.create_comm
    monkeypatch.setattr(comm, "create_comm", lambda **args: opened.append(args["data"]["state"]) or create(**args))
    outputs: list[dict] = []

    def display(bundle: dict, **kwargs):
        outputs.append(bundle)

    try:
        for language in ("en", "zh"):
            i18n.use(language)
            view = WidgetView(display)
            view.show_answer(["半个回答"])
        english, chinese = opened
        assert english["restarted_note"] == "The kernel restarted: the answer stopped here."
        assert english["streaming_note"] == "The answer was still streaming when this output was saved."
        assert chinese["restarted_note"] == "内核已重启：回答到此为止。"
        assert chinese["streaming_note"] == "保存此输出时，回答仍在流式输出中。"
        # Read again by a page (a reload): the same lines.
        state = view.widget.get_state()
        assert state["restarted_note"] == "内核已重启：回答到此为止。"
        assert state["streaming_note"] == "保存此输出时，回答仍在流式输出中。"
        # Beside the widget, for readers of a notebook saved mid-stream.
        bundle = outputs[-1]
        assert WIDGET_VIEW_MIME in bundle
        assert bundle["text/plain"] == "半个回答\n\n[保存此输出时，回答仍在流式输出中。]"
        assert "<em>保存此输出时，回答仍在流式输出中。</em>" in bundle["text/html"]
        # The browser code has no words of its own.
        from qwen_magic.view import _ESM

        assert "still streaming" not in _ESM and "restarted:" not in _ESM
    finally:
        i18n.use("en")


def test_the_terminal_views_headings_in_chinese() -> None:
    import io

    from qwen_magic.view import TerminalView

    out = io.StringIO()
    try:
        i18n.use("zh")
        view = TerminalView(out)
        view.add_reasoning("六乘七。")
        view._pacer._next = 0.0  # the next write is due now
        view.show_answer(["42。"])
    finally:
        i18n.use("en")
    assert out.getvalue() == "[思考]\n六乘七。\n[回答]\n42。"


def _cli(arguments: list[str], lang: str) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANGUAGE")}
    env.update(LANG=lang, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qwen_magic.cli", *arguments], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_command_line_follows_the_terminals_locale(tmp_path: Path, monkeypatch, capsys) -> None:
    chinese = _cli(["--help"], "zh_CN.UTF-8")
    assert chinese.returncode == 0, chinese.stderr
    assert "qwen-magic：演示（在教程上打开 JupyterLab）与离线网关。" in chinese.stdout
    assert "在 127.0.0.1 上运行离线 DashScope 网关" in chinese.stdout
    english = _cli(["demo", "--help"], "C.UTF-8")
    assert "do not open a browser" in english.stdout
    assert "不打开浏览器" in _cli(["demo", "--help"], "zh_CN.UTF-8").stdout

    # The headless demo's lines: offline, then no tutorials to run.
    from qwen_magic import cli

    empty = tmp_path / "notebooks"
    empty.mkdir()
    monkeypatch.setattr(cli, "NOTEBOOKS", empty)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    monkeypatch.delenv("LANGUAGE", raising=False)
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main(["demo", "--headless", "--out", str(tmp_path / "demo")])
    finally:
        i18n.use("en")
    assert str(stopped.value) == f"qwen-magic：在 {empty} 中找不到教程"
    assert "离线演示：回答来自 qwen_magic 的离线网关 http://127.0.0.1:" in capsys.readouterr().out
