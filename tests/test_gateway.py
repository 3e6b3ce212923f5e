"""The offline gateway, driven by the real dashscope SDK over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import dashscope
import httpx
import pytest
from dashscope.v2 import errors

from qwen_magic.gateway import Gateway, RecordedRequest, Reply
from qwen_magic.catalog import builtin_catalog
from qwen_magic.tokens import count_chat_input, count_text

USER_HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture
def gw():
    with Gateway() as gateway:
        yield gateway


@pytest.fixture
def client(gw):
    with dashscope.Client(api_key="sk-test", base_url=gw.base_url, max_retries=0) as c:
        yield c


@pytest.fixture
def compatible(gw):
    with dashscope.Client(api_key="sk-test", base_url=gw.compatible_base_url, protocol="openai", max_retries=0) as c:
        yield c


def stream(client, messages=USER_HELLO, model="qwen-plus", **kwargs):
    return client.chat.completions.create(model=model, messages=messages, stream=True, **kwargs)


def control(gw, method, path, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(gw.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------- default answers


def test_unscripted_answer_names_the_model_and_echoes_the_prompt(gw, client):
    final = stream(client, model="qwen-max").get_final_message()
    text = final.output_text
    assert text.startswith("This is the qwen_magic offline gateway answering as qwen-max.")
    assert "You said: Hello there, who are you?" in text
    assert final.choices[0].finish_reason == "stop"


def billed_input(messages, model="qwen-plus", thinking=False):
    """Input tokens the server bills: the chat template, plus the model's empty think block."""
    return count_chat_input(messages, extra_tokens=builtin_catalog().get(model).extra_input_tokens(thinking))


def test_unscripted_chinese_prompt_gets_a_chinese_answer_billed_like_the_server(gw, client):
    final = stream(client, model="qwen-max", messages=[{"role": "user", "content": "你是谁？"}]).get_final_message()
    assert final.output_text.startswith("这是 qwen_magic 离线网关（模型 qwen-max）的回答。你说：你是谁？")
    assert final.usage.input_tokens == 22  # what DashScope billed for this exact prompt
    assert final.usage.output_tokens == count_text(final.output_text)
    assert final.usage.total_tokens == 22 + final.usage.output_tokens


def test_qwen3_hybrid_models_bill_an_empty_think_block_unless_thinking(gw, client):
    asked = [{"role": "user", "content": "你是谁？"}]
    plain = stream(client, model="qwen-plus", messages=asked).get_final_message()
    thinking = stream(client, model="qwen-plus", messages=asked, enable_thinking=True).get_final_message()
    assert plain.usage.input_tokens == 22 + 4
    assert thinking.usage.input_tokens == 22


def test_unscripted_thinking_request_streams_default_reasoning_first(gw, client):
    chunks = list(stream(client, model="qwen3-max", enable_thinking=True))
    kinds = ["reasoning" if c.delta.reasoning_content else "answer" for c in chunks if c.delta.reasoning_content or
             c.delta.content]
    assert kinds[0] == "reasoning" and kinds[-1] == "answer"
    assert kinds == sorted(kinds, key=lambda kind: kind == "answer")  # all reasoning before any answer
    reasoning = "".join(c.delta.reasoning_content or "" for c in chunks)
    assert "offline gateway" in reasoning and "qwen3-max" in reasoning
    assert chunks[-1].usage.output_tokens_details == {"reasoning_tokens": count_text(reasoning)}


# --------------------------------------------------------------------------- scripted streams


def test_scripted_chunks_arrive_as_separate_frames(gw, client):
    gw.script(Reply(chunks=["Hel", "lo, ", "world", "!"]))
    assert list(stream(client).text_stream) == ["Hel", "lo, ", "world", "!"]


def test_scripted_text_is_split_by_chunk_size(gw, client):
    gw.script(Reply(text="abcdefghij", chunk_size=4))
    assert list(stream(client).text_stream) == ["abcd", "efgh", "ij"]


