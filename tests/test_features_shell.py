"""Beyond plain chat, through the real SDK and the gateway: variables, formats, thinking,
search, images, compatible mode and other servers; each with its failure."""

from __future__ import annotations

import base64

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.gateway import Gateway, Reply
from qwen_magic.prompt import fill

from .test_shell import run

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # the bytes travel as they are; .png names the type


def shown(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


# ---- variables in

def test_variables_attributes_and_indexes_are_filled_in(shell, gateway: Gateway) -> None:
    shell.user_ns.update(city="Hangzhou", rows=[{"name": "tea"}], size=(3, 4), price=2.5)
    run(shell, "%%qwen\nAbout {city}: {rows[0]['name']} costs {price:.2f}; shape {size!r}; {size[-1]}")
    assert gateway.requests[-1].messages[-1]["content"] == "About Hangzhou: tea costs 2.50; shape (3, 4); 4"


def test_missing_names_code_json_and_double_braces_stay_as_written(shell, gateway: Gateway) -> None:
    shell.user_ns.update(k=1, items=[])
    text = 'Fix {nowhere}: d = {k: v for k, v in items}; data = {"a": {"b": 1}}; tpl = {{ k }}'
    run(shell, f"%%qwen\n{text}")
    assert gateway.requests[-1].messages[-1]["content"] == text


def test_no_interp_sends_braces_as_written(shell, gateway: Gateway) -> None:
    shell.user_ns["city"] = "Hangzhou"
    run(shell, "%%qwen --no-interp\nAbout {city}")
    assert gateway.requests[-1].messages[-1]["content"] == "About {city}"


def test_dry_run_shows_the_filled_prompt(shell, gateway: Gateway) -> None:
    shell.user_ns["city"] = "杭州"
    assert "[user] 介绍一下杭州" in pretty(run(shell, "%%qwen --dry-run\n介绍一下{city}").result)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("{rows[5]}", "{rows[5]}: IndexError"),
        ("{rows.nope}", "{rows.nope}: AttributeError"),
        ("{rows.__class__}", "private attributes"),
        ("{rows[len]}", "{rows[len]}: TypeError"),  # a bare key is a string key, as str.format reads it
        ("{rows[1 + 1]}", "an index must be a number, a quoted key or a slice"),
    ],
)
def test_a_reference_that_cannot_be_filled_is_a_usage_error(shell, gateway: Gateway, capsys, cell, message) -> None:
    shell.user_ns["rows"] = [1]
    assert not run(shell, f"%%qwen\n{cell}").success
    assert message in shown(capsys)
    assert gateway.requests == []


def test_nothing_is_ever_called() -> None:
    calls = []

    class Tricky:
        def __getitem__(self, key):
            calls.append(key)
            return "item"

        def method(self):
            calls.append("method")

    assert fill("{t[0]} {t.method()} {t.method}", {"t": Tricky()}).startswith("item {t.method()} <bound method")
    assert calls == [0]  # an index was read; no method was called


# ---- formats

def test_json_asks_for_json_parses_it_and_keeps_the_value(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text='{"city": "Hangzhou", "sights": ["West Lake", "Lingyin"]}'))
    assert run(shell, "%%qwen -f json -o facts\nFacts about Hangzhou").success
    request = gateway.requests[-1]
    assert request.parameters["response_format"] == {"type": "json_object"}
    assert request.messages[0] == {"role": "system", "content": "Answer with one JSON object only."}
    facts = shell.user_ns["facts"]
    assert facts.value == {"city": "Hangzhou", "sights": ["West Lake", "Lingyin"]}
    markdown, html = facts._repr_markdown_(), facts._repr_html_()
    assert markdown.startswith('```json\n{\n  "city": "Hangzhou"')
    assert "<details open><summary>{…} <small>(2)</small>" in html
    assert "<summary><code>sights</code>: […] <small>(2)</small>" in html and "&quot;West Lake&quot;" in html


