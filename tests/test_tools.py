"""--tools: the model calls the notebook's functions, through the real SDK and the gateway."""

from __future__ import annotations

import enum
import time
import json
from typing import Literal, Optional, TypedDict

import pytest
from pydantic import BaseModel

from qwen_magic.conversation import Turn
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.tools import describe

from .conftest import TEST_KEY, refusal, run_cell, shown

WEATHER = '''
calls = []
def get_current_weather(location: str) -> str:
    """获取现在的天气

    location: 要获取天气的省市名称，例如浙江省杭州市
    """
    calls.append(location)
    return f"{location}: 晴, 20°C"

def population(city: str, year: int = 2024) -> dict:
    """People living in a city."""
    return {"city": city, "year": year, "people": 1000}

def broken(x: int) -> int:
    """Always fails."""
    raise ValueError(f"no data for {x}")
'''


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


@pytest.fixture
def tools_shell(shell):
    assert run_cell(shell, WEATHER).success
    return shell


# ---- describing functions

class Unit(enum.Enum):
    CELSIUS = "c"
    FAHRENHEIT = "f"


class Place(BaseModel):
    city: str
    country: str = "CN"


class Range(TypedDict):
    low: int
    high: int


def forecast(place: Place, days: list[int], unit: Unit, mode: Literal["brief", "full"] = "brief",
             span: Optional[Range] = None, tags: dict[str, float] | None = None, strict: bool = False) -> str:
    """Forecast for a place.

    More text that is not the description.

    Args:
        place: where to look
        days (list[int]): which days ahead
    """
    return ""


def numpy_style(city: str, limit: float) -> str:
    """Find a city.

    Parameters
    ----------
    city : str
        The city's name,
        in full.
    limit : float
        At most this many.
    """
    return city


def test_a_function_becomes_a_tool_definition_from_its_signature_and_docstring() -> None:
    tool = describe("forecast", forecast)
    assert tool.description == "Forecast for a place."
    schema = tool.parameters
    assert schema["required"] == ["place", "days", "unit"]
    properties = schema["properties"]
    assert properties["place"]["type"] == "object" and properties["place"]["required"] == ["city"]
    assert properties["place"]["description"] == "where to look"
    assert properties["days"] == {"type": "array", "items": {"type": "integer"}, "description": "which days ahead"}
    assert properties["unit"] == {"enum": ["c", "f"]}
    assert properties["mode"] == {"enum": ["brief", "full"], "type": "string", "default": "brief"}
    assert properties["span"]["anyOf"][0] == {"type": "object", "properties": {"low": {"type": "integer"},
                                                                               "high": {"type": "integer"}},
                                              "required": ["low", "high"]}
    assert properties["tags"]["anyOf"][0] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert properties["strict"] == {"type": "boolean", "default": False}


def test_numpy_style_parameters_are_described() -> None:
    def lookup(city: str) -> str:
        """city population lookup

        city: the city's name
        """
        return city

    tool = describe("lookup", lookup)
    assert tool.description == "city population lookup"  # a description may begin with a parameter's name
    assert tool.parameters["properties"]["city"]["description"] == "the city's name"
    properties = describe("numpy_style", numpy_style).parameters["properties"]
    assert properties["city"]["description"] == "The city's name, in full."
    assert properties["limit"] == {"type": "number", "description": "At most this many."}


def test_results_become_text_and_model_arguments_become_instances() -> None:
    from qwen_magic.tools import prepare_call, result_text

    assert result_text("as is") == "as is"
    assert json.loads(result_text({"a": [1, Unit.CELSIUS], "p": Place(city="杭州")})) == {
        "a": [1, "c"], "p": {"city": "杭州", "country": "CN"}}
    assert result_text({1, 2}) == "{1, 2}"  # no JSON form: its repr
    received = []
    tool = describe("where", lambda place, unit: received.append((place, unit)))
    tool = type(tool)(tool.name, tool.function, tool.description, tool.parameters, {"place": Place, "unit": Unit})
    call, runner = prepare_call("c1", "where", '{"place": {"city": "杭州"}, "unit": "f"}', {"where": tool})
    assert call.error is None and runner is not None
    runner()
    assert received == [(Place(city="杭州"), Unit.FAHRENHEIT)]


