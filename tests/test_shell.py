"""%%qwen in a real InteractiveShell, through the real SDK, against the offline gateway."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest

from qwen_magic.client import QwenAPIError
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.result import COMPLETE, FAILED

from .conftest import TEST_KEY


def run(shell, cell: str):
    """Run a cell; return IPython's ExecutionResult."""
    return shell.run_cell(cell, store_history=False)


def test_load_ext_registers_the_magics_without_importing_dashscope() -> None:
    code = textwrap.dedent(
        """
        import sys
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "qwen_magic")
        ip.run_line_magic("load_ext", "qwen_magic")  # a second time is harmless
        magics = ip.magics_manager.magics
        assert "qwen" in magics["cell"] and "qwen" in magics["line"]
        heavy = [m for m in ("dashscope", "httpx", "ipywidgets", "markdown_it", "tiktoken") if m in sys.modules]
        assert not heavy, heavy
        ip.run_line_magic("unload_ext", "qwen_magic")
        assert "qwen" not in ip.magics_manager.magics["cell"]
        assert "qwen" not in ip.magics_manager.magics["line"]
        assert not any(type(c).__name__ == "QwenMagic" for c in ip.configurables)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_answer_streams_to_the_terminal_with_a_footer(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Hello from Qwen, streamed.", chunk_size=5, usage={"input_tokens": 21, "output_tokens": 7}))
    outcome = run(shell, "%%qwen -o answer\nSay hello")
    assert outcome.success
    printed = capsys.readouterr().out
    assert "Hello from Qwen, streamed." in printed
    assert "[qwen-plus · 21 in / 7 out tokens ·" in printed
    answer = shell.user_ns["answer"]
    assert answer.text == "Hello from Qwen, streamed."
    assert answer.status == COMPLETE
    assert answer.usage.input_tokens == 21 and answer.usage.output_tokens == 7
    assert answer.request_id
    (request,) = gateway.requests
    assert request.protocol == "native"
    assert request.messages == [{"role": "user", "content": "Say hello"}]
    assert request.parameters["incremental_output"] is True
    assert request.headers.get("x-dashscope-sse") == "enable" or request.headers.get("X-DashScope-SSE") == "enable"


def test_options_reach_the_request(shell, gateway: Gateway) -> None:
    run(
        shell,
        '%%qwen -m qwen-max -s "Answer in French." -t 0.2 --top-p 0.5 --max-tokens 64 --seed 3 --stop END\nHi',
    )
    (request,) = gateway.requests
    assert request.model == "qwen-max"
    assert request.messages[0] == {"role": "system", "content": "Answer in French."}
    parameters = request.parameters
    assert parameters["temperature"] == 0.2 and parameters["top_p"] == 0.5
    assert parameters["max_tokens"] == 64 and parameters["seed"] == 3
    assert parameters["stop"] == ["END"]


def test_the_model_trait_is_the_default_and_config_changes_it(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", 'QwenMagic.model = "qwen-turbo"')
    run(shell, "%%qwen\nHi")
    assert gateway.requests[-1].model == "qwen-turbo"


def test_no_stream_asks_for_the_whole_answer(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="All at once."))
    run(shell, "%%qwen --no-stream -o answer\nHi")
    assert "All at once." in capsys.readouterr().out
    (request,) = gateway.requests
    assert "x-dashscope-sse" not in {name.lower() for name in request.headers}
    assert shell.user_ns["answer"].text == "All at once."


def test_the_second_cell_carries_the_first_turn(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="Paris."))
    run(shell, "%%qwen\nCapital of France?")
    run(shell, "%%qwen\nAnd of Italy?")
    assert gateway.requests[-1].messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("%%qwen --frobnicate\nHi", "unrecognized arguments: --frobnicate"),
        ("%%qwen\n   \n", "The %%qwen cell is empty"),
        ("%%qwen -t 9\nHi", "-t/--temperature must be in [0, 2), not 9.0."),
        ("%qwen dance", "%qwen has no command 'dance'"),
    ],
)
def test_mistakes_are_one_line_usage_errors(shell, gateway: Gateway, capsys, line: str, expected: str) -> None:
    outcome = run(shell, line)
    assert not outcome.success
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert f"UsageError: {expected}" in text
    assert "Traceback" not in text
    assert gateway.requests == []


def test_no_key_names_the_three_ways_to_set_one(shell, gateway: Gateway, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "UsageError: No DashScope API key is set." in text
    for way in ("%qwen login", "DASHSCOPE_API_KEY", "~/.dashscope/config.toml"):
        assert way in text
    assert gateway.requests == []


def test_the_sdk_config_file_key_is_honoured(shell, gateway: Gateway, monkeypatch, isolated_env) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    config = isolated_env / ".dashscope" / "config.toml"
    config.parent.mkdir()
    config.write_text('api_key = "sk-from-config-file-1234"\n')
    assert run(shell, "%%qwen\nHi").success
    assert gateway.requests[-1].api_key == "sk-from-config-file-1234"


def test_a_key_exported_after_a_failure_is_used(shell, gateway: Gateway, monkeypatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    assert not run(shell, "%%qwen\nHi").success
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-exported-later-5678")
    assert run(shell, "%%qwen\nHi").success
    assert gateway.requests[-1].api_key == "sk-exported-later-5678"


def test_login_keeps_the_key_in_memory_only(shell, gateway: Gateway, monkeypatch, capsys, isolated_env) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    secret = "sk-typed-at-the-prompt-9999"
    monkeypatch.setattr("getpass.getpass", lambda prompt="": secret)
    shell.run_line_magic("qwen", "login")
    assert run(shell, "%%qwen\nHi").success
    assert gateway.requests[-1].api_key == secret
    config = shell.run_line_magic("qwen", "config")
    from IPython.lib.pretty import pretty

    shown = pretty(config) + config._repr_html_() + capsys.readouterr().out
    assert secret not in shown and "…9999" in shown
    assert "%qwen login" in shown
    assert not any(secret in p.read_text(errors="ignore") for p in isolated_env.rglob("*") if p.is_file())
    magics = shell.magics_manager.registry["QwenMagic"]
    assert secret not in repr(magics.session.connection(magics.settings()))


@pytest.mark.parametrize(
    ("reply", "code", "advice"),
    [
        (Reply(status=401, error_code="InvalidApiKey"), "InvalidApiKey", "region-specific"),
        (Reply(status=400, error_code="Arrearage"), "Arrearage", "arrears"),
        (Reply(status=400, error_code="DataInspectionFailed"), "DataInspectionFailed", "moderation"),
        (Reply(status=400, error_code="InvalidParameter"), "InvalidParameter", "options"),
        (Reply(status=403, error_code="AccessDenied"), "AccessDenied", "permissions"),
        (Reply(status=403, error_code="AllocationQuota.FreeTierOnly"), "AllocationQuota.FreeTierOnly", "free"),
        (Reply(status=404, error_code="ModelNotFound"), "ModelNotFound", "No such model"),
        (Reply(status=429, error_code="Throttling.RateQuota"), "Throttling.RateQuota", "per minute"),
        (Reply(status=429, error_code="Throttling.AllocationQuota"), "Throttling.AllocationQuota", "quota"),
        (Reply(status=500, error_code="InternalError"), "InternalError", "try again"),
        (Reply(status=503, error_code="ServiceUnavailable"), "ServiceUnavailable", "try again"),
        (Reply(status=504, error_code="GatewayTimeout"), "GatewayTimeout", "try again"),
        (Reply(status=429, error_code="Throttling", error_as_sse=True), "Throttling", "wait"),
    ],
)
def test_dashscope_errors_are_one_clear_line(shell, gateway: Gateway, capsys, reply: Reply, code: str, advice: str) -> None:
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")  # the error itself, not a retry
    gateway.script(reply)
    outcome = run(shell, "%%qwen -o answer\nHi")
    assert not outcome.success
    assert isinstance(outcome.error_in_exec, QwenAPIError)
    text = capsys.readouterr().out
    error_lines = [line for line in text.splitlines() if line.startswith("DashScope error")]
    assert len(error_lines) == 1, text
    (line,) = error_lines
    assert line.startswith(f"DashScope error {code}: ")
    assert "request id " in line and advice in line
    assert "Traceback" not in text and TEST_KEY not in text


def test_an_error_mid_stream_keeps_the_partial_answer(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(chunks=["First part. ", "Second part. ", "never"], error_after=2, status=500, error_code="InternalError"))
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    text = capsys.readouterr().out
    assert "First part. Second part." in text and "never" not in text
    assert "failed: InternalError" in text
    assert "DashScope error InternalError" in text
    magics = shell.magics_manager.registry["QwenMagic"]
    (turn,) = magics.session.chat().turns
    assert turn.result.status == FAILED
    assert turn.result.text == "First part. Second part. "


def test_a_cut_stream_is_a_clear_line_and_keeps_the_text(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(chunks=["Kept ", "text ", "lost"], cut_after=2))
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    text = capsys.readouterr().out
    assert "Kept text" in text and "lost" not in text
    assert "DashScope error StreamCut:" in text
    assert "Traceback" not in text


def test_a_stalled_stream_times_out_with_a_clear_line(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.timeout = 0.5")
    gateway.script(Reply(chunks=["Before ", "the stall"], stall_after=1, stall=10))
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    text = capsys.readouterr().out
    assert "Before" in text
    assert "DashScope error StreamStalled: no data from" in text and "0.5 s" in text


def test_connection_refused_is_a_clear_line(shell, monkeypatch, capsys) -> None:
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DASHSCOPE_BASE_URL", f"http://127.0.0.1:{port}/api/v1")
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    text = capsys.readouterr().out
    assert f"DashScope error ConnectionError: cannot reach http://127.0.0.1:{port}/api/v1" in text
    assert "Traceback" not in text


def test_help_and_config_are_objects_with_text_and_html(shell) -> None:
    from IPython.lib.pretty import pretty

    help_table = shell.run_line_magic("qwen", "help")
    assert "%qwen config" in pretty(help_table) and "<table>" in help_table._repr_html_()
    config = shell.run_line_magic("qwen", "config")
    text = pretty(config)
    assert "qwen-plus" in text and "127.0.0.1" in text
    assert TEST_KEY not in text and "…cdef" in text


def test_cell_help_lists_options_and_examples(shell) -> None:
    doc = shell.magics_manager.magics["cell"]["qwen"].__doc__
    for piece in ("--max-tokens", "--no-stream", "-o VAR", "%%qwen -m qwen-max"):
        assert piece in doc


def test_a_key_read_from_a_file_with_its_newline_works_and_is_never_shown(shell, gateway: Gateway, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-from-a-file-0123456789\n")
    assert run(shell, "%%qwen\nHi").success
    assert gateway.requests[-1].api_key == "sk-from-a-file-0123456789"
    gateway.script(Reply(status=401, error_code="InvalidApiKey"))
    shell.run_line_magic("config", "QwenMagic.max_retries = 0")
    run(shell, "%%qwen\nHi")
    shown = capsys.readouterr()
    assert "sk-from-a-file-0123456789" not in shown.out + shown.err


def test_the_redaction_covers_escaped_keys_and_bearer_headers() -> None:
    from qwen_magic.client import redact

    key = "sk-secret-abcdef0123456789\n"
    line = "Illegal header value b'Bearer sk-secret-abcdef0123456789\\n'"
    assert "abcdef0123456789" not in redact(line, key)
    assert redact("Authorization: Bearer sk-other-key-999", None) == "Authorization: Bearer …"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("DASHSCOPE_REGION", "atlantis", "invalid region"), ("DASHSCOPE_TIMEOUT", "soon", "DASHSCOPE_TIMEOUT")],
)
def test_a_broken_dashscope_setting_is_one_line(shell, gateway: Gateway, monkeypatch, capsys, variable, value, message) -> None:
    monkeypatch.setenv(variable, value)
    assert not run(shell, "%%qwen\nHi").success
    assert not run(shell, "%qwen config").success
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert text.count("UsageError: dashscope's configuration cannot be used:") == 2 and message in text
    assert "Traceback" not in text


def test_a_failed_answer_is_kept_in_its_out_variable(shell, gateway: Gateway) -> None:
    gateway.script(Reply(chunks=["Half ", "of it"], cut_after=1))
    assert not run(shell, "%%qwen -o answer\nHi").success
    assert shell.user_ns["answer"].status == "failed" and shell.user_ns["answer"].text == "Half "


def test_resume_from_something_that_is_not_a_notebook_is_one_line(shell, tmp_path, capsys) -> None:
    for name, content in (("list.ipynb", b"[1, 2]"), ("binary.ipynb", b"\xff\xfe\x00garbage")):
        (tmp_path / name).write_bytes(content)
        assert not run(shell, f"%qwen resume --from {tmp_path / name}").success
    shown = capsys.readouterr()
    assert (shown.out + shown.err).count("is not a notebook") == 2


def test_a_new_kernels_first_turn_sets_the_stored_chat_aside_not_mixed(shell, gateway: Gateway, capsys) -> None:
    run(shell, "%%qwen\nOld one")
    run(shell, "%%qwen\nOld two")
    shell.run_line_magic("reload_ext", "qwen_magic")  # a new kernel: same notebook, same file
    run(shell, "%%qwen\nNew one")
    printed = capsys.readouterr().out
    kept = re.search(r"turns from an earlier kernel are kept as '([^']+)'", printed).group(1)
    magics = shell.magics_manager.registry["QwenMagic"]
    store = magics.session.store(magics.settings())
    assert [r["prompt"] for r in store.turns(magics.session.notebook, "default")] == ["New one"]
    shell.run_line_magic("qwen", f"resume '{kept}'")
    assert [t.prompt for t in magics.session.chat(kept).turns] == ["Old one", "Old two"]


def test_an_interrupt_between_frames_keeps_the_servers_usage_and_request_id(shell, gateway: Gateway, monkeypatch) -> None:
    from qwen_magic.client import QwenClient

    gateway.script(Reply(chunks=[f"w{n} " for n in range(40)], usage={"input_tokens": 77, "output_tokens": 40}))
    create = QwenClient._create

    class InterruptedAfterTenFrames:
        """The SDK's stream, with Ctrl-C landing as the eleventh frame is read."""

        def __init__(self, frames) -> None:
            self.frames = frames

        def __iter__(self):
            for number, frame in enumerate(self.frames, 1):
                if number == 11:
                    raise KeyboardInterrupt
                yield frame

        def close(self) -> None:
            self.frames.close()

    monkeypatch.setattr(QwenClient, "_create", staticmethod(
        lambda client, request, *, stream: InterruptedAfterTenFrames(create(client, request, stream=stream))
    ))
    assert not run(shell, "%%qwen -o answer\nHi").success
    answer = shell.user_ns["answer"]
    assert answer.status == "interrupted" and answer.text == "".join(f"w{n} " for n in range(10))
    # The server's running usage from the last frame read, not a local estimate.
    assert answer.usage.input_tokens == 77 and 0 < answer.usage.output_tokens < 40
    assert answer.request_id


def test_an_interrupt_outside_the_streams_code_keeps_the_servers_usage(shell, gateway: Gateway, monkeypatch) -> None:
    from qwen_magic import view

    gateway.script(Reply(reasoning="thinking it over " * 6, chunk_size=8, text="Answer.",
                         usage={"input_tokens": 55, "output_tokens": 30}))
    add_reasoning = view.TerminalView.add_reasoning
    seen: list[str] = []

    def interrupted_at_the_fourth_delta(self, delta: str) -> None:
        seen.append(delta)
        if len(seen) == 4:
            raise KeyboardInterrupt  # lands in the cell's code, between two frames of thinking
        add_reasoning(self, delta)

    monkeypatch.setattr(view.TerminalView, "add_reasoning", interrupted_at_the_fourth_delta)
    assert not run(shell, "%%qwen -o answer\nHi").success
    answer = shell.user_ns["answer"]
    assert answer.status == "interrupted" and answer.text == ""
    assert answer.reasoning == "".join(seen)  # kept as it came, shown or not
    # The server's usage from the last frame read: the stream was closed, not dropped.
    assert answer.usage.input_tokens == 55 and 0 < answer.usage.output_tokens < 30 and answer.request_id


def test_dashscope_settings_are_read_again_when_they_change_and_only_then(
    shell, gateway: Gateway, monkeypatch, isolated_env
) -> None:
    """Each cell follows the key and files dashscope reads, without resolving them anew when
    nothing changed (that cost every cell a tenth of a millisecond)."""
    import dashscope.v2._config as sdk_config

    resolved: list[int] = []
    resolve = sdk_config.resolve_config
    monkeypatch.setattr(sdk_config, "resolve_config", lambda **kw: resolved.append(1) or resolve(**kw))

    def key_sent() -> str:
        assert run(shell, "%%qwen\nHi").success
        return gateway.requests[-1].api_key

    assert [key_sent() for _ in range(3)] == [TEST_KEY] * 3 and len(resolved) == 1
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-exported-between-cells-1")
    assert key_sent() == "sk-exported-between-cells-1"
    monkeypatch.delenv("DASHSCOPE_API_KEY")
    (isolated_env / ".dashscope").mkdir()
    for key in ("sk-from-the-file-22", "sk-edited-in-the-file-333"):
        (isolated_env / ".dashscope" / "config.toml").write_text(f'api_key = "{key}"\n')
        assert key_sent() == key
    monkeypatch.setattr(sdk_config.settings, "_explicit", {})  # restored after the test
    sdk_config.settings.api_key = "sk-set-on-dashscope-settings-4444"
    assert key_sent() == "sk-set-on-dashscope-settings-4444"
    assert len(resolved) == 5


def test_a_dashscope_file_made_readable_is_read_again(tmp_path) -> None:
    """A key file fixed with chmod changes only its ctime: that is part of what is compared."""
    from qwen_magic.client import _file_stamp

    key_file = tmp_path / "api_key"
    key_file.write_text("sk-in-a-file-0000\n")
    key_file.chmod(0o000)
    unreadable = _file_stamp(str(key_file))
    time.sleep(0.05)  # file times move in steps of a few ms
    key_file.chmod(0o600)
    assert _file_stamp(str(key_file)) != unreadable
    assert _file_stamp(str(tmp_path / "missing")) is None
