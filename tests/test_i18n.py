"""The message catalogs: every message has its translations, and the language follows the setting."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from IPython.lib.pretty import pretty

from qwen_magic import i18n
from qwen_magic.client import Usage
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.result import FAILED, INTERRUPTED, QwenResult

from .conftest import TEST_KEY, run_cell
from .kernel_harness import KernelSession, kernel_env

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


# ---- the footer, refusals and errors of a cell, in each language

ZH_FOOTER = re.compile(
    r"^\*qwen-plus · 输入 1,204 / 输出 310 tokens · ¥0\.0016 · 对话 default 第 1 轮 · 本会话 ¥[\d.]+ · [\d.]+ 秒"
    r"( · [\d,]+ tokens/秒)?\*$"
)
EN_FOOTER = re.compile(
    r"^\*qwen-plus · 1,204 in / 310 out tokens · ¥0\.0016 · chat default, turn 1 · session ¥[\d.]+ · [\d.]+ s"
    r"( · [\d,]+ tok/s)?\*$"
)
EN_ERROR = (
    "DashScope error InvalidApiKey: Invalid API-key provided. (request id req-401) Check the key: keys are "
    "region-specific (mainland vs international), so use the key of the region you call; set it with "
    "%qwen login or DASHSCOPE_API_KEY."
)
ZH_ERROR = (
    "DashScope 错误 InvalidApiKey：Invalid API-key provided。（请求 ID req-401）请检查 Key：Key 按地域区分"
    "（中国内地与国际站），请使用所调用地域的 Key；可用 %qwen login 或 DASHSCOPE_API_KEY 设置。"
)


def _a_cell_a_refusal_and_an_error(session: KernelSession, gateway: Gateway) -> tuple[str, str, str]:
    """The footer of an answer, a --max-cost refusal and a DashScope error, as the kernel shows them."""
    gateway.script(Reply(text="Five.", usage={"input_tokens": 1_204, "output_tokens": 310}))
    answered = session.execute("%%qwen -n\nHow many?")  # -n: turn 1 of chat default, in every language
    assert answered.status == "ok", answered.outputs
    (shown,) = [o for o in answered.outputs if o["output_type"] == "display_data"]
    footer = shown["data"]["text/markdown"].splitlines()[-1]

    refused = session.execute("%%qwen --max-cost 0.0001\nHow many?")
    assert refused.status == "error" and refused.error is None  # one line, no traceback
    refusal = "".join(o["text"] for o in refused.outputs if o["output_type"] == "stream").strip()

    gateway.script(Reply(status=401, error_code="InvalidApiKey", request_id="req-401"))
    failed = session.execute("%%qwen --no-history\nHow many?")
    assert failed.status == "error"
    assert TEST_KEY not in json.dumps([m.content for m in answered.messages + refused.messages + failed.messages])
    return footer, refusal, "\n".join(failed.error["traceback"])


def _check_chinese(footer: str, refusal: str, error: str) -> None:
    assert ZH_FOOTER.match(footer), footer
    assert refusal.startswith("UsageError: 已拒绝，未发送：此次调用最多可能花费 ¥"), refusal
    assert "超过了单次上限 --max-cost ¥0.0001。如要继续，请调大 --max-cost，或把 --max-tokens 降到" in refusal, refusal
    assert len(refusal.splitlines()) == 1 and "Refused" not in refusal
    # The advice in Chinese; the server's own message as it came.
    assert error == ZH_ERROR


@pytest.mark.kernel
def test_a_cell_a_refusal_and_an_error_in_each_language_in_a_kernel(gateway: Gateway, tmp_path: Path) -> None:
    set_up = "%load_ext qwen_magic\n%config QwenMagic.display = 'markdown'"
    (tmp_path / "setting").mkdir()
    env = kernel_env(tmp_path / "setting", DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url)
    session = KernelSession(env, cwd=tmp_path / "setting")  # an English locale: %config decides
    try:
        assert session.execute(set_up).status == "ok"
        assert session.execute("%config QwenMagic.language = 'zh'").status == "ok"
        _check_chinese(*_a_cell_a_refusal_and_an_error(session, gateway))

        assert session.execute("%config QwenMagic.language = 'en'").status == "ok"
        footer, refusal, error = _a_cell_a_refusal_and_an_error(session, gateway)
        assert EN_FOOTER.match(footer), footer
        assert refusal.startswith("UsageError: Refused, nothing sent: this call could cost up to ¥"), refusal
        assert "more than --max-cost ¥0.0001. To go ahead, raise --max-cost, or lower --max-tokens to" in refusal
        assert error == EN_ERROR
    finally:
        session.shutdown()

    # auto (the default, set here all the same) with a kernel started under a Chinese locale.
    (tmp_path / "locale").mkdir()
    env = kernel_env(tmp_path / "locale", DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway.base_url,
                     LANG="zh_CN.UTF-8")
    session = KernelSession(env, cwd=tmp_path / "locale")
    try:
        assert session.execute(set_up + "\n%config QwenMagic.language = 'auto'").status == "ok"
        _check_chinese(*_a_cell_a_refusal_and_an_error(session, gateway))
    finally:
        session.shutdown()


def _footer(printed: str) -> str:
    (line,) = [line for line in printed.splitlines() if line.startswith("[qwen-plus · ")]
    return line


def test_switching_the_language_changes_the_very_next_footer(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Five.", usage={"input_tokens": 1_204, "output_tokens": 310}), times=None)
    run_cell(shell, "%%qwen\nHow many?")
    assert " · 1,204 in / 310 out tokens · ¥0.0016 · chat default, turn 1 · " in _footer(capsys.readouterr().out)

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    run_cell(shell, "%%qwen\nAnd now?")
    footer = _footer(capsys.readouterr().out)
    assert " · 输入 1,204 / 输出 310 tokens · ¥0.0016 · 对话 default 第 2 轮 · 本会话 ¥0.0032 · " in footer, footer
    assert " 秒" in footer and "out tokens" not in footer

    shell.run_line_magic("config", "QwenMagic.language = 'en'")
    run_cell(shell, "%%qwen\nAnd in English?")
    footer = _footer(capsys.readouterr().out)
    assert " · 1,204 in / 310 out tokens · ¥0.0016 · chat default, turn 3 · session ¥0.0047 · " in footer, footer


def test_every_part_of_the_footer_in_chinese() -> None:
    result = QwenResult(
        text="", model="qwen-plus", elapsed=2.34, status=INTERRUPTED, cost=0.0016, session_cost=0.0121,
        chat="default", turn=3, tool_calls=["first", "second"],
        usage=Usage(input_tokens=1_204, output_tokens=310, reasoning_tokens=100, cached_tokens=1_000,
                    cache_creation_tokens=200, searches=2),
    )
    english = result.footer()
    i18n.use("zh")
    try:
        chinese = result.footer()
        one_off = dataclasses.replace(result, chat=None, turn=None, cost=None, status=FAILED, error="StreamCut",
                                      tool_calls=[], usage=Usage(input_tokens=5, output_tokens=1)).footer()
    finally:
        i18n.use("en")
    assert english == (
        "qwen-plus · 1,204 in (1,000 cached, 200 written to cache) / 310 out tokens (100 thinking) · 2 searches · "
        "¥0.0016 · chat default, turn 3 · session ¥0.0121 · 2.3 s · interrupted: partial answer · 2 tool calls"
    )
    assert chinese == (
        "qwen-plus · 输入 1,204（缓存命中 1,000，写入缓存 200） / 输出 310 tokens（其中思考 100） · 联网搜索 2 次 · "
        "¥0.0016 · 对话 default 第 3 轮 · 本会话 ¥0.0121 · 2.3 秒 · 已中断：部分回答 · 工具调用 2 次"
    )
    assert one_off == "qwen-plus · 输入 5 / 输出 1 tokens · 费用未知 · 单次提问，不在对话中 · 本会话 ¥0.0121 · 2.3 秒 · 失败：StreamCut"


def test_refusals_the_dry_run_and_the_usage_table_in_chinese(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    run_cell(shell, "%%qwen --dry-run\nHow many?")
    dry_run = capsys.readouterr().out
    assert "试运行：未发送任何内容。" in dry_run and "最坏情况" in dry_run and "消息：" in dry_run
    assert gateway.requests == []

    gateway.script(Reply(text="Five.", usage={"input_tokens": 1_204, "output_tokens": 310}))
    assert run_cell(shell, "%%qwen\nHow many?").success
    capsys.readouterr()

    # A spending limit: the period in Chinese, the command as it is typed.
    shell.run_line_magic("qwen", "limit daily 0.001")
    capsys.readouterr()
    outcome = run_cell(shell, "%%qwen\nAgain?")
    said = capsys.readouterr()
    refusal = (said.out + said.err).strip()
    assert not outcome.success and refusal.startswith("UsageError: 已拒绝，未发送："), refusal
    assert "超过了每日支出限额 ¥0.001 的剩余部分（今天已花费 ¥0.0016" in refusal, refusal
    assert "（%qwen limit daily " in refusal and refusal.endswith("或等到明天。")
    shell.run_line_magic("qwen", "limit daily off")

    shell.run_line_magic("qwen", "budget 0.001")
    capsys.readouterr()
    assert not run_cell(shell, "%%qwen\nAgain?").success
    said = capsys.readouterr()
    refusal = (said.out + said.err).strip()
    assert "超过了本会话预算（已用完：¥0.001 中已花费 ¥0.0016）。如要继续，请调高预算（%qwen budget " in refusal, refusal
    assert len(gateway.requests) == 1  # the refusals sent nothing

    usage = pretty(shell.run_line_magic("qwen", "usage"))
    assert "合计：¥0.0016，共 1 次调用" in usage and "完成" in usage and "状态" in usage, usage


# ---- %%qwen?, %qwen help, %qwen config and refusals in each language


def _help_shown(shell, capsys) -> str:
    run_cell(shell, "%%qwen?")
    return "".join(capsys.readouterr())


def test_the_cell_magic_help_in_each_language(shell, capsys) -> None:
    english = _help_shown(shell, capsys)
    assert "Ask a Qwen model; the answer streams into the cell's output." in english
    assert "Sampling temperature, 0 <= T < 2." in english and "options:" in english

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    chinese = _help_shown(shell, capsys)
    assert "向 Qwen 模型提问" in chinese and "Ask a Qwen model" not in chinese
    assert "采样温度，0 <= T < 2。" in chinese and "Sampling temperature" not in chinese
    assert "选项:" in chinese
    # argparse's own %-formatting still applies to the translated help texts.
    assert "输入价格的 10% 计费" in chinese and "10%%" not in chinese
    # The examples are code: the same in both languages.
    assert "%%qwen -m qwen-max -t 0.2 --max-tokens 300 -o answer" in chinese
    assert "--max-tokens MAX_TOKENS" in chinese

    shell.run_line_magic("config", "QwenMagic.language = 'en'")
    assert _help_shown(shell, capsys) == english


def test_the_help_follows_the_locale_from_load(shell, capsys, monkeypatch) -> None:
    shell.run_line_magic("unload_ext", "qwen_magic")
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    shell.run_line_magic("load_ext", "qwen_magic")
    assert "向 Qwen 模型提问" in _help_shown(shell, capsys)


def test_commands_help_and_config_in_each_language(shell, capsys) -> None:
    from .conftest import TEST_KEY

    run_cell(shell, "%qwen help")
    run_cell(shell, "%qwen config")
    english = "".join(capsys.readouterr())
    assert "%qwen commands" in english and "the effective settings, the key masked" in english
    assert "qwen_magic settings (change with %config QwenMagic.<name> = ...)" in english
    assert "(the model's default)" in english

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    run_cell(shell, "%qwen help")
    run_cell(shell, "%qwen config")
    chinese = "".join(capsys.readouterr())
    assert "%qwen 命令" in chinese and "当前生效的设置（Key 已遮盖）" in chinese
    assert "qwen_magic 设置（用 %config QwenMagic.<name> = ... 修改）" in chinese
    assert "（模型的默认值）" in chinese and "300 秒" in chinese
    assert "the effective settings" not in chinese and "(the model's default)" not in chinese
    # The usage column is code, the same in both; the key stays masked in both.
    assert "%qwen limit [daily|monthly AMOUNT|off]" in chinese
    assert TEST_KEY not in english + chinese


def test_a_bad_option_refused_in_each_language(shell, capsys) -> None:
    from .conftest import refusal

    assert refusal(shell, capsys, "%%qwen -t 5\nhello") == \
        "UsageError: -t/--temperature must be in [0, 2), not 5.0."
    assert refusal(shell, capsys, "%qwen reset a b") == "UsageError: %qwen reset takes at most one chat name."
    assert refusal(shell, capsys, "%%qwen -t hot\nhello") == \
        "UsageError: argument -t/--temperature: invalid float value: 'hot'"

    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    assert refusal(shell, capsys, "%%qwen -t 5\nhello") == \
        "UsageError: -t/--temperature 必须在 [0, 2) 之内，而不是 5.0。"
    assert refusal(shell, capsys, "%qwen reset a b") == "UsageError: %qwen reset 最多接受一个对话名。"
    # argparse's own refusals too (it has no Chinese of its own).
    assert refusal(shell, capsys, "%%qwen -t hot\nhello") == \
        "UsageError: 参数 -t/--temperature：'hot' 不是有效的 float 值"
    assert refusal(shell, capsys, "%%qwen --frobnicate\nhello") == "UsageError: 无法识别的参数：--frobnicate"


def test_a_bad_setting_refused_in_chinese(shell, capsys, caplog) -> None:
    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    run_cell(shell, "%config QwenMagic.max_retries = 99")
    said = "".join(capsys.readouterr()) + caplog.text  # %config logs what the setting refused
    assert "QwenMagic.max_retries 必须在 0 到 10 之间。" in said
    assert shell.find_magic("qwen").__self__.max_retries == 3


def test_a_chinese_table_lines_up() -> None:
    from qwen_magic.tables import aligned

    lines = aligned([("上下文", "1,000,000"), ("max", "8")])
    # A Chinese character takes two columns: the second column starts at the same column on both lines.
    assert lines == ["上下文  1,000,000", "max     8"]


def test_load_ext_in_english_does_not_read_the_chinese_catalog(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    program = (
        "import json, sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_line_magic('load_ext', 'qwen_magic')\n"
        "from qwen_magic import i18n\n"
        "doc = shell.find_cell_magic('qwen').__doc__\n"
        "print(json.dumps({'catalogs': sorted(i18n._translations), 'language': i18n.current_language(),\n"
        "                  'english_help': 'Ask a Qwen model' in doc}))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANGUAGE")}
    environ.update(LANG="en_US.UTF-8", IPYTHONDIR=str(tmp_path / "ipython"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=60, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == {"catalogs": [], "language": "en", "english_help": True}

    environ["LANG"] = "zh_CN.UTF-8"  # the same program, with a Chinese locale, does read it
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=60, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == {"catalogs": ["zh"], "language": "zh", "english_help": False}


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


def test_the_settings_descriptions_follow_the_language(shell, capsys) -> None:
    # %config QwenMagic lists every setting with its description, which IPython reads from the trait.
    shell.run_line_magic("config", "QwenMagic")
    english = capsys.readouterr().out
    assert "Model used when a cell gives no -m/--model." in english
    shell.run_line_magic("config", "QwenMagic.language = 'zh'")
    shell.run_line_magic("config", "QwenMagic")
    chinese = capsys.readouterr().out
    assert "单元格未给出 -m/--model 时使用的模型。" in chinese and "Model used when" not in chinese
    shell.run_line_magic("config", "QwenMagic.language = 'en'")
    shell.run_line_magic("config", "QwenMagic")
    assert "Model used when a cell gives no -m/--model." in capsys.readouterr().out


@pytest.mark.parametrize(("lang", "expected"), [
    ("zh_CN.UTF-8", "qwen_magic 离线网关位于 http://127.0.0.1:{port}/api/v1。在笔记本中：%env DASHSCOPE_BASE_URL="),
    ("C.UTF-8", "qwen_magic offline gateway at http://127.0.0.1:{port}/api/v1 - in a notebook: %env DASHSCOPE_BASE_URL="),
])
def test_the_gateway_command_says_where_it_is_in_the_terminals_language(lang: str, expected: str) -> None:
    import os
    import signal
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANGUAGE")}
    env.update(LANG=lang, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "qwen_magic.cli", "gateway", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=20)
    assert first.startswith(expected.format(port=port)), first