def test_frame_delay_delivers_the_first_chunk_well_before_the_stream_ends(gw, client):
    gw.script(Reply(chunks=["one ", "two ", "three ", "four"], frame_delay=0.2))
    started = time.monotonic()
    arrivals = [(time.monotonic() - started, text) for text in stream(client).text_stream]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert [text for _, text in arrivals] == ["one ", "two ", "three ", "four"]
    assert first < 0.2
    assert last - first >= 0.55  # three real 0.2 s pauses between four frames


def test_first_token_delay_comes_after_the_headers(gw, client):
    gw.script(Reply(text="late", first_token_delay=0.4))
    started = time.monotonic()
    chat = stream(client)
    opened = time.monotonic() - started
    assert list(chat.text_stream) == ["late"]
    assert opened < 0.3 and time.monotonic() - started >= 0.4


def test_native_usage_is_a_running_total_in_every_frame(gw, client):
    gw.script(Reply(chunks=["a" * 10, "b" * 10, "c" * 10, "d" * 10], usage={"output_tokens": 40}))
    chunks = list(stream(client))
    inputs = {c.usage.input_tokens for c in chunks}
    outputs = [c.usage.output_tokens for c in chunks]
    assert inputs == {billed_input(USER_HELLO)}
    assert outputs == [10, 20, 30, 40]
    assert [c.usage.total_tokens - c.usage.input_tokens for c in chunks] == outputs
    assert [c.choices[0].finish_reason for c in chunks] == ["null", "null", "null", "stop"]


def test_scripted_usage_overrides_only_the_keys_it_names(gw, client):
    gw.script(Reply(text="short", usage={"input_tokens": 1200, "prompt_tokens_details": {"cached_tokens": 1024}}))
    usage = stream(client).get_final_message().usage
    assert usage.input_tokens == 1200
    assert usage.output_tokens == count_text("short")
    assert usage.total_tokens == 1200 + usage.output_tokens
    assert usage.prompt_tokens_details == {"cached_tokens": 1024}


def test_scripted_reasoning_streams_before_the_answer_and_counts_as_output(gw, client):
    gw.script(Reply(text="Answer.", reasoning="Let me think it through.", chunk_size=6))
    chat = stream(client, enable_thinking=True)
    final = chat.get_final_message()
    assert final.choices[0].message.reasoning_content == "Let me think it through."
    assert final.output_text == "Answer."
    reasoning_tokens = count_text("Let me think it through.")
    assert final.usage.output_tokens == count_text("Answer.") + reasoning_tokens
    assert final.usage.output_tokens_details == {"reasoning_tokens": reasoning_tokens}


def test_non_streaming_request_gets_the_whole_answer_in_one_body(gw, client):
    gw.script(Reply(text="All at once.", finish_reason="length", request_id="req-whole"))
    completion = client.chat.completions.create(model="qwen-plus", messages=USER_HELLO)
    assert completion.output_text == "All at once."
    assert completion.choices[0].finish_reason == "length"
    assert completion.request_id == "req-whole"
    assert completion.headers["x-request-id"] == "req-whole"
    assert completion.usage.input_tokens == billed_input(USER_HELLO)
    assert gw.requests[-1].stream is False


def test_cumulative_frames_when_the_wire_asks_for_them(gw, client):
    gw.script(Reply(chunks=["ab", "cd", "ef"]))
    chat = stream(client, parameters={"incremental_output": False})
    assert [c.delta.content for c in chat] == ["ab", "abcd", "abcdef"]
    assert gw.requests[-1].parameters["incremental_output"] is False


def test_multimodal_request_uses_its_endpoint_and_list_content(gw, client):
    gw.script(Reply(chunks=["A cat", " on a mat."]))
    messages = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"},
                                             {"type": "text", "text": "What is this?"}]}]
    final = stream(client, messages=messages, model="qwen-vl-plus").get_final_message()
    assert final.output_text == "A cat on a mat."
    recorded = gw.requests[-1]
    assert recorded.path == "/api/v1/services/aigc/multimodal-generation/generation"
    assert recorded.messages[0]["content"] == [{"image": "https://example.com/cat.png"}, {"text": "What is this?"}]
    assert final.usage.input_tokens == billed_input([{"role": "user", "content": "What is this?"}], "qwen-vl-plus")