def test_a_stored_exchange_of_the_wrong_shape_is_named() -> None:
    from qwen_magic.conversation import RecordError

    record = {"prompt": "q", "text": "a", "exchange": [{"role": "tool", "content": "x"}]}
    with pytest.raises(RecordError, match="'exchange'"):
        Turn.from_record(record)
    record["exchange"] = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {}}]}]
    with pytest.raises(RecordError, match="'exchange'"):
        Turn.from_record(record)


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ("def f(*args): pass", "*args cannot be described"),
        ("def f(x: set[object]): pass", "parameter 'x' cannot be described"),
        ("f = 3", "is not a function"),
        ("def search(q: str): pass\nf = search", "--tools search"),
    ],
)
def test_a_function_that_cannot_be_described_is_refused_before_anything_is_sent(
        shell, gateway: Gateway, capsys, definition: str, message: str) -> None:
    assert run_cell(shell, definition).success
    name = "search" if "search" in message else "f"
    line = refusal(shell, capsys, f"%%qwen --tools {name}\nhi")
    assert message in line
    assert gateway.requests == []


def test_an_unknown_name_in_tools_is_refused(shell, gateway: Gateway, capsys) -> None:
    assert "no function of that name" in refusal(shell, capsys, "%%qwen --tools nowhere\nhi")
    assert gateway.requests == []


# ---- the exchange

@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_parallel_calls_run_in_order_and_their_results_go_back(tools_shell, gateway: Gateway, capsys,
                                                               protocol: str) -> None:
    gateway.script(
        Reply(tool_calls=[call("get_current_weather", location="浙江省杭州市"),
                          call("get_current_weather", location="上海市")], chunk_size=4,
              usage={"input_tokens": 100, "output_tokens": 20}),
        Reply(text="杭州和上海都是晴天。", usage={"input_tokens": 150, "output_tokens": 10}),
    )
    outcome = run_cell(tools_shell, f"%%qwen --protocol {protocol} --tools get_current_weather -o r\n杭州和上海现在的天气如何？")
    assert outcome.success, outcome.error_in_exec
    printed = shown(capsys)
    assert "→ get_current_weather(location='浙江省杭州市')" in printed
    assert "← 上海市: 晴, 20°C" in printed
    assert tools_shell.user_ns["calls"] == ["浙江省杭州市", "上海市"]
    first, second = gateway.requests
    for request in (first, second):
        assert request.parameters["parallel_tool_calls"] is True
        (tool,) = request.parameters["tools"]
        assert tool["function"]["name"] == "get_current_weather"
        assert tool["function"]["description"] == "获取现在的天气"
        assert tool["function"]["parameters"]["properties"]["location"]["description"].startswith("要获取天气")
    if protocol == "native":
        assert first.parameters["result_format"] == "message"
    roles = [m["role"] for m in second.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    calls = second.messages[1]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"location": "浙江省杭州市"}, {"location": "上海市"}]
    assert all(c["id"] for c in calls)  # merged: the later fragments' empty ids did not win
    assert [m["tool_call_id"] for m in second.messages[2:]] == [c["id"] for c in calls]
    assert second.messages[2]["content"] == "浙江省杭州市: 晴, 20°C"
    result = tools_shell.user_ns["r"]
    assert result.text == "杭州和上海都是晴天。"
    assert [(c.name, c.arguments, c.result, c.error) for c in result.tool_calls] == [
        ("get_current_weather", {"location": "浙江省杭州市"}, "浙江省杭州市: 晴, 20°C", None),
        ("get_current_weather", {"location": "上海市"}, "上海市: 晴, 20°C", None),
    ]
    assert all(c.time >= 0 for c in result.tool_calls)
    # The footer sums both requests and counts the calls.
    assert result.usage.input_tokens == 250 and result.usage.output_tokens == 30
    assert "250 in / 30 out tokens" in printed and "2 tool calls" in printed
    assert TEST_KEY not in printed


