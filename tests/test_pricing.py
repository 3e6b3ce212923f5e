"""The catalog, costs, estimates, token counts and rate-limit arithmetic (pure code)."""

from __future__ import annotations

import random

from pathlib import Path

import pytest

from qwen_magic.catalog import CatalogError, builtin_catalog, load_catalog
from qwen_magic.client import Usage
from qwen_magic.ledger import CallRecord, Ledger
from qwen_magic.limits import RateLimiter, RetryPolicy
from qwen_magic.pricing import call_cost, estimate, format_yuan, output_tokens_affordable
from qwen_magic.tokens import count_chat_input

CURRENT = [
    "qwen3-max", "qwen-max", "qwen-plus", "qwen-flash", "qwen-turbo", "qwen-long", "qwq-plus",
    "qwen3-coder-plus", "qwen3-coder-flash", "qwen3-vl-plus", "qwen3-vl-flash", "qwen-vl-max", "qwen-vl-plus",
]
RETIRED = [
    "qwen-turbo-0206", "qwen-turbo-0624", "qwen-plus-0206", "qwen-plus-0624", "qwen-plus-0723",
    "qwen-max-0428", "qwen-max-0403", "qwen-max-0107", "qwen-max-1201", "qwen-max-longcontext",
]


def test_the_catalog_holds_every_model_of_both_sheets_with_its_source() -> None:
    catalog = builtin_catalog()
    assert set(catalog.models) == set(CURRENT) | set(RETIRED)
    for name in CURRENT:
        model = catalog.get(name)
        assert not model.retired and model.as_of == "2026" and model.source
        assert model.max_input and model.max_output and model.context and model.free_quota == 1_000_000
    for name in RETIRED:
        model = catalog.get(name)
        assert model.retired and model.as_of == "2024" and model.qpm and model.tpm


def test_where_both_sheets_list_a_model_the_current_figures_win() -> None:
    qwen_max = builtin_catalog().get("qwen-max")
    assert (qwen_max.context, qwen_max.max_input) == (32_768, 30_720)
    assert qwen_max.tiers[0].input == 2.4 and qwen_max.tiers[0].output == 9.6
    # The 2024 sheet's per-1k prices become per-1M figures.
    assert builtin_catalog().get("qwen-max-1201").tiers[0].input == 120


@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        ("qwen-max", Usage(1_000, 100), (1_000 * 2.4 + 100 * 9.6) / 1e6),
        ("qwen3-max", Usage(32_768, 10), (32_768 * 2.5 + 10 * 10) / 1e6),  # the tier's last token
        ("qwen3-max", Usage(40_000, 1_000), (40_000 * 4 + 1_000 * 16) / 1e6),  # second tier, whole request
        ("qwen3-max", Usage(200_000, 1_000), (200_000 * 7 + 1_000 * 28) / 1e6),
        ("qwen-plus", Usage(1_000, 500, reasoning_tokens=300), (1_000 * 0.8 + 500 * 8) / 1e6),  # thinking price
        ("qwen-plus", Usage(1_000, 500), (1_000 * 0.8 + 500 * 2) / 1e6),
        ("qwen-turbo-0206", Usage(1_000, 1_000), (1_000 * 2 + 1_000 * 6) / 1e6),
    ],
)
def test_call_cost_uses_the_tier_of_the_input_and_the_thinking_price(model, usage, expected) -> None:
    assert call_cost(builtin_catalog().get(model), usage) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("model", "usage", "cached", "written"),
    [
        ("qwen-max", Usage(10_000, 100, cached_tokens=8_192), 8_192, 0),
        ("qwen-plus", Usage(3_000, 50, cache_creation_tokens=2_048), 0, 2_048),
        ("qwen-plus", Usage(5_000, 50, cached_tokens=1_024, cache_creation_tokens=3_000), 1_024, 3_000),
        # Mostly cached, yet the second tier: the tier is the whole input's.
        ("qwen3-max", Usage(33_000, 10, cached_tokens=32_000), 32_000, 0),
        # Figures past the input are capped by it: nothing is billed below zero.
        ("qwen-max", Usage(100, 10, cached_tokens=400, cache_creation_tokens=50), 100, 0),
    ],
)
def test_cached_input_is_billed_at_a_fifth_and_cache_writes_at_five_quarters(model, usage, cached, written) -> None:
    info = builtin_catalog().get(model)
    tier = info.tier_for(usage.input_tokens)
    full = usage.input_tokens - cached - written
    expected = ((full + 0.2 * cached + 1.25 * written) * tier.input + usage.output_tokens * tier.output) / 1e6
    assert call_cost(info, usage) == pytest.approx(expected)


