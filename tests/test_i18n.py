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