def test_non_string_results_go_back_as_json(tools_shell, gateway: Gateway) -> None:
    gateway.script(Reply(tool_calls=[call("population", city="杭州")]), Reply(text="ok"))
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather,population\nhow many?").success
    tool_message = gateway.requests[1].messages[-1]
    assert json.loads(tool_message["content"]) == {"city": "杭州", "year": 2024, "people": 1000}


def test_unknown_tool_and_bad_arguments_run_nothing_and_tell_the_model(tools_shell, gateway: Gateway) -> None:
    gateway.script(
        Reply(tool_calls=[{"name": "delete_everything", "arguments": {}},
                          {"name": "get_current_weather", "arguments": '{"location": "杭州'},
                          call("get_current_weather", place="杭州"),
                          call("population", city="杭州", year="soon")]),
        Reply(text="Sorry."),
    )
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather,population -o r\nweather?").success
    assert tools_shell.user_ns["calls"] == []
    answers = [m["content"] for m in gateway.requests[1].messages if m["role"] == "tool"]
    assert "no tool named 'delete_everything'" in answers[0] and "get_current_weather, population" in answers[0]
    assert "not valid JSON" in answers[1]
    assert "do not fit get_current_weather" in answers[2] and "place" in answers[2]
    assert "field year: expected integer, got str" in answers[3]
    assert all(c.error and c.result is None for c in tools_shell.user_ns["r"].tool_calls)


def test_a_raising_tool_sends_back_its_error(tools_shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(tool_calls=[call("broken", x=3)]), Reply(text="It failed."))
    assert run_cell(tools_shell, "%%qwen --tools broken -o r\ntry it").success
    assert gateway.requests[1].messages[-1]["content"] == "Error: ValueError: no data for 3"
    assert "✖ ValueError: no data for 3" in shown(capsys)
    assert tools_shell.user_ns["r"].tool_calls[0].error == "ValueError: no data for 3"


def test_the_round_limit_stops_the_exchange_with_a_clear_line(tools_shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(tool_calls=[call("get_current_weather", location="杭州")]), times=None)
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather --max-rounds 2 -o r\nloop").success
    assert len(gateway.requests) == 2
    assert tools_shell.user_ns["calls"] == ["杭州"]
    assert "Stopped after 2 requests (--max-rounds 2): the model still asked for get_current_weather" in shown(capsys)


def test_the_tools_definitions_are_counted_before_sending(tools_shell, gateway: Gateway) -> None:
    plain = run_cell(tools_shell, "%%qwen --dry-run\n天气？").result.preflight.input_tokens
    with_tools = run_cell(tools_shell, "%%qwen --dry-run --tools get_current_weather\n天气？").result.preflight.input_tokens
    assert with_tools >= plain + 30  # the definition's JSON: name, description, schema
    assert gateway.requests == []
    # As the gateway bills it, like the service: the count is the server's.
    gateway.script(Reply(text="晴"))
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather -o r\n天气？").success
    assert tools_shell.user_ns["r"].usage.input_tokens == with_tools


def test_max_cost_covers_the_whole_exchange(tools_shell, gateway: Gateway, capsys) -> None:
    assert run_cell(tools_shell, 'def big() -> str:\n    """Much data."""\n    return "数据" * 10000').success
    gateway.script(Reply(tool_calls=[call("big")]), Reply(text="never sent"))
    # The first request's worst case fits; with the tool's long result, the second's does not.
    assert run_cell(tools_shell, "%%qwen --tools big --max-cost 0.07 -o r\nread it").success
    assert len(gateway.requests) == 1
    assert "The exchange stopped before its request 2: Refused, nothing sent" in shown(capsys)
    assert tools_shell.user_ns["r"].tool_calls[0].result.startswith("数据")


