"""Hostile input and faults: each ends in one clear line, nothing lost, nothing leaked.

A real IPython shell and the real SDK against the offline gateway over HTTP; a real kernel
where what the front end receives (and a saved notebook keeps) is the point.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Iterator

import pytest
from IPython.core.error import UsageError

from qwen_magic.client import QwenAPIError
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.result import COMPLETE, FAILED
from qwen_magic.tokens import _encoding, count_chat_input, count_text

from .conftest import TEST_KEY, refusal, shown
from .conftest import run_cell as run
from .kernel_harness import KernelSession, kernel_env

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
    b"\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
)


def error_line(shell, capsys, cell: str) -> tuple[QwenAPIError, str]:
    """Run a cell that must end in one QwenAPIError line; return it and its line."""
    outcome = run(shell, cell)
    error = outcome.error_in_exec
    assert isinstance(error, QwenAPIError), repr(error)
    text = shown(capsys)
    assert "Traceback" not in text and TEST_KEY not in text
    line = error.line()
    assert "\n" not in line and len(line) <= 320, line
    assert line in text
    return error, line


# ---- 2. the %%qwen line

def test_an_unbalanced_quote_in_the_line_is_one_usage_error(shell, gateway: Gateway, capsys) -> None:
    line = refusal(shell, capsys, '%%qwen -s "be brief\nHi')
    assert line == ("UsageError: The %%qwen line cannot be read: No closing quotation "
                    "(quote values with spaces in matching quotes).")
    assert gateway.requests == []


_FUZZ_PIECES = [
    "-s", "-m", "-c", "-o", "-t", "--top-p", "--max-tokens", "--seed", "--stop", "--image", "--base-url",
    "--max-history", "--thinking-budget", "--max-cost", "-f", "--protocol", "-n", "--no-history", "--thinking",
    '"', "'", "\\", '"unclosed', "'half", "\\\\", "\x00", "\t", "é", "😀", "\ud83d", "名字", "9" * 40, "-1", "0",
    "nan", "inf", "1e309", "2147483648", "--", "-", "=", "--max-tokens=5", "-o=x", "{x}", "if", "None",
    "http://[::1", "http://h:99999", "json", "qwen-max", "qwen\x01plus", "a b", '"a b"',
]


def _fuzz_line(rng: random.Random) -> str:
    return " ".join(rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(1, 7)))


def test_fuzzed_option_lines_never_end_in_a_traceback(shell, gateway: Gateway, capsys) -> None:
    rng = random.Random(20261201)
    lines = [_fuzz_line(rng) for _ in range(300)]
    for line in lines:
        outcome = run(shell, f"%%qwen --dry-run {line}\nHi")
        text = shown(capsys)
        error = outcome.error_in_exec
        assert error is None or isinstance(error, UsageError), (line, repr(error))
        assert "Traceback" not in text, (line, text)
    assert gateway.requests == []  # --dry-run: nothing went out, whatever else the line said


def test_numbers_no_request_can_carry_are_refusal(shell, gateway: Gateway, capsys) -> None:
    line = refusal(shell, capsys, "%%qwen --max-tokens 99999999999999999999\nHi")
    assert "--max-tokens must be from 1 to 2,147,483,647" in line
    line = refusal(shell, capsys, "%%qwen --thinking-budget 2147483648\nHi")
    assert "--thinking-budget must be from 1 to 2,147,483,647 tokens" in line
    # Within int32 but more than the model writes: the catalog says how much it can.
    line = refusal(shell, capsys, "%%qwen -m qwen-max --max-tokens 100000\nHi")
    assert line == "UsageError: --max-tokens 100,000 is more than qwen-max can write: at most 8,192 tokens (%qwen models)."
    assert gateway.requests == []


def test_a_model_name_with_control_characters_is_refusal(shell, gateway: Gateway, capsys, caplog) -> None:
    line = refusal(shell, capsys, "%%qwen -m 'qwen\x00plus'\nHi")
    assert line == r"UsageError: -m/--model: 'qwen\x00plus' has control characters; no model name does."
    run(shell, "%config QwenMagic.model = 'qwen\\x00plus'")  # %config logs a refused value as one line
    text = shown(capsys) + caplog.text
    assert "QwenMagic.model: 'qwen\\x00plus' has control characters; no model name does." in text
    assert "Traceback" not in text
    assert shell.magics_manager.registry["QwenMagic"].model == "qwen-plus"
    assert gateway.requests == []


def test_a_chat_name_with_control_characters_is_refusal(shell, gateway: Gateway, capsys) -> None:
    line = refusal(shell, capsys, "%%qwen -c 'a\x00b'\nHi")
    assert line == r"UsageError: -c/--chat: 'a\x00b' has control characters; a chat name has none."
    assert gateway.requests == []


def test_a_python_keyword_is_no_variable_for_out(shell, gateway: Gateway, capsys) -> None:
    line = refusal(shell, capsys, "%%qwen -o if\nHi")
    assert line == "UsageError: -o/--out needs a variable name (not a Python keyword), not 'if'."
    assert gateway.requests == []


# ---- 3. malformed base URLs, and the key in tracebacks

@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999/api/v1", "http://[not-ip]/v1", "ftp://h/v1",
                                 "http://h:x/v1"])
def test_a_malformed_base_url_option_is_one_line(shell, gateway: Gateway, capsys, url: str) -> None:
    line = refusal(shell, capsys, f"%%qwen --base-url '{url}'\nHi")
    assert line.startswith(f"UsageError: --base-url {url!r}: ")
    assert gateway.requests == []


def test_a_malformed_base_url_setting_is_refused_when_set(shell, gateway: Gateway, capsys, caplog) -> None:
    run(shell, "%config QwenMagic.base_url = 'http://[::1'")  # %config logs a refused value as one line
    text = shown(capsys) + caplog.text
    assert "QwenMagic.base_url 'http://[::1': not a valid URL (Invalid IPv6 URL)." in text
    assert "Traceback" not in text
    assert run(shell, "%%qwen\nHi").success  # the setting was left as it was
    assert len(gateway.requests) == 1


def test_a_malformed_base_url_in_the_environment_is_one_line(shell, gateway: Gateway, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DASHSCOPE_BASE_URL", "http://[::1")
    line = refusal(shell, capsys, "%%qwen\nHi")
    assert line.startswith("UsageError: The base URL 'http://[::1' cannot be used: not a valid URL")
    assert "DASHSCOPE_BASE_URL" in line
    assert gateway.requests == []


def test_the_key_is_wrapped_so_that_no_repr_shows_it() -> None:
    from dashscope.v2._config import resolve_config

    from qwen_magic.client import Secret

    key = Secret(TEST_KEY)
    assert key == TEST_KEY and f"Bearer {key}" == f"Bearer {TEST_KEY}"
    assert TEST_KEY not in repr(key)
    assert TEST_KEY not in repr(resolve_config(api_key=key, base_url="http://127.0.0.1:1/api/v1"))


@pytest.fixture(scope="module")
def verbose_kernel(gateway_server: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelSession]:
    tmp = tmp_path_factory.mktemp("hostile-kernel")
    env = kernel_env(tmp, DASHSCOPE_API_KEY=TEST_KEY, DASHSCOPE_BASE_URL=gateway_server.base_url)
    session = KernelSession(env, cwd=tmp)
    yield session
    session.shutdown()


@pytest.mark.kernel
def test_no_output_of_a_verbose_traceback_carries_the_key(verbose_kernel: KernelSession, gateway: Gateway,
                                                           tmp_path: Path) -> None:
    """Under %xmode Verbose each frame prints its arguments and locals; the saved notebook keeps them."""
    import nbformat

    kernel = verbose_kernel
    cells = [
        "%load_ext qwen_magic\n%xmode Verbose\n%config QwenMagic.max_retries = 0",
        "%%qwen --base-url 'http://[::1'\nHi",
        "%config QwenMagic.base_url = 'http://[::1'\n%config QwenMagic.base_url",
        "%env DASHSCOPE_BASE_URL=http://[::1\n",
        "%%qwen\nHi",
        f"%env DASHSCOPE_BASE_URL={gateway.base_url}",
        # A failure that still raises: the server refuses the call.
        "%%qwen\nHi",
        # An unexpected one from deep inside the SDK: a frame it cannot read.
        "%%qwen\nHi",
        # And an interrupt while the SDK waits for the first frame.
        "%%qwen\nHi",
    ]
    gateway.script(Reply(status=401, error_code="InvalidApiKey"),
                   Reply(raw_frames=['{"output":{"choices":[{"message":{"content":{"a":1}}}]},"usage":{}}']),
                   Reply(text="late", first_token_delay=30))
    notebook = nbformat.v4.new_notebook()
    for index, code in enumerate(cells):
        if index == len(cells) - 1:
            msg_id = kernel.submit(code)
            gateway.wait_for_requests(3, timeout=20)
            time.sleep(0.5)
            kernel.interrupt()
            execution = kernel.collect(msg_id, code=code, timeout=60)
        else:
            execution = kernel.execute(code, timeout=60)
        cell = nbformat.v4.new_code_cell(code)
        cell.outputs = [nbformat.v4.output_from_msg({"header": {"msg_type": m.msg_type}, "content": m.content})
                        for m in execution.messages if m.msg_type in ("stream", "error", "display_data",
                                                                      "execute_result")]
        notebook.cells.append(cell)
        if index in (1, 4, 6, 7, 8):
            assert execution.status == "error", (code, execution.outputs)
    path = tmp_path / "verbose.ipynb"
    nbformat.write(notebook, path)
    saved = path.read_text()
    assert TEST_KEY not in saved
    assert TEST_KEY[3:] not in saved and TEST_KEY[-12:] not in saved
    # The failures were each one line, not the httpx traceback they were.
    assert "InvalidURL" not in saved and "httpx" not in saved
    assert "DashScope error InvalidApiKey" in saved and "DashScope error MalformedFrame" in saved
    kernel.execute("%xmode Context\n%unload_ext qwen_magic")


# ---- 4. placeholders whose objects raise

class _Hostile:
    @property
    def title(self) -> str:
        raise RuntimeError("no title\nat all")

    def __format__(self, spec: str) -> str:
        raise KeyError("spec " + spec)

    def __str__(self) -> str:
        raise ZeroDivisionError("division by zero")

    def __repr__(self) -> str:
        raise OSError("repr failed")


@pytest.mark.parametrize(
    ("placeholder", "expected"),
    [
        ("{doc.title}", "UsageError: {doc.title}: RuntimeError: no title at all"),
        ("{doc:>10}", "UsageError: {doc:>10}: cannot format the value (KeyError: 'spec >10')."),
        ("{doc}", "UsageError: {doc}: cannot format the value (ZeroDivisionError: division by zero)."),
        ("{doc!r}", "UsageError: {doc!r}: cannot format the value (OSError: repr failed)."),
        ("{rows[0]}", "UsageError: {rows[0]}: ZeroDivisionError: integer division or modulo by zero"),
    ],
)
def test_a_placeholder_whose_object_raises_is_named_in_one_line(
    shell, gateway: Gateway, capsys, placeholder: str, expected: str
) -> None:
    class Rows:
        def __getitem__(self, index: int) -> int:
            return 1 // 0

    shell.user_ns["doc"] = _Hostile()
    shell.user_ns["rows"] = Rows()
    assert refusal(shell, capsys, f"%%qwen\nSummarise {placeholder}") == expected
    assert gateway.requests == []


# ---- 6. a surrogate pair split across two frames

@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_a_surrogate_pair_split_across_frames_is_joined_and_counted(shell, gateway: Gateway, capsys,
                                                                      protocol: str) -> None:
    gateway.script(Reply(chunks=["Smile \ud83d", "\ude00 done, odd \udc00 half"], reasoning="Think \ud83e",
                         ascii_json=True, chunk_size=200))
    if protocol == "openai":
        shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    outcome = run(shell, f"%%qwen -m qwen-plus --thinking --protocol {protocol} -o answer\nHi")
    text = shown(capsys)
    assert outcome.success, text
    answer = shell.user_ns["answer"]
    assert answer.text == "Smile 😀 done, odd \ufffd half"
    assert answer.reasoning == "Think \ufffd"  # the reasoning's lone half is replaced, never fatal
    assert "Smile 😀 done" in text
    assert answer.status == COMPLETE and answer.usage.output_tokens > 0
    report = shell.run_line_magic("qwen", "usage")
    assert report.ledger.records[-1].usage.output_tokens == answer.usage.output_tokens
    assert report.ledger.total_cost > 0


def test_a_reasoning_pair_split_across_frames_is_joined(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(reasoning="Hmm \ud83e\udd14 yes", chunk_size=5, text="Ok", ascii_json=True))
    assert run(shell, "%%qwen -m qwen-plus --thinking -o answer\nHi").success
    assert shell.user_ns["answer"].reasoning == "Hmm 🤔 yes"


def test_lone_surrogates_in_the_prompt_are_sent_replaced(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["name"] = b"caf\xe9".decode("utf-8", "surrogateescape")  # as a file read that way gives
    outcome = run(shell, "%%qwen -o answer\nSay {name} and \ud83d\ude00")
    assert outcome.success, shown(capsys)
    assert gateway.requests[-1].messages[-1]["content"] == "Say caf\ufffd and 😀"
    assert shell.run_line_magic("qwen", "usage").ledger.records[-1].status == COMPLETE


# ---- 7. pathological runs of white space, and huge cells

def test_counting_a_million_spaces_never_raises() -> None:
    started = time.monotonic()
    assert 7000 < count_text(" " * 1_000_000) < 9000
    assert count_text("a" + "\n" * 1_000_000 + "b") > 0
    assert count_text("\t " * 500_000) > 0
    assert count_chat_input([{"role": "user", "content": " " * 1_000_000}]) > 0
    assert time.monotonic() - started < 10


def test_normal_text_is_counted_exactly_as_the_tokenizer_counts_it() -> None:
    encoding = _encoding()
    rng = random.Random(7)
    samples = ["Hello, world!", "用一句话解释什么是 Transformer。", "def f(x):\n    return x  # 注释\n",
               " " * 4000 + "x", "a" * 20000, "\n\n".join(["para " * 50] * 40)]
    samples += ["".join(rng.choice("ab c\n\t中文,.") for _ in range(rng.randint(1, 9000))) for _ in range(30)]
    for text in samples:
        assert count_text(text) == len(encoding.encode(text, allowed_special=set(), disallowed_special=())), text[:40]


def test_counting_text_with_many_runs_just_under_the_piece_size_stays_fast() -> None:
    text = (" " * 4000 + "x") * 50
    started = time.monotonic()
    assert count_text(text) == len(_encoding().encode(text, allowed_special=set(), disallowed_special=()))
    assert time.monotonic() - started < 0.5


def test_an_answer_of_a_million_spaces_does_not_poison_its_chat(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(chunks=[" " * 100_000] * 10 + ["end"]))
    assert run(shell, "%%qwen -o long\nSay nothing at length").success, shown(capsys)
    long = shell.user_ns["long"]
    assert long.text == " " * 1_000_000 + "end" and long.usage.output_tokens > 7000
    gateway.script(Reply(text="Fine."))
    outcome = run(shell, "%%qwen -o after\nAnd now?")
    assert outcome.success, shown(capsys)
    assert shell.user_ns["after"].text == "Fine."
    assert len(gateway.requests[-1].messages) == 3  # the long answer went along as history


def test_a_cell_of_a_million_spaces_is_sent_or_refused_in_one_line(shell, gateway: Gateway, capsys) -> None:
    outcome = run(shell, "%%qwen --dry-run\nx" + " " * 1_000_000 + "y")
    assert outcome.success, shown(capsys)


def test_a_two_megabyte_cell_ends_in_one_line_in_bounded_time(shell, gateway: Gateway, capsys) -> None:
    words = " ".join(f"word{n}" for n in range(300_000))[: 2 * 2**20]
    started = time.monotonic()
    line = refusal(shell, capsys, f"%%qwen -m qwen-max\n{words}")
    assert time.monotonic() - started < 30
    assert line.startswith("UsageError: Refused, nothing sent: this request has ")
    assert "over qwen-max's limit of" in line
    assert gateway.requests == []
    # On a model whose limit it fits, it is sent and answered, in bounded time too.
    prose = ("lorem ipsum dolor sit amet " * 80_000)[: 2 * 2**20]
    gateway.script(Reply(text="Received."))
    started = time.monotonic()
    outcome = run(shell, f"%%qwen -m qwen-plus -o answer\n{prose}")
    assert outcome.success, shown(capsys)[-300:]
    assert time.monotonic() - started < 60
    assert shell.user_ns["answer"].text == "Received." and shell.user_ns["answer"].usage.input_tokens > 300_000
    assert len(gateway.requests[-1].messages[-1]["content"]) == len(prose.strip())


# ---- 12. --image reads images only

def test_an_image_symlink_to_the_processes_environment_sends_nothing(shell, gateway: Gateway, capsys,
                                                                      tmp_path: Path) -> None:
    link = tmp_path / "chart.png"
    link.symlink_to("/proc/self/environ")
    line = refusal(shell, capsys, f"%%qwen -m qwen-vl-plus --image {link}\nWhat is this?")
    assert line == f"UsageError: --image {link}: not a regular file; nothing was sent."
    assert gateway.requests == []


def test_a_text_file_named_png_is_not_an_image(shell, gateway: Gateway, capsys, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text(f"DASHSCOPE_API_KEY={TEST_KEY}\n")
    line = refusal(shell, capsys, f"%%qwen -m qwen-vl-plus --image {fake}\nWhat is this?")
    assert "not an image (its content is not PNG, JPEG, GIF, WebP, BMP or TIFF); nothing was sent." in line
    assert gateway.requests == []
    # A real image behind a symlink with another extension goes, typed by its content.
    picture = tmp_path / "picture.png"
    picture.write_bytes(PNG)
    (tmp_path / "alias.jpg").symlink_to(picture)
    assert run(shell, f"%%qwen -m qwen-vl-plus --image {tmp_path / 'alias.jpg'}\nWhat is this?").success
    (request,) = gateway.requests
    assert request.messages[0]["content"][0]["image"].startswith("data:image/png;base64,")


# ---- 13. thinking in the worst case

def test_the_worst_case_includes_the_thinking_budget(shell, gateway: Gateway, capsys) -> None:
    dry = shell.run_cell("%%qwen -m qwen-plus --thinking --thinking-budget 1000 --max-tokens 300 --dry-run\nHi",
                         store_history=False).result
    summary = dict(dry._summary())
    assert "1,300 output tokens (1,000 of them thinking)" in summary["worst case"]
    assert dry.preflight.estimate.max_output_tokens == 1300
    # At the thinking price (¥8 per 1M on qwen-plus), 1,300 output tokens cost more than 300 do.
    assert dry.preflight.estimate.worst_cost > dry.preflight.estimate.input_cost + 1300 * 8 / 1e6 - 1e-12
    line = refusal(shell, capsys, "%%qwen -m qwen-plus --thinking --thinking-budget 1000 --max-tokens 300 "
                                  "--max-cost 0.005\nHi")
    assert "up to 1,300 output tokens (1,000 of them thinking)" in line
    assert gateway.requests == []


def test_thinking_without_a_budget_counts_the_longest_thinking(shell, gateway: Gateway) -> None:
    dry = shell.run_cell("%%qwen -m qwen-plus --thinking --max-tokens 300 --dry-run\nHi", store_history=False).result
    assert dry.preflight.estimate.max_output_tokens == 300 + 32768


# ---- 14. error lines a person can read

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
    "<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"
)


def test_a_502_html_page_is_one_line_saying_what_it_is(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(status=502, body=NGINX_502))
    error, line = error_line(shell, capsys, "%%qwen\nHi")
    assert error.code == "NotDashScope"
    assert "answered with an HTML page (HTTP 502), not DashScope's API" in line
    assert "Check the base URL" in line and "<" not in line


def test_a_captive_portal_page_is_not_called_a_cut(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(status=200, body="<!DOCTYPE html><html><body>Log in to the Wi-Fi</body></html>"))
    error, line = error_line(shell, capsys, "%%qwen\nHi")
    assert error.code == "NotDashScope" and "HTML page (HTTP 200)" in line
    assert "closed mid-answer" not in line and "SSEError" not in line


@pytest.mark.parametrize(
    ("reply", "line_options", "code", "said"),
    [
        (Reply(status=200, body="<html><body>Log in</body></html>"), "--no-stream", "NotDashScope",
         "answered with an HTML page (HTTP 200), not DashScope's API"),
        (Reply(status=200, body="plain words", content_type="text/plain"), "", "NotAStream",
         "did not answer with an event stream (it sent text/plain)"),
        (Reply(status=200, body="not json", content_type="application/json"), "--no-stream", "MalformedFrame",
         "sent could not be read as DashScope's answer (JSONDecodeError: "),
        (Reply(raw_frames=["{" + "x" * 100_000]), "--protocol openai", "MalformedFrame", "is not DashScope's JSON"),
    ],
)
def test_other_answers_that_are_not_the_api_are_one_line(shell, gateway: Gateway, capsys, reply: Reply,
                                                         line_options: str, code: str, said: str) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    if "openai" in line_options:
        shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    gateway.script(reply)
    error, line = error_line(shell, capsys, f"%%qwen {line_options}\nHi")
    assert error.code == code and said in line


def test_a_one_megabyte_malformed_frame_is_a_short_line(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(raw_frames=["{" + "x" * 1_000_000 + TEST_KEY]))
    error, line = error_line(shell, capsys, "%%qwen\nHi")
    assert error.code == "MalformedFrame" and "is not DashScope's JSON" in line


def test_a_frame_of_another_shape_is_one_line(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(raw_frames=['{"output":{"choices":[{"message":{"content":{"a":1},"role":"assistant"},'
                                     '"finish_reason":"null"}]},"usage":{"input_tokens":"many"},"request_id":"r1"}']))
    error, line = error_line(shell, capsys, "%%qwen\nHi")
    assert error.code == "MalformedFrame"
    assert "does not have the shape of DashScope's answers (2 problem(s), first " in line


def test_a_long_error_message_with_the_key_is_masked_then_shortened(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    gateway.script(Reply(status=400, error_code="InvalidParameter",
                         error_message="bad " * 30 + f"key {TEST_KEY} " + "more " * 20000))
    error, line = error_line(shell, capsys, "%%qwen\nHi")
    assert error.code == "InvalidParameter" and line.count("…") >= 1
    assert TEST_KEY[3:12] not in line


# ---- faults that already end well, kept so

def test_a_storm_of_5xx_is_retried_a_bounded_number_of_times_then_one_line(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 2")
    shell.magics_manager.registry["QwenMagic"].session.retry_base_delay = 0.01
    gateway.script(Reply(status=503, error_code="ServiceUnavailable"), times=None)
    error, line = error_line(shell, capsys, "%%qwen -o failed\nHi")
    assert error.code == "ServiceUnavailable"
    assert len(gateway.requests) == 3
    assert shell.run_line_magic("qwen", "usage").ledger.records[-1].status == FAILED


@pytest.mark.parametrize("fault", [{"stall_after": 3, "stall": 5}, {"cut_after": 3}])
def test_a_stall_or_cut_mid_stream_keeps_and_counts_the_partial_answer(shell, gateway: Gateway, capsys,
                                                                        fault: dict) -> None:
    shell.run_line_magic("config", "QwenMagic.timeout = 1")
    gateway.script(Reply(chunks=["One ", "two ", "three ", "four"], **fault))
    error, line = error_line(shell, capsys, "%%qwen -o partial\nCount")
    assert error.code == ("StreamStalled" if "stall_after" in fault else "StreamCut")
    partial = shell.user_ns["partial"]
    assert partial.text == "One two three " and partial.status == FAILED
    assert partial.usage.output_tokens > 0
    record = shell.run_line_magic("qwen", "usage").ledger.records[-1]
    assert record.usage.output_tokens == partial.usage.output_tokens and record.cost > 0