SOURCES = [{"title": "Qwen", "url": "https://qwen.ai", "site_name": "qwen.ai", "index": 1}]
WITH_SOURCES = {"enable_search": True, "search_options": {"enable_source": True}}


def test_search_sources_come_in_the_first_frame_and_empty_lists_after(gw, client):
    gw.script(Reply(chunks=["Found", " it", " [1]."], search_results=SOURCES))
    chunks = list(stream(client, **WITH_SOURCES))
    assert [[r.url for r in c.search_info.search_results] for c in chunks] == [["https://qwen.ai"], [], []]
    assert chunks[0].search_info.search_results[0].index == 1
    # So the SDK's own final message, which keeps the last frame's, has none.
    gw.script(Reply(chunks=["Found", " it."], search_results=SOURCES))
    assert stream(client, **WITH_SOURCES).get_final_message().search_info.search_results == []


def test_search_is_counted_in_the_usage_of_every_frame(gw, client):
    gw.script(Reply(chunks=["a", "b"], search_results=SOURCES))
    options = {"enable_source": True, "search_strategy": "max"}
    chunks = list(stream(client, enable_search=True, search_options=options))
    assert {json.dumps(c.usage.plugins) for c in chunks} == {json.dumps({"search": {"count": 1, "strategy": "max"}})}


def test_a_whole_answer_carries_its_sources(gw, client):
    gw.script(Reply(text="Found it.", search_results=SOURCES))
    completion = client.chat.completions.create(model="qwen-plus", messages=USER_HELLO, **WITH_SOURCES)
    assert completion.search_info.search_results[0].url == "https://qwen.ai"
    assert completion.usage.plugins == {"search": {"count": 1, "strategy": "turbo"}}


def test_sources_only_when_asked_for_and_no_search_unless_enabled(gw, client):
    gw.script(Reply(text="Searched.", search_results=SOURCES))
    chunks = list(stream(client, enable_search=True))  # enable_source defaults to false
    assert all(c.search_info is None for c in chunks)
    assert chunks[-1].usage.plugins == {"search": {"count": 1, "strategy": "turbo"}}
    gw.script(Reply(text="No search.", search_results=SOURCES))
    chunks = list(stream(client))
    assert all(c.search_info is None for c in chunks)
    assert "plugins" not in chunks[-1].usage.model_dump()


def test_compatible_mode_counts_the_search_but_sends_no_sources(gw, compatible):
    gw.script(Reply(chunks=["a", "b"], search_results=SOURCES))
    chat = compatible.chat.completions.create(model="qwen-plus", messages=USER_HELLO, stream=True, **WITH_SOURCES)
    chunks = list(chat)
    assert all(c.search_info is None for c in chunks)
    assert chunks[-1].usage.plugins == {"search": {"count": 1, "strategy": "turbo"}}


def test_cache_reads_and_writes_are_in_the_prompt_details_of_both_protocols(gw, client, compatible):
    for sdk in (client, compatible):
        gw.script(Reply(text="Cached.", cached_tokens=2048))
        usage = stream(sdk).get_final_message().usage
        assert usage.prompt_tokens_details == {"cached_tokens": 2048}
        assert usage.input_tokens >= 2048  # what was read from the cache is part of the input
        gw.script(Reply(text="Written.", cache_creation_tokens=1500))
        usage = stream(sdk).get_final_message().usage
        details = usage.prompt_tokens_details
        assert details["cached_tokens"] == 0 and details["cache_creation_input_tokens"] == 1500
        assert details["cache_type"] == "ephemeral"
        assert usage.input_tokens >= 1500
    gw.script(Reply(text="Small.", cached_tokens=0, cache_creation_tokens=0))
    assert "prompt_tokens_details" not in stream(client).get_final_message().usage.model_dump()
    with pytest.raises(ValueError, match="cached_tokens must not be negative"):
        Reply(cached_tokens=-1)


