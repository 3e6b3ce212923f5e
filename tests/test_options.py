"""Cell options become a frozen dataclass; every mistake is a one-line UsageError."""

from __future__ import annotations

import dataclasses

import pytest
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from qwen_magic.magics import QwenMagic
from qwen_magic.options import CellOptions


def parse(line: str) -> CellOptions:
    return CellOptions.from_namespace(parse_argstring(QwenMagic.qwen, line))


def test_defaults_leave_everything_to_the_settings() -> None:
    options = parse("")
    assert options == CellOptions()
    assert options.parameters() == {}
    assert options.stream is None  # the QwenMagic.stream setting decides


def test_every_option_is_read() -> None:
    options = parse(
        '-m qwen-max -s "be brief" -t 0.3 --top-p 0.9 --max-tokens 50 --seed 7 '
        "--stop END --stop STOP --no-stream -o answer"
    )
    assert options.model == "qwen-max"
    assert options.system == "be brief"
    assert options.stream is False
    assert options.out == "answer"
    assert options.parameters() == {
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 50,
        "seed": 7,
        "stop": ["END", "STOP"],
    }


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse("").model = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("-t 2.5", "temperature"),
        ("-t -1", "temperature"),
        ("--top-p 0", "top-p"),
        ("--top-p 1.5", "top-p"),
        ("--max-tokens 0", "max-tokens"),
        ("--seed -3", "seed"),
        ("-o 2x", "variable name"),
        ("-t warm", "invalid float"),
        ("--nonsense", "unrecognized"),
        ('--stop ""', "--stop"),
        ("--max-cost inf", "positive, finite"),
        ("--max-cost nan", "positive, finite"),
        ("--max-cost 0", "positive, finite"),
    ],
)
def test_bad_values_are_usage_errors(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(line)


def test_a_line_read_before_is_not_parsed_again_and_a_refused_one_is_refused_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Re-running a cell does not parse its line again; a refusal is never kept in place of it."""
    from qwen_magic import options as module

    parsed: list[str] = []
    parse = module.parse_cell_line
    monkeypatch.setattr(module, "parse_cell_line", lambda magic, line: parsed.append(line) or parse(magic, line))
    monkeypatch.setattr(module, "_READ_LINES", {})
    first = module.cell_options(QwenMagic.qwen, "-m qwen-max -t 0.5 -o answer")
    again = module.cell_options(QwenMagic.qwen, "-m qwen-max -t 0.5 -o answer")
    assert again is first and first.model == "qwen-max" and first.temperature == 0.5
    assert parsed == ["-m qwen-max -t 0.5 -o answer"]
    for _ in range(2):
        with pytest.raises(UsageError, match="temperature"):
            module.cell_options(QwenMagic.qwen, "-t 9")
    assert parsed.count("-t 9") == 2
    for number in range(module._READ_LINES_KEPT + 10):  # a bounded number of lines is kept
        module.cell_options(QwenMagic.qwen, f"--seed {number}")
    assert len(module._READ_LINES) == module._READ_LINES_KEPT
    assert "-m qwen-max -t 0.5 -o answer" not in module._READ_LINES  # the oldest went first
    long_system = f"-s '{'be brief ' * 1000}'"
    assert module.cell_options(QwenMagic.qwen, long_system).system.startswith("be brief")
    assert long_system not in module._READ_LINES  # long lines are not kept