def test_the_chat_follows_up_and_a_rerun_replaces_the_whole_exchange(tools_shell, gateway: Gateway) -> None:
    magic = tools_shell.magics_manager.registry["QwenMagic"]
    gateway.script(Reply(tool_calls=[call("get_current_weather", location="杭州")]), Reply(text="晴。"))
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather\n杭州天气？").success
    assert run_cell(tools_shell, "%%qwen\n明天呢？").success
    follow_up = gateway.requests[-1].messages
    assert [m["role"] for m in follow_up] == ["user", "assistant", "tool", "assistant", "user"]
    assert follow_up[2]["content"] == "杭州: 晴, 20°C" and follow_up[3]["content"] == "晴。"
    # The turn is stored whole and comes back from its record.
    (turn, _) = magic.session.chat().turns
    again = Turn.from_record(json.loads(json.dumps(turn.to_record())))
    assert again.messages() == turn.messages()
    assert run_cell(tools_shell, "%qwen reset").success
    # Re-running a cell (same cell id) replaces its exchange in place.
    chat = magic.session.chat()
    gateway.script(Reply(tool_calls=[call("get_current_weather", location="上海")]), Reply(text="一"),
                   Reply(text="二"))
    magic._cell_id = lambda: "cell-1"
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather\n天气？").success
    assert run_cell(tools_shell, "%%qwen\n天气？").success
    assert len(chat.turns) == 1 and chat.turns[0].exchange == [] and chat.turns[0].result.text == "二"


def test_resume_brings_back_a_turn_with_tool_calls(tools_shell, gateway: Gateway) -> None:
    gateway.script(Reply(tool_calls=[call("get_current_weather", location="杭州")]), Reply(text="晴。"))
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather\n杭州天气？").success
    magic = tools_shell.magics_manager.registry["QwenMagic"]
    before = magic.session.chat().turns[0].messages()
    magic.session.chats.clear()
    assert run_cell(tools_shell, "%qwen resume").success
    assert magic.session.chat().turns[0].messages() == before


def test_a_server_without_a_key_takes_tools(tools_shell, capsys) -> None:
    with Gateway(require_key=False) as local:
        local.script(Reply(tool_calls=[call("get_current_weather", location="杭州")]), Reply(text="晴"))
        outcome = run_cell(tools_shell, f"%%qwen --base-url {local.compatible_base_url} --tools get_current_weather -o r\nweather")
        assert outcome.success, outcome.error_in_exec
        assert [m["role"] for m in local.requests[1].messages] == ["user", "assistant", "tool"]
        assert tools_shell.user_ns["r"].text == "晴"


def test_confirm_without_stdin_is_refused_before_sending(tools_shell, gateway: Gateway, capsys) -> None:
    assert "takes no input" in refusal(tools_shell, capsys, "%%qwen --tools get_current_weather --confirm\nhi")
    assert gateway.requests == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--confirm", "it needs --tools"),
        ("--tools get_current_weather --max-rounds 0", "--max-rounds must be from 1 to 50"),
        ("--tools 'a b'", "--tools needs names"),
        ("--tools f,f", "names a function twice"),
    ],
)
def test_tool_options_are_checked(tools_shell, capsys, line: str, message: str) -> None:
    assert message in refusal(tools_shell, capsys, f"%%qwen {line}\nhi")


def test_the_gateway_refuses_a_tool_message_without_its_call(gateway: Gateway) -> None:
    import dashscope
    from dashscope.v2.errors import BadRequestError

    client = dashscope.Client(api_key=TEST_KEY, base_url=gateway.base_url, max_retries=0)
    with pytest.raises(BadRequestError, match="preceding message"):
        client.chat.completions.create(model="qwen-plus", messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "call_1"}])


# ---- in a real kernel: ■ during a call, and --confirm through the front end's input

from .kernel_harness import KernelSession, Message, kernel_env  # noqa: E402

SLOW = '''
import time
ran = []
def slow(seconds: float) -> str:
    """Takes its time."""
    ran.append(seconds)
    time.sleep(seconds)
    return "done"
'''