def test_native_wire_framing_is_chunked_sse_as_dashscope_sends_it(gw):
    gw.script(Reply(chunks=["Hi", "!"], request_id="req-wire"))
    body = {"model": "qwen-plus", "input": {"messages": USER_HELLO}, "parameters": {"incremental_output": True}}
    headers = {"Authorization": "Bearer sk-test", "X-DashScope-SSE": "enable"}
    with httpx.stream("POST", gw.base_url + "/services/aigc/text-generation/generation", json=body,
                      headers=headers) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "req-wire"
        raw = response.read().decode()
    events = raw.strip("\n").split("\n\n")
    assert len(events) == 2
    lines = events[0].split("\n")
    assert lines[:3] == ["id:1", "event:result", ":HTTP_STATUS/200"]
    first = json.loads(lines[3].removeprefix("data:"))
    assert first["output"]["choices"][0] == {"message": {"content": "Hi", "role": "assistant"},
                                             "finish_reason": "null"}
    assert first["request_id"] == "req-wire"
    assert events[1].startswith("id:2\nevent:result\n:HTTP_STATUS/200\ndata:")


# --------------------------------------------------------------------------- errors, native


def test_missing_api_key_is_refused_with_401(gw, monkeypatch, tmp_path):
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("DASHSCOPE_API_KEY_FILE_PATH", str(tmp_path / "no-key-file"))
    monkeypatch.setenv("DASHSCOPE_CONFIG", str(tmp_path / "no-config.toml"))
    with dashscope.Client(base_url=gw.base_url, max_retries=0) as keyless:
        with pytest.raises(errors.AuthenticationError) as caught:
            stream(keyless)
    assert caught.value.code == "InvalidApiKey"
    assert caught.value.message == "No API-key provided."
    assert caught.value.status_code == 401
    assert caught.value.request_id
    assert gw.requests[-1].api_key is None


def test_invalid_api_key_is_refused_with_401(gw):
    with dashscope.Client(api_key="sk-invalid", base_url=gw.base_url, max_retries=0) as bad:
        with pytest.raises(errors.AuthenticationError) as caught:
            stream(bad)
    assert (caught.value.code, caught.value.message) == ("InvalidApiKey", "Invalid API-key provided.")


def test_unknown_model_is_400_model_not_exist(gw, client):
    with pytest.raises(errors.BadRequestError) as caught:
        stream(client, model="no-such-model")
    assert (caught.value.code, caught.value.message, caught.value.status_code) == (
        "InvalidParameter", "Model not exist.", 400)
    assert caught.value.request_id == caught.value.headers["x-request-id"]


def test_rate_limit_is_429_with_retry_after(gw, client):
    gw.script(Reply(error_code="Throttling.RateQuota", retry_after=2, request_id="req-429"))
    with pytest.raises(errors.RateLimitError) as caught:
        stream(client)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "Throttling.RateQuota"
    assert error.message == "Requests rate limit exceeded, please try again later."
    assert error.request_id == "req-429"
    assert error.headers["retry-after"] == "2"


def test_non_streaming_call_is_retried_after_the_scripted_delay(gw):
    gw.script(Reply(error_code="Throttling", retry_after=0.3))
    with dashscope.Client(api_key="sk-test", base_url=gw.base_url, max_retries=1) as retrying:
        started = time.monotonic()
        completion = retrying.chat.completions.create(model="qwen-plus", messages=USER_HELLO)
    assert time.monotonic() - started >= 0.3
    assert "offline gateway" in completion.output_text
    assert len(gw.requests) == 2


def test_internal_error_is_500(gw, client):
    gw.script(Reply(status=500))
    with pytest.raises(errors.InternalServerError) as caught:
        stream(client)
    assert (caught.value.code, caught.value.status_code) == ("InternalError", 500)
    assert caught.value.message.startswith("An internal error has occurred")