def test_an_unknown_model_has_no_cost() -> None:
    assert call_cost(None, Usage(10, 10)) is None
    assert estimate(None, 10, 100, thinking=False).worst_cost is None


def test_estimate_gives_now_and_worst_case() -> None:
    qwen_max = builtin_catalog().get("qwen-max")
    guess = estimate(qwen_max, 1_000, 8_192, thinking=False)
    assert guess.input_cost == pytest.approx(0.0024)
    assert guess.worst_cost == pytest.approx(0.0024 + 8_192 * 9.6 / 1e6)
    thinking = estimate(builtin_catalog().get("qwen-plus"), 1_000, 1_000, thinking=True)
    assert thinking.worst_cost == pytest.approx((1_000 * 0.8 + 1_000 * 8) / 1e6)


def test_affordable_output_tokens_keep_the_worst_case_within_the_amount() -> None:
    qwen_max = builtin_catalog().get("qwen-max")
    fits = output_tokens_affordable(qwen_max, 1_000, 0.01, thinking=False)
    assert estimate(qwen_max, 1_000, fits, thinking=False).worst_cost <= 0.01
    assert estimate(qwen_max, 1_000, fits + 1, thinking=False).worst_cost > 0.01
    assert output_tokens_affordable(qwen_max, 1_000_000, 0.01, thinking=False) == 0


@pytest.mark.parametrize(
    ("amount", "shown"),
    [(0, "¥0"), (0.0004, "¥0.0004"), (0.00042, "¥0.00042"), (0.0000123, "¥0.000012"),
     (0.1234, "¥0.1234"), (0.5, "¥0.5"), (1, "¥1.00"), (1234.567, "¥1,234.57"), (None, "¥?")],
)
def test_yuan_keep_enough_digits(amount, shown) -> None:
    assert format_yuan(amount) == shown


def test_user_file_and_trait_override_and_add_models(tmp_path, monkeypatch) -> None:
    user_file = tmp_path / "models.toml"
    user_file.write_text('[models.qwen-max]\ntiers = [{ input = 3.0, output = 12.0 }]\nqpm = 5\n'
                         '[models.my-local-qwen]\ninput = 0\noutput = 0\nmax_input = 32000\n')
    monkeypatch.setenv("QWEN_MAGIC_MODELS", str(user_file))
    catalog = load_catalog({"qwen-flash": {"tpm": 1234}})
    assert catalog.get("qwen-max").tiers[0].input == 3.0 and catalog.get("qwen-max").qpm == 5
    assert catalog.get("qwen-max").max_input == 30_720  # untouched figures stay
    assert catalog.get("my-local-qwen").max_input == 32_000 and catalog.get("my-local-qwen").priced
    assert catalog.get("qwen-flash").tpm == 1234
    assert str(user_file) in catalog.sources