@pytest.fixture(scope="module")
def kernel(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("kernel")
    env = kernel_env(tmp, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url)
    session = KernelSession(env, cwd=tmp)
    setup = session.execute("%load_ext qwen_magic\n" + SLOW)
    assert setup.status == "ok", setup.outputs
    yield session
    session.shutdown()


@pytest.mark.kernel
def test_interrupt_during_a_call_stops_the_exchange_and_keeps_what_was_shown(kernel: KernelSession,
                                                                             gateway: Gateway) -> None:
    gateway.script(Reply(tool_calls=[call("slow", seconds=20), call("slow", seconds=1)]), Reply(text="never"))
    interrupted = []

    def interrupt_once_the_call_shows(message: Message) -> None:
        if not interrupted and "slow(seconds=20)" in json.dumps(message.content, ensure_ascii=False):
            interrupted.append(True)
            time.sleep(0.3)  # into the call's sleep
            kernel.interrupt()

    execution = kernel.execute("%%qwen --tools slow -o r\ngo", during=interrupt_once_the_call_shows, timeout=30)
    assert interrupted and execution.status == "error"
    assert execution.error["ename"] == "QwenInterrupted"
    assert len(gateway.requests) == 1  # nothing sent after the interrupt
    check = kernel.execute("print(r.status, ran, [c.error for c in r.tool_calls])")
    assert check.stdout.strip() == ("interrupted [20] ['interrupted by the user', "
                                    "'not run: the user stopped the exchange']"), check.outputs
    shown_text = json.dumps([m.content for m in execution.messages], ensure_ascii=False)
    assert "slow(seconds=20)" in shown_text


@pytest.mark.kernel
def test_confirm_without_stdin_in_a_kernel_is_one_line(kernel: KernelSession, gateway: Gateway) -> None:
    execution = kernel.execute("%%qwen --tools slow --confirm\ngo")
    assert execution.status == "error" and execution.error is None  # one line, no traceback
    text = "".join(o.get("text", "") for o in execution.outputs if o["output_type"] == "stream")
    (line,) = [line for line in text.splitlines() if line.strip()]
    assert line.startswith("UsageError: --confirm asks before each call") and "takes no input" in line
    assert gateway.requests == []


@pytest.mark.kernel
def test_confirm_asks_before_each_call(kernel: KernelSession, gateway: Gateway) -> None:
    gateway.script(Reply(tool_calls=[call("slow", seconds=0), call("slow", seconds=0.01)]), Reply(text="ok"))
    kernel.execute("ran.clear()")
    answers = iter(["y", "n"])
    execution = kernel.execute("%%qwen --tools slow --confirm\ngo", stdin=lambda prompt: next(answers))
    assert execution.status == "ok", execution.outputs
    assert execution.stdin_prompts == ["→ slow(seconds=0) — run it? [y/N] ", "→ slow(seconds=0.01) — run it? [y/N] "]
    assert kernel.execute("print(ran)").stdout.strip() == "[0]"
    assert gateway.requests[1].messages[-1]["content"] == "Error: the user declined to run this call"


@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_whole_answers_carry_tool_calls_too(tools_shell, gateway: Gateway, protocol: str) -> None:
    gateway.script(Reply(tool_calls=[call("get_current_weather", location="杭州")]), Reply(text="晴"))
    assert run_cell(tools_shell, f"%%qwen --no-stream --protocol {protocol} --tools get_current_weather -o r\n?").success
    assert [request.stream for request in gateway.requests] == [False, False]
    assert tools_shell.user_ns["calls"] == ["杭州"] and tools_shell.user_ns["r"].text == "晴"


def test_unscripted_the_gateway_calls_each_tool_then_reads_the_results(tools_shell, gateway: Gateway) -> None:
    assert run_cell(tools_shell, "%%qwen --tools get_current_weather,population -o r\n?").success
    assert [c.name for c in tools_shell.user_ns["r"].tool_calls] == ["get_current_weather", "population"]
    assert "read what the tools returned" in tools_shell.user_ns["r"].text


# ---- the gateway's tool-call frames, as the service sends them

def _frames(gateway: Gateway, protocol: str) -> list[dict]:
    """The data of every stream frame of one request with two tools."""
    import httpx

    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("a", "b")]
    messages = [{"role": "user", "content": "go"}]
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    if protocol == "native":
        url = gateway.base_url + "/services/aigc/text-generation/generation"
        body = {"model": "qwen-plus", "input": {"messages": messages},
                "parameters": {"result_format": "message", "incremental_output": True, "tools": tools}}
        headers["X-DashScope-SSE"] = "enable"
    else:
        url = gateway.compatible_base_url + "/chat/completions"
        body = {"model": "qwen-plus", "messages": messages, "tools": tools, "stream": True}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(line[5:]) for line in lines if line[5:].strip() != "[DONE]"]