def test_content_filter_error_sent_as_one_sse_frame(gw, client):
    gw.script(Reply(error_code="DataInspectionFailed", error_as_sse=True, request_id="req-sse"))
    with pytest.raises(errors.ContentFilterError) as caught:
        stream(client)
    error = caught.value
    assert (error.status_code, error.code, error.request_id) == (400, "DataInspectionFailed", "req-sse")
    assert error.message == "Input data may contain inappropriate content."
    assert error.headers["content-type"].startswith("text/event-stream")


def test_mid_stream_error_arrives_after_the_earlier_text(gw, client):
    gw.script(Reply(text="abcdefghijkl", chunk_size=4, error_after=2, error_code="DataInspectionFailed",
                    request_id="req-mid"))
    received = []
    with pytest.raises(errors.ContentFilterError) as caught:
        for text in stream(client).text_stream:
            received.append(text)
    assert received == ["abcd", "efgh"]
    assert caught.value.code == "DataInspectionFailed"
    assert caught.value.message == "Output data may contain inappropriate content."
    assert caught.value.request_id == "req-mid"
    assert caught.value.status_code == 200  # the SDK reports the stream's own status


def test_cut_connection_raises_after_the_earlier_text(gw, client):
    gw.script(Reply(text="abcdefghijkl", chunk_size=4, cut_after=2))
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        for text in stream(client).text_stream:
            received.append(text)
    assert received == ["abcd", "efgh"]


def test_stall_with_a_short_client_timeout_raises_a_read_timeout(gw):
    gw.script(Reply(text="abcdefgh", chunk_size=4, stall_after=1, stall=5))
    received = []
    with dashscope.Client(api_key="sk-test", base_url=gw.base_url, timeout=0.3, max_retries=0) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            for text in stream(impatient).text_stream:
                received.append(text)
    assert received == ["abcd"]


def test_stall_ends_and_the_stream_finishes_normally(gw, client):
    gw.script(Reply(text="abcdefgh", chunk_size=4, stall_after=1, stall=0.3))
    started = time.monotonic()
    assert "".join(stream(client).text_stream) == "abcdefgh"
    assert time.monotonic() - started >= 0.3


def test_stop_during_a_stall_returns_quickly_and_frees_the_port():
    gateway = Gateway().start()
    port = gateway.port
    gateway.script(Reply(text="abcdefgh", chunk_size=4, stall_after=1, stall=30))
    with dashscope.Client(api_key="sk-test", base_url=gateway.base_url, max_retries=0) as c:
        texts = stream(c).text_stream
        assert next(texts) == "abcd"
        started = time.monotonic()
        gateway.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.RemoteProtocolError):
            list(texts)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_client_leaving_mid_stream_does_not_disturb_the_gateway(gw, client, capfd):
    gw.script(Reply(text="x" * 400, chunk_size=4, frame_delay=0.01))
    chat = stream(client)
    assert next(iter(chat.text_stream)) == "xxxx"
    chat.close()
    time.sleep(0.2)  # let the gateway hit the closed socket
    assert "offline gateway" in stream(client).get_final_message().output_text
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- recording and scripting


