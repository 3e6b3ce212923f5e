"""Never a surprise bill: costs in the footer, refusals before sending, rate limits, retries.

Real shell, real SDK, the offline gateway with scripted usage.
"""

from __future__ import annotations

import re

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.client import QwenAPIError
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.tokens import count_chat_input

from .test_shell import run


def footer_of(printed: str) -> str:
    (line,) = [line for line in printed.splitlines() if line.startswith("[qwen") or line.startswith("[my-")]
    return line


@pytest.mark.parametrize(
    ("model", "reply", "cost"),
    [
        ("qwen-max", Reply(text="Flat.", usage={"input_tokens": 1_000, "output_tokens": 100}), "¥0.0034"),
        ("qwen3-max", Reply(text="Tier two.", usage={"input_tokens": 40_000, "output_tokens": 1_000}), "¥0.176"),
        (
            "qwen-plus",
            Reply(text="Thought first.", reasoning="Let me think.",
                  usage={"input_tokens": 1_000, "output_tokens": 500, "output_tokens_details": {"reasoning_tokens": 300}}),
            "¥0.0048",
        ),
    ],
)
def test_the_footer_shows_tokens_and_yuan_from_the_servers_usage(shell, gateway: Gateway, capsys, model, reply, cost) -> None:
    gateway.script(reply)
    assert run(shell, f"%%qwen -m {model} -o answer\nHow much?").success
    footer = footer_of(capsys.readouterr().out)
    usage = reply.usage
    assert f"{usage['input_tokens']:,} in / {usage['output_tokens']:,} out tokens" in footer
    assert f" · {cost} · chat default, turn 1 · session {cost} · " in footer
    assert shell.user_ns["answer"].cost == pytest.approx(float(cost.lstrip("¥")), rel=0.02)


def test_the_session_total_adds_up_across_cells(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="One.", usage={"input_tokens": 1_000, "output_tokens": 100}), times=2)
    run(shell, "%%qwen -m qwen-max\nFirst")
    run(shell, "%%qwen -m qwen-max -o second\nSecond")
    assert "turn 2 · session ¥0.0067 ·" in capsys.readouterr().out
    assert shell.user_ns["second"].session_cost == pytest.approx(2 * 0.00336)


def test_an_unknown_model_is_called_and_its_cost_is_unknown_with_a_hint(shell, gateway: Gateway, capsys) -> None:
    assert run(shell, "%%qwen -m my-finetune\nHi").success
    printed = capsys.readouterr().out
    assert "· cost unknown ·" in printed
    assert "add the model's price with %config QwenMagic.models = {'my-finetune':" in printed
    assert gateway.requests[-1].model == "my-finetune"