def test_json_that_does_not_parse_is_a_clear_error_with_the_raw_text(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Sure! Here you go: {city: Hangzhou"))
    outcome = run(shell, "%%qwen -f json -o facts\nGive me json")
    assert not outcome.success
    text = shown(capsys)
    assert "QwenFormatError: The answer is not valid JSON (Expecting value at line 1 column 1); " \
           "the raw answer is shown above and in facts.text." in text
    assert "Sure! Here you go" in text and "Traceback" not in text
    assert shell.user_ns["facts"].text == "Sure! Here you go: {city: Hangzhou"
    assert gateway.requests[-1].messages[0]["role"] == "user"  # the prompt said json: no hint added


def test_json_in_a_fence_is_accepted(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text='```json\n{"ok": true}\n```'))
    run(shell, "%%qwen -f json -o answer\nStatus as JSON")
    assert shell.user_ns["answer"].value == {"ok": True}


def test_code_goes_into_a_new_cell_below(shell, gateway: Gateway, monkeypatch) -> None:
    placed = []
    monkeypatch.setattr(shell, "set_next_input", lambda text, replace=False: placed.append((text, replace)))
    gateway.script(Reply(text="Here:\n\n```python\nprint('hi')\n```\n\nDone."))
    run(shell, "%%qwen -f code -o answer\nPrint hi")
    assert placed == [("print('hi')", False)]
    assert shell.user_ns["answer"].code == "print('hi')"


def test_code_without_a_code_block_says_so(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="I cannot write that."))
    assert run(shell, "%%qwen -f code\nWrite code").success
    assert "The answer has no code block: no cell was added." in shown(capsys)


def test_text_format_is_plain_and_escaped(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="**not bold** <b>x</b>"))
    run(shell, "%%qwen -f text -o answer\nPlain")
    answer = shell.user_ns["answer"]
    assert '<pre style="white-space: pre-wrap">**not bold** &lt;b&gt;x&lt;/b&gt;</pre>' in answer._repr_html_()
    assert answer._repr_markdown_().startswith("```text\n**not bold** <b>x</b>\n```")


# ---- thinking, search, images

def test_thinking_streams_reasoning_apart_and_bills_it(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="42.", reasoning="Six times seven.",
                         usage={"input_tokens": 1000, "output_tokens": 500,
                                "output_tokens_details": {"reasoning_tokens": 400}}))
    assert run(shell, "%%qwen --thinking --thinking-budget 500 -o answer\nWhat is 6x7?").success
    printed = shown(capsys)
    assert printed.index("[thinking]\nSix times seven.") < printed.index("[answer]\n42.")
    parameters = gateway.requests[-1].parameters
    assert parameters["enable_thinking"] is True and parameters["thinking_budget"] == 500
    answer = shell.user_ns["answer"]
    assert answer.text == "42." and answer.reasoning == "Six times seven."
    assert answer.cost == pytest.approx((1000 * 0.8 + 500 * 8) / 1e6)  # the thinking output price
    assert "(400 thinking)" in printed
    assert '<details class="qwen-thinking"><summary>Thinking (400 tokens)</summary>' in answer._repr_html_()
    # The reasoning is not sent back as context.
    run(shell, "%%qwen\nAnd 7x8?")
    assert gateway.requests[-1].messages[1] == {"role": "assistant", "content": "42."}


def test_thinking_on_a_model_without_it_is_refused(shell, gateway: Gateway, capsys) -> None:
    assert not run(shell, "%%qwen -m qwen-max --thinking\nHi").success
    assert "qwen-max has no thinking mode; models that do: " in shown(capsys)
    assert gateway.requests == []


def test_search_sets_enable_search_and_lists_the_sources(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="It rained.", search_results=[
        {"title": "Weather", "url": "https://weather.example/hz", "site_name": "W", "index": 1},
        {"title": "Bad", "url": "javascript:alert(1)", "index": 2}]))
    run(shell, "%%qwen --search -o answer\nWeather in Hangzhou yesterday?")
    assert gateway.requests[-1].parameters["enable_search"] is True
    assert gateway.requests[-1].parameters["search_options"] == {"enable_source": True}
    answer = shell.user_ns["answer"]
    assert "**Sources**\n\n1. [Weather](https://weather.example/hz)\n2. Bad" in answer._repr_markdown_()
    assert '<a href="https://weather.example/hz">Weather</a>' in answer._repr_html_()
    assert "javascript:" not in answer._repr_html_()