@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_the_gateway_streams_tool_calls_in_fragments_with_the_services_quirks(gateway: Gateway,
                                                                              protocol: str) -> None:
    gateway.script(Reply(tool_calls=[call("a", city="杭州市西湖区"), {"name": "b", "arguments": {"n": 12345},
                                                                    "id": "call_b"}], chunk_size=6))
    frames = _frames(gateway, protocol)
    if protocol == "native":
        choices = [frame["output"]["choices"][0] for frame in frames]
        fragments = [c["message"].get("tool_calls", [None])[0] for c in choices]
    else:
        choices = [frame["choices"][0] for frame in frames if frame["choices"]]
        fragments = [(c["delta"].get("tool_calls") or [None])[0] for c in choices]
    fragments = [f for f in fragments if f]
    firsts = [f for f in fragments if f["function"].get("name")]
    assert [(f["index"], f["function"]["name"]) for f in firsts] == [(0, "a"), (1, "b")]
    assert firsts[1]["id"] == "call_b" and firsts[0]["id"].startswith("call_")
    later = [f for f in fragments if f not in firsts]
    assert later and all(f["id"] == "" and "name" not in f["function"] for f in later)
    for index, expected in ((0, {"city": "杭州市西湖区"}), (1, {"n": 12345})):
        joined = "".join(f["function"]["arguments"] for f in fragments if f["index"] == index)
        assert json.loads(joined) == expected
    assert [c["finish_reason"] for c in choices if c["finish_reason"] not in (None, "null")] == ["tool_calls"]


def test_an_interrupt_between_rounds_keeps_what_ran(tools_shell, gateway: Gateway, capsys) -> None:
    # One request a minute: the second round waits for the rate limit, and ■ lands in that wait,
    # outside any stream or call.
    tools_shell.run_line_magic("config", "QwenMagic.models = {'qwen-plus': {'qpm': 1}}")
    gateway.script(Reply(text="Let me look. ", tool_calls=[call("get_current_weather", location="杭州")]),
                   Reply(text="never sent"))
    import _thread
    import threading

    def interrupt_once_the_call_ran() -> None:
        deadline = time.monotonic() + 20
        while not tools_shell.user_ns["calls"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the second round is now waiting for the minute's window
        _thread.interrupt_main()

    interrupter = threading.Thread(target=interrupt_once_the_call_ran, daemon=True)
    interrupter.start()
    outcome = run_cell(tools_shell, "%%qwen --tools get_current_weather -o r\n杭州天气？")
    interrupter.join()
    said = shown(capsys)
    assert not outcome.success and "Traceback" not in said
    assert "interrupted; its partial text is kept" in said
    assert len(gateway.requests) == 1  # the second round was never sent
    result = tools_shell.user_ns["r"]
    assert result.status == "interrupted"
    assert [(c.name, c.result, c.error) for c in result.tool_calls] == [("get_current_weather", "杭州: 晴, 20°C", None)]
    assert tools_shell.user_ns["calls"] == ["杭州"]
    assert "Let me look." in result.text
