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