def test_requests_are_recorded_with_path_model_messages_parameters_and_key(gw, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    list(stream(client, messages=messages, model="qwen-turbo", temperature=0.2))
    (recorded,) = gw.wait_for_requests(1)
    assert isinstance(recorded, RecordedRequest)
    assert recorded.method == "POST"
    assert recorded.path == "/api/v1/services/aigc/text-generation/generation"
    assert recorded.protocol == "native"
    assert recorded.model == "qwen-turbo"
    assert recorded.messages == messages
    assert recorded.parameters["incremental_output"] is True
    assert recorded.parameters["temperature"] == 0.2
    assert recorded.api_key == "sk-test"
    assert recorded.stream is True
    assert recorded.headers["x-dashscope-sse"] == "enable"
    assert "sk-test" not in repr(recorded)


def test_wait_for_requests_sees_a_request_still_in_progress(gw, client):
    gw.script(Reply(text="slow", first_token_delay=0.5))
    worker = threading.Thread(target=lambda: list(stream(client)))
    worker.start()
    started = time.monotonic()
    assert gw.wait_for_requests(1, timeout=2)[0].model == "qwen-plus"
    assert time.monotonic() - started < 0.45
    worker.join()
    with pytest.raises(TimeoutError):
        gw.wait_for_requests(2, timeout=0.1)


def test_script_times_repeats_the_sequence_and_none_repeats_the_last_forever(gw, client):
    gw.script(Reply(text="A"), Reply(text="B"), times=2)
    assert [stream(client).get_final_message().output_text for _ in range(5)][:4] == ["A", "B", "A", "B"]
    gw.reset()
    gw.script(Reply(text="first"), Reply(text="again"), times=None)
    texts = [stream(client).get_final_message().output_text for _ in range(4)]
    assert texts == ["first", "again", "again", "again"]
    gw.reset()
    assert "offline gateway" in stream(client).get_final_message().output_text
    assert len(gw.requests) == 1


def test_reply_round_trips_through_its_json_form():
    reply = Reply(chunks=["a", "b"], error_code="Throttling", retry_after=1.5, usage={"input_tokens": 3})
    assert Reply.from_dict(json.loads(json.dumps(reply.to_dict()))) == reply
    with pytest.raises(ValueError, match="unknown reply field"):
        Reply.from_dict({"txt": "typo"})
    with pytest.raises(ValueError):
        Reply(chunk_size=0)


def test_gateway_refuses_a_non_loopback_host():
    with pytest.raises(ValueError, match="loopback"):
        Gateway(host="0.0.0.0")


# --------------------------------------------------------------------------- compatible mode


def test_compatible_stream_ends_with_a_usage_frame_and_done(gw):
    gw.script(Reply(chunks=["Hel", "lo"], reasoning="hmm", request_id="req-oa"))
    body = {"model": "qwen-plus", "messages": USER_HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gw.compatible_base_url + "/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-test"}) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    frames = [json.loads(event) for event in events[:-1]]
    assert frames[0]["object"] == "chat.completion.chunk"
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": None, "reasoning_content": "hmm"}
    assert [f["choices"][0]["delta"].get("content") for f in frames[1:3]] == ["Hel", "lo"]
    assert frames[-2]["choices"][0]["finish_reason"] == "stop"
    usage_frame = frames[-1]
    assert usage_frame["choices"] == []
    assert usage_frame["usage"]["prompt_tokens"] == billed_input(USER_HELLO)
    assert usage_frame["usage"]["completion_tokens"] == count_text("Hello") + count_text("hmm")
    assert usage_frame["usage"]["total_tokens"] == sum(usage_frame["usage"][k] for k in
                                                       ("prompt_tokens", "completion_tokens"))


def test_compatible_mode_through_the_sdk(gw, compatible):
    gw.script(Reply(chunks=["Bonjour", " !"]))
    chat = compatible.chat.completions.create(model="qwen-plus", messages=USER_HELLO, stream=True)
    final = chat.get_final_message()
    assert final.output_text == "Bonjour !"
    assert final.usage.input_tokens == billed_input(USER_HELLO)
    recorded = gw.requests[-1]
    assert (recorded.protocol, recorded.path) == ("openai", "/compatible-mode/v1/chat/completions")
    assert recorded.parameters["stream_options"] == {"include_usage": True}
    whole = compatible.chat.completions.create(model="qwen-plus", messages=USER_HELLO)
    assert "offline gateway" in whole.output_text and whole.usage.output_tokens > 0