def test_images_go_to_the_multimodal_endpoint_inline(shell, gateway: Gateway, tmp_path) -> None:
    picture = tmp_path / "dot.png"
    picture.write_bytes(PNG)
    run(shell, f"%%qwen -m qwen-vl-plus --image {picture} --image https://example.com/cat.jpg\nWhat is this?")
    request = gateway.requests[-1]
    assert request.path.endswith("/services/aigc/multimodal-generation/generation")
    content = request.messages[-1]["content"]
    assert content[0]["image"].startswith("data:image/png;base64,")
    assert base64.b64decode(content[0]["image"].split(",", 1)[1]) == PNG
    assert content[1:] == [{"image": "https://example.com/cat.jpg"}, {"text": "What is this?"}]


def test_an_image_for_a_text_model_names_the_vision_models(shell, gateway: Gateway, capsys) -> None:
    assert not run(shell, "%%qwen -m qwen-max --image https://example.com/a.png\nHi").success
    text = shown(capsys)
    assert "qwen-max reads text only; --image needs a vision model: qwen-vl-max, qwen-vl-plus, qwen3-vl-flash" in text
    assert not run(shell, "%%qwen -m qwen-vl-plus --image /no/such/file.png\nHi").success
    assert "--image /no/such/file.png: no such file" in shown(capsys)
    assert gateway.requests == []


# ---- other protocols and servers

def test_compatible_mode_streams_with_usage_and_cost(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(chunks=["Bon", "jour"], usage={"input_tokens": 1000, "output_tokens": 100}))
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    assert run(shell, "%%qwen --protocol openai -m qwen-max\nSalut").success
    request = gateway.requests[-1]
    assert request.protocol == "openai" and request.path == "/compatible-mode/v1/chat/completions"
    printed = shown(capsys)
    assert "Bonjour" in printed
    assert "qwen-max · 1,000 in / 100 out tokens · ¥0.0034 · " in printed


def test_any_openai_compatible_server_without_a_key(shell, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    shell.run_line_magic("config", "QwenMagic.model_aliases = {'Qwen/Qwen3-8B': 'my-vllm'}")
    shell.run_line_magic("config", "QwenMagic.models = {'my-vllm': {'input': 0, 'output': 0, 'max_input': 32000}}")
    with Gateway(require_key=False) as own_server:  # like vLLM or Ollama on the user's machine
        outcome = run(shell, f"%%qwen --base-url {own_server.compatible_base_url} -m Qwen/Qwen3-8B\nHello")
        request = own_server.requests[-1]
    assert outcome.success
    assert request.protocol == "openai" and request.model == "Qwen/Qwen3-8B"
    assert request.api_key is None
    assert " · ¥0 · " in shown(capsys)


def test_a_server_without_the_model_is_a_clear_line(shell, gateway: Gateway, capsys) -> None:
    outcome = run(shell, f"%%qwen --base-url {gateway.compatible_base_url} -m no-such-model\nHello")
    assert not outcome.success
    text = shown(capsys)
    assert "DashScope error model_not_found:" in text and "request id" in text
    assert "Traceback" not in text


def test_streaming_can_be_switched_off_by_default(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", "QwenMagic.stream = False")
    gateway.script(Reply(text="Whole."))
    run(shell, "%%qwen -o answer\nHi")
    assert gateway.requests[-1].stream is False
    assert shell.user_ns["answer"].text == "Whole."


def test_compatible_mode_carries_json_thinking_and_search_too(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    gateway.script(Reply(text='{"ok": true}', reasoning="Checking.", search_results=[]))
    # JSON mode and thinking do not mix (DashScope refuses them together): two cells.
    assert run(shell, "%%qwen --protocol openai -f json --search -o answer\nStatus as JSON").success
    request = gateway.requests[-1]
    assert request.protocol == "openai"
    assert request.parameters["response_format"] == {"type": "json_object"}
    assert request.parameters["enable_search"] is True
    answer = shell.user_ns["answer"]
    assert answer.value == {"ok": True} and answer.reasoning == "Checking."
    assert run(shell, "%%qwen --protocol openai --thinking --search\nStatus").success
    request = gateway.requests[-1]
    assert request.parameters["enable_thinking"] is True and request.parameters["enable_search"] is True