def test_a_user_price_makes_an_unknown_model_priced(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.models = {'my-finetune': {'input': 10, 'output': 20}}")
    gateway.script(Reply(text="Hi.", usage={"input_tokens": 1_000, "output_tokens": 1_000}))
    run(shell, "%%qwen -m my-finetune\nHi")
    assert " · ¥0.03 · " in capsys.readouterr().out


def test_dry_run_shows_messages_tokens_limit_and_cost_range_and_sends_nothing(shell, gateway: Gateway) -> None:
    outcome = run(shell, '%%qwen -m qwen-max --max-tokens 500 --dry-run -s "Be brief."\nWhat is a monad?')
    dry = outcome.result
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a monad?"}]
    tokens = count_chat_input(messages)
    text = pretty(dry)
    assert text.startswith("Dry run: nothing was sent.")
    assert f"{tokens:,} (model limit 30,720)" in text
    assert "[system] Be brief." in text and "[user] What is a monad?" in text
    assert "with 500 output tokens" in text
    assert dry.preflight.estimate.worst_cost == pytest.approx((tokens * 2.4 + 500 * 9.6) / 1e6)
    assert "<details open>" in dry._repr_html_()
    assert gateway.requests == []


def test_a_budget_refuses_a_call_that_could_pass_it_and_sends_nothing(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("qwen", "budget 0.01")
    outcome = run(shell, "%%qwen -m qwen-max\nWrite a long essay.")
    assert not outcome.success
    shown = capsys.readouterr()
    message = shown.out + shown.err
    assert "UsageError: Refused, nothing sent: this call could cost up to ¥0.0787 (24 input tokens" in message
    assert "up to 8,192 output tokens on qwen-max" in message
    assert "session budget (¥0.01 left of ¥0.01)" in message
    assert "raise the budget (%qwen budget 0.08)" in message and "lower --max-tokens to 1,035 or less" in message
    assert gateway.requests == []
    # Lowering --max-tokens as advised lets it through, and the spending is counted.
    gateway.script(Reply(text="Short.", usage={"input_tokens": 30, "output_tokens": 5}))
    assert run(shell, "%%qwen -m qwen-max --max-tokens 1000\nWrite a short essay.").success
    assert "spent ¥0.00012" in pretty(shell.run_line_magic("qwen", "budget"))


def test_budget_command_shows_sets_and_removes(shell, gateway: Gateway, capsys) -> None:
    assert pretty(shell.run_line_magic("qwen", "budget")).startswith("No budget set; spent ¥0")
    assert pretty(shell.run_line_magic("qwen", "budget 2")) == "Budget ¥2.00: spent ¥0, ¥2.00 left."
    shell.run_line_magic("qwen", "budget off")
    assert pretty(shell.run_line_magic("qwen", "budget")).startswith("No budget set")
    assert not run(shell, "%qwen budget lots").success


def test_the_budget_trait_is_the_default(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", "QwenMagic.budget = 0.0001")
    assert not run(shell, "%%qwen -m qwen-max\nHi").success
    shell.run_line_magic("qwen", "budget off")  # the session's word wins over the trait
    assert run(shell, "%%qwen -m qwen-max\nHi").success


def test_max_cost_bounds_one_cell(shell, gateway: Gateway, capsys) -> None:
    outcome = run(shell, "%%qwen -m qwen-max --max-cost 0.001\nHi")
    assert not outcome.success
    shown = capsys.readouterr()
    assert "more than --max-cost ¥0.001. To go ahead, raise --max-cost" in shown.out + shown.err
    assert gateway.requests == []


def test_a_budget_with_an_unknown_price_is_refused_with_the_way_out(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("qwen", "budget 1")
    assert not run(shell, "%%qwen -m my-finetune\nHi").success
    shown = capsys.readouterr()
    assert "my-finetune's price is unknown, so its cost cannot be bounded" in shown.out + shown.err
    assert gateway.requests == []


def test_a_request_over_the_models_input_limit_is_refused(shell, gateway: Gateway, capsys) -> None:
    shell.user_ns["long_text"] = "hello " * 7_000
    outcome = run(shell, "%%qwen -m qwen-max-0428\n" + "hello " * 7_000)
    assert not outcome.success
    shown = capsys.readouterr()
    message = shown.out + shown.err
    assert "UsageError: Refused, nothing sent: this request has 7,0" in message
    assert "over qwen-max-0428's limit of 6,144" in message
    assert gateway.requests == []


def test_a_call_waits_for_the_qpm_window_and_says_so(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.models = {'qwen-max': {'qpm': 2}}")
    session = shell.magics_manager.registry["QwenMagic"].session
    session.limiter.window = 1.5  # the same sliding window, shortened for the test
    for n in range(3):
        assert run(shell, f"%%qwen -m qwen-max\nQuestion {n}").success
    printed = capsys.readouterr().out
    assert "[Rate limit of qwen-max (2 requests per minute): waiting 1." in printed
    assert len(gateway.requests) == 3


def test_two_429s_then_success_shows_one_answer_after_three_requests(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(status=429, error_code="Throttling.RateQuota", retry_after=0.05), times=2)
    gateway.script(Reply(text="Third time lucky."))
    outcome = run(shell, "%%qwen -o answer\nHi")
    assert outcome.success
    printed = capsys.readouterr().out
    assert printed.count("Throttling.RateQuota from the server: retrying in 0.1 s") == 2
    assert "(try 2 of 4)" in printed and "(try 3 of 4)" in printed
    assert printed.count("Third time lucky.") == 1
    assert len(gateway.requests) == 3
    assert shell.user_ns["answer"].text == "Third time lucky."


def test_429_forever_gives_the_clear_error_after_the_bounded_tries(shell, gateway: Gateway, capsys) -> None:
    shell.magics_manager.registry["QwenMagic"].session.retry_base_delay = 0.01
    gateway.script(Reply(status=429, error_code="Throttling"), times=None)
    outcome = run(shell, "%%qwen\nHi")
    assert not outcome.success
    assert isinstance(outcome.error_in_exec, QwenAPIError)
    printed = capsys.readouterr().out
    assert printed.count("retrying in") == 3
    assert "DashScope error Throttling:" in printed
    assert len(gateway.requests) == 4


def test_an_error_after_text_is_never_retried(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(chunks=["Some ", "text"], error_after=1, error_code="InternalError"))
    assert not run(shell, "%%qwen\nHi").success
    assert "retrying" not in capsys.readouterr().out
    assert len(gateway.requests) == 1


def test_usage_lists_every_call_with_totals(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="A.", usage={"input_tokens": 1_000, "output_tokens": 100}))
    run(shell, "%%qwen -m qwen-max\nOne")
    gateway.script(Reply(status=401, error_code="InvalidApiKey"))
    run(shell, "%%qwen -m qwen-plus\nTwo")
    report = shell.run_line_magic("qwen", "usage")
    text = pretty(report)
    lines = text.splitlines()
    assert lines[0].split()[:8] == ["#", "cell", "chat", "model", "in", "out", "cost", "status"]
    assert "qwen-max" in lines[1] and "1,000" in lines[1] and "¥0.0034" in lines[1] and "complete" in lines[1]
    assert lines[1].endswith("█" * 18 + "░" * 2)  # 1,000 in and 100 out of the biggest call
    assert "qwen-plus" in lines[2] and "failed" in lines[2]
    assert "total: ¥0.0034 in 2 calls" in text
    html = report._repr_html_()
    assert html.count("background:#7aa6d6") == 2  # one input/output bar per call


def test_count_shows_text_and_request_tokens(shell) -> None:
    table = shell.run_line_magic("qwen", "count 你是谁？")
    text = pretty(table)
    assert "as text                    3" in text
    assert "as a one-message request   26 " in text  # qwen-plus bills an empty think block: 22 + 4


def test_models_lists_the_catalog_and_one_model_in_full(shell) -> None:
    listing = pretty(shell.run_line_magic("qwen", "models"))
    assert "qwen3-max" in listing and "qwen-max-0428" in listing and "retired" in listing
    assert "0.0024→0.0096" in listing and "2.4→9.6" in listing  # per 1K and per 1M
    detail = pretty(shell.run_line_magic("qwen", "models qwen3-max"))
    assert "price, input 32,769–131,072" in detail and "¥4 in → ¥16 out per 1M" in detail
    assert not run(shell, "%qwen models qwen-9000").success


def test_a_rate_limit_sent_as_the_streams_first_frame_is_retried_too(shell, gateway: Gateway, capsys) -> None:
    # DashScope can answer 200 and put the error in the stream's first frame.
    gateway.script(Reply(chunks=["never shown"], error_after=0, error_code="Throttling", retry_after=0.05))
    gateway.script(Reply(text="After the wait."))
    assert run(shell, "%%qwen -o answer\nHi").success
    assert "Throttling from the server: retrying" in capsys.readouterr().out
    assert len(gateway.requests) == 2 and shell.user_ns["answer"].text == "After the wait."


def test_a_budget_already_passed_suggests_enough_to_go_on(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Costly.", usage={"input_tokens": 100_000, "output_tokens": 0}))
    run(shell, "%%qwen -m qwen-max --max-tokens 10\nSpend")  # ¥0.24
    shell.run_line_magic("qwen", "budget 0.05")
    assert not run(shell, "%%qwen -m qwen-max --max-tokens 100\nMore").success
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "the session budget (used up: ¥0.24 spent of ¥0.05)" in text
    suggested = float(re.search(r"%qwen budget ([\d.]+)\)", text).group(1))
    shell.run_line_magic("qwen", f"budget {suggested}")
    assert run(shell, "%%qwen -m qwen-max --max-tokens 100\nMore").success


def test_a_cut_in_compatible_mode_still_counts_what_was_sent_and_written(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    gateway.script(Reply(text="word " * 200, chunk_size=5, cut_after=20))
    assert not run(shell, "%%qwen --protocol openai -m qwen-max -o answer\nTalk").success
    answer = shell.user_ns["answer"]
    assert answer.usage.input_tokens > 0 and answer.usage.output_tokens > 0 and answer.cost > 0


def test_an_aliased_model_shares_its_entrys_rate_limit(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.models = {'my-qwen': {'input': 1, 'output': 1, 'qpm': 1}}")
    shell.run_line_magic("config", "QwenMagic.model_aliases = {'Qwen/Qwen3-8B': 'my-qwen'}")
    shell.magics_manager.registry["QwenMagic"].session.limiter.window = 1.0
    run(shell, "%%qwen -m my-qwen\nOne")
    run(shell, "%%qwen -m Qwen/Qwen3-8B\nTwo")
    assert "[Rate limit of Qwen/Qwen3-8B (1 requests per minute): waiting" in capsys.readouterr().out


def test_a_refused_new_chat_leaves_the_chat_as_it_was(shell, gateway: Gateway) -> None:
    run(shell, "%%qwen\nKeep me")
    assert not run(shell, "%%qwen -n --max-cost 0.0000001\nStart over").success
    session = shell.magics_manager.registry["QwenMagic"].session
    assert [t.prompt for t in session.chat().turns] == ["Keep me"]
    assert [r["prompt"] for r in session.store(shell.magics_manager.registry["QwenMagic"].settings())
            .turns(session.notebook, "default")] == ["Keep me"]