def test_compatible_mode_errors_are_openai_shaped(gw, compatible):
    with pytest.raises(errors.NotFoundError) as caught:
        compatible.chat.completions.create(model="no-such-model", messages=USER_HELLO, stream=True)
    assert caught.value.code == "model_not_found"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.request_id
    gw.script(Reply(error_code="Throttling.RateQuota", retry_after=1))
    with pytest.raises(errors.RateLimitError) as caught:
        compatible.chat.completions.create(model="qwen-plus", messages=USER_HELLO, stream=True)
    assert caught.value.code == "limit_requests"
    assert caught.value.headers["retry-after"] == "1"
    with dashscope.Client(api_key="sk-invalid", base_url=gw.compatible_base_url, protocol="openai",
                          max_retries=0) as bad:
        with pytest.raises(errors.AuthenticationError) as caught:
            bad.chat.completions.create(model="qwen-plus", messages=USER_HELLO, stream=True)
    assert caught.value.code == "invalid_api_key"


def test_compatible_mid_stream_error_frame(gw, compatible):
    gw.script(Reply(text="abcdefgh", chunk_size=4, error_after=1, error_code="InternalError", request_id="req-x"))
    received = []
    with pytest.raises(errors.DashScopeError) as caught:
        for text in compatible.chat.completions.create(model="qwen-plus", messages=USER_HELLO,
                                                       stream=True).text_stream:
            received.append(text)
    assert received == ["abcd"]
    # In-stream errors are classed by code alone, and the SDK knows only the
    # native codes, so a compatible-mode code surfaces as the base class.
    assert type(caught.value) is errors.DashScopeError
    assert (caught.value.code, caught.value.status_code) == ("internal_error", 200)
    assert caught.value.request_id == "req-x"


def test_compatible_model_list(gw):
    response = httpx.get(gw.compatible_base_url + "/models", headers={"Authorization": "Bearer sk-test"})
    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    assert "qwen-plus" in ids and "qwen-max" in ids


# --------------------------------------------------------------------------- tokenizer and control


def test_tokenizer_counts_like_the_server(gw, client):
    counted = client.tokenization.count(model="qwen-plus", messages=[{"role": "user", "content": "你是谁？"}])
    assert counted.input_tokens == 22
    assert client.tokenization.count(model="qwen-plus", prompt="hello world").input_tokens == count_text("hello world")
    assert gw.all_requests[-1].protocol == "tokenizer"
    assert gw.requests == []  # not a chat request


def test_control_endpoints_script_reset_and_mask_the_key(gw, client):
    assert control(gw, "GET", "/_gateway/health") == {"ok": True}
    queued = control(gw, "POST", "/_gateway/script", {"replies": [{"chunks": ["via ", "control"]}], "times": 1})
    assert queued["ok"] is True
    assert "".join(stream(client).text_stream) == "via control"
    listed = control(gw, "GET", "/_gateway/requests")["requests"]
    assert len(listed) == 1
    assert listed[0]["body"]["model"] == "qwen-plus"
    assert listed[0]["headers"]["authorization"] == "Bearer ***"
    assert "sk-test" not in json.dumps(listed)
    assert control(gw, "POST", "/_gateway/reset") == {"ok": True}
    assert control(gw, "GET", "/_gateway/requests")["requests"] == []


def test_control_script_rejects_a_malformed_reply(gw):
    with pytest.raises(urllib.error.HTTPError) as caught:
        control(gw, "POST", "/_gateway/script", {"replies": [{"colour": "blue"}]})
    assert caught.value.code == 400
    assert "unknown reply field" in json.loads(caught.value.read())["error"]


def test_unscripted_answers_keep_to_json_mode_and_to_code_requests(gw, client):
    as_json = client.chat.completions.create(model="qwen-plus", messages=USER_HELLO,
                                             response_format={"type": "json_object"})
    assert json.loads(as_json.output_text)["model"] == "qwen-plus"
    code = client.chat.completions.create(model="qwen-plus",
                                          messages=[{"role": "user", "content": "Write Python code to add"}])
    assert "```python\n# offline gateway: no model ran\n" in code.output_text
