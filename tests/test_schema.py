"""--schema: answers checked against the notebook's shape, through the real SDK and the gateway."""

from __future__ import annotations

import json

import pytest

from qwen_magic.engine import QwenFormatError
from qwen_magic.gateway import Gateway, Reply

from .conftest import refusal, run_cell, shown

SHAPES = '''
from dataclasses import dataclass
from typing import TypedDict
from pydantic import BaseModel

class Invoice(BaseModel):
    number: str
    total: float
    currency: str

class Point(TypedDict):
    x: int
    y: int

@dataclass
class City:
    name: str
    people: int

person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
'''


@pytest.fixture
def schema_shell(shell):
    assert run_cell(shell, SHAPES).success
    return shell


def test_strict_json_schema_where_the_model_supports_it(schema_shell, gateway: Gateway) -> None:
    gateway.script(Reply(text='{"number": "A-1", "total": 12.5, "currency": "CNY"}'))
    assert run_cell(schema_shell, "%%qwen -m qwen-plus --schema Invoice -o inv\nExtract: invoice A-1, 12.5 yuan").success
    response_format = gateway.requests[0].parameters["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"]["required"] == ["number", "total", "currency"]
    inv = schema_shell.user_ns["inv"]
    assert type(inv.value).__name__ == "Invoice" and inv.value.total == 12.5
    assert inv.format_error is None


@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_json_object_with_the_schema_in_the_prompt_elsewhere(schema_shell, gateway: Gateway, protocol: str) -> None:
    gateway.script(Reply(text='{"x": 1, "y": 2}'))
    assert run_cell(schema_shell, f"%%qwen -m qwen-max --protocol {protocol} --schema Point -o p\nthe point 1, 2").success
    request = gateway.requests[0]
    assert request.parameters["response_format"] == {"type": "json_object"}
    system = request.messages[0]
    assert system["role"] == "system" and "JSON Schema" in system["content"] and '"x"' in system["content"]
    assert schema_shell.user_ns["p"].value == {"x": 1, "y": 2}


def test_the_gateway_answers_a_json_schema_request_with_a_match(schema_shell, gateway: Gateway) -> None:
    assert run_cell(schema_shell, "%%qwen -m qwen-plus --schema City -o c\nthe biggest city").success
    value = schema_shell.user_ns["c"].value
    assert type(value).__name__ == "City" and isinstance(value.people, int)


def test_a_json_schema_dict_gives_the_checked_dict(schema_shell, gateway: Gateway) -> None:
    gateway.script(Reply(text='{"name": "Li", "age": 30}'))
    assert run_cell(schema_shell, "%%qwen --schema person -o who\nwho?").success
    assert schema_shell.user_ns["who"].value == {"name": "Li", "age": 30}


def test_a_failing_answer_is_asked_again_with_the_error(schema_shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text='{"number": "A-1", "total": "lots", "currency": "CNY"}',
                         usage={"input_tokens": 50, "output_tokens": 10}),
                   Reply(text='{"number": "A-1", "total": 9, "currency": "CNY"}',
                         usage={"input_tokens": 80, "output_tokens": 10}))
    assert run_cell(schema_shell, "%%qwen --schema Invoice -o inv\nExtract").success
    retry = gateway.requests[1].messages
    assert retry[-2]["role"] == "assistant" and '"lots"' in retry[-2]["content"]
    assert retry[-1]["role"] == "user" and "field total" in retry[-1]["content"]
    inv = schema_shell.user_ns["inv"]
    assert inv.value.total == 9.0
    assert inv.usage.input_tokens == 130  # both requests are counted
    assert "does not match Invoice (field total" in shown(capsys)


def test_an_answer_that_never_validates_is_kept_with_one_line(schema_shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text='{"number": "A-1"}'), times=None)
    outcome = run_cell(schema_shell, "%%qwen --schema Invoice --retries 0 -o inv\nExtract")
    assert isinstance(outcome.error_in_exec, QwenFormatError)
    assert len(gateway.requests) == 1
    inv = schema_shell.user_ns["inv"]
    assert inv.text == '{"number": "A-1"}' and inv.value is None
    assert "field total: Field required" in str(outcome.error_in_exec)
    assert "Traceback" not in shown(capsys)


def test_a_dict_schema_without_pydantic_names_the_field(schema_shell, gateway: Gateway) -> None:
    gateway.script(Reply(text=json.dumps({"name": "Li", "age": "old"})))
    outcome = run_cell(schema_shell, "%%qwen --schema person --retries 0 -o who\nwho?")
    assert "field age: expected integer, got str" in str(outcome.error_in_exec)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--schema Invoice --thinking", "--thinking and --schema do not mix"),
        ("-f json --thinking", "--thinking and -f json do not mix"),
        ("--schema Invoice -f text", "--schema answers in JSON"),
        ("--schema nowhere", "nothing of that name"),
        ("--schema SHAPES_NOT", "nothing of that name"),
        ("--schema Invoice --retries 9", "--retries must be from 0 to 5"),
        ("--schema Invoice -m qwq-plus", "always thinks"),
    ],
)
def test_schema_options_are_checked(schema_shell, gateway: Gateway, capsys, line: str, message: str) -> None:
    assert message in refusal(schema_shell, capsys, f"%%qwen {line}\nhi")
    assert gateway.requests == []


def test_something_that_is_no_schema_is_refused(schema_shell, gateway: Gateway, capsys) -> None:
    assert run_cell(schema_shell, "number = 3").success
    assert "not int" in refusal(schema_shell, capsys, "%%qwen --schema number\nhi")