def test_the_user_file_is_read_once_and_again_after_each_edit(tmp_path, monkeypatch) -> None:
    """Every cell loads the catalog: the user's file is parsed once, then only when it changed
    (or went), and the directory platformdirs names follows the home it reads."""
    from qwen_magic import catalog as module

    parsed: list[Path] = []
    read = module._read
    user_file = tmp_path / "models.toml"
    monkeypatch.setattr(module, "_read", lambda path: (path == user_file and parsed.append(path)) or read(path))
    user_file.write_text("[models.qwen-max]\nqpm = 5\n")
    monkeypatch.setenv("QWEN_MAGIC_MODELS", str(user_file))
    assert [load_catalog().get("qwen-max").qpm for _ in range(3)] == [5, 5, 5]
    assert len(parsed) == 1
    user_file.write_text("[models.qwen-max]\nqpm = 700\n")
    assert load_catalog().get("qwen-max").qpm == 700 and len(parsed) == 2
    user_file.unlink()
    assert load_catalog().get("qwen-max").qpm == module.builtin_catalog().get("qwen-max").qpm
    monkeypatch.delenv("QWEN_MAGIC_MODELS")
    for home in ("first", "second"):
        monkeypatch.setenv("HOME", str(tmp_path / home))
        monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        assert str(module.user_catalog_path()).startswith(str(tmp_path / home))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"m": {"input": 1}}, "needs both 'input' and 'output'"),
        ({"m": {"colour": "red"}}, "unknown keys"),
        ({"m": {"qpm": -1}}, "whole number"),
        ({"m": {"tiers": [{"up_to": 10, "input": 1, "output": 1}]}}, "none on the last tier"),
        ({"m": {"input": -1, "output": 1}}, "numbers >= 0"),
        ({"m": {"thinking": "sometimes"}}, "thinking must be one of"),
        ({"m": 3}, "must map to a table"),
    ],
)
def test_bad_overrides_say_where_and_why(override, message) -> None:
    with pytest.raises(CatalogError, match=message):
        load_catalog(override)


def test_local_count_matches_what_dashscope_billed() -> None:
    # The reference's measured example: a user-only "你是谁？" was billed 22 input tokens.
    assert count_chat_input([{"role": "user", "content": "你是谁？"}]) == 22


def test_counts_are_cached_per_message_so_history_is_cheap() -> None:
    from qwen_magic.tokens import count_message

    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 50} for i in range(40)]
    count_chat_input(history)
    before = count_message.cache_info()
    count_chat_input(history)
    after = count_message.cache_info()
    assert after.misses == before.misses  # nothing encoded again
    assert after.hits - before.hits == len(history) + 1  # the default system prompt too


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_qpm_window_says_how_long_to_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(window=60, clock=clock)
    model = load_catalog({"qwen-max": {"qpm": 2, "tpm": 1_000_000}}).get("qwen-max")
    limiter.record("qwen-max", 10)
    clock.now += 10
    limiter.record("qwen-max", 10)
    clock.now += 5
    wait, reason = limiter.wait_needed(model, 10)
    assert wait == pytest.approx(45) and reason == "2 requests per minute"
    clock.now += 45
    assert limiter.wait_needed(model, 10) == (0.0, "")


def test_tpm_window_waits_for_enough_tokens_to_leave() -> None:
    clock = FakeClock()
    limiter = RateLimiter(window=60, clock=clock)
    model = load_catalog({"qwen-max": {"qpm": 100, "tpm": 1_000}}).get("qwen-max")
    first = limiter.record("qwen-max", 100)
    limiter.settle(first, 600)  # the server's figure replaces the estimate
    clock.now += 20
    limiter.record("qwen-max", 300)
    wait, reason = limiter.wait_needed(model, 200)
    assert wait == pytest.approx(40) and reason == "1,000 tokens per minute"
    assert limiter.wait_needed(model, 100)[0] == 0


def test_retry_backoff_is_exponential_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=8.0, random=random.Random(7))
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered, not in lockstep
    assert policy.delay(1, retry_after=2.5) == 2.5


def test_the_session_total_counts_every_call_given_or_added() -> None:
    earlier = CallRecord(1, "In [1]", "default", "qwen-plus", Usage(10, 5), 0.25, "complete", 1.0)
    ledger = Ledger(records=[earlier])
    assert ledger.total_cost == 0.25
    ledger.add(cell="In [2]", chat="default", model="qwen-plus", usage=Usage(1, 1), cost=None,
               status="failed", elapsed=0.1)
    ledger.add(cell="In [3]", chat="default", model="qwen-plus", usage=Usage(1, 1), cost=0.5,
               status="complete", elapsed=0.1)
    assert ledger.total_cost == sum(r.cost or 0.0 for r in ledger.records) == 0.75
