"""The right prices: the region's sheet and currency, cache reads and writes, searches, --cache.

Real shell, real SDK, the offline gateway (which keeps an explicit cache as the service does).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from IPython.lib.pretty import pretty

from qwen_magic.gateway import Gateway, Reply
from qwen_magic.regions import BEIJING, SINGAPORE, resolve_region

from .conftest import refusal, run_cell
from .test_costs_shell import footer_of

LONG_SYSTEM = "You answer questions about the data in the notebook, briefly and exactly. " * 120  # > 1,024 tokens


# ---- regions and currency


@pytest.mark.parametrize(
    ("override", "base_url", "env_region", "expected"),
    [
        (None, "https://dashscope-intl.aliyuncs.com/api/v1", None, SINGAPORE),
        (None, "https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "cn-beijing", SINGAPORE),
        (None, "https://dashscope.aliyuncs.com/api/v1", "ap-southeast-1", BEIJING),
        (None, "https://ws-1.ap-southeast-1.maas.aliyuncs.com/api/v1", None, SINGAPORE),
        (None, "http://127.0.0.1:8765/api/v1", "ap-southeast-1", SINGAPORE),
        (None, None, None, BEIJING),
        ("singapore", "https://dashscope.aliyuncs.com/api/v1", None, SINGAPORE),
        ("cn-beijing", "https://dashscope-intl.aliyuncs.com/api/v1", None, BEIJING),
    ],
)
def test_the_region_comes_from_the_trait_then_the_hosts_name_then_dashscope_region(
    isolated_env, monkeypatch, override, base_url, env_region, expected
) -> None:
    if env_region:
        monkeypatch.setenv("DASHSCOPE_REGION", env_region)
    assert resolve_region(override, base_url) is expected


def test_the_1x_base_url_variable_on_the_intl_host_means_singapore(isolated_env, monkeypatch) -> None:
    monkeypatch.setenv("DASHSCOPE_HTTP_BASE_URL", "https://dashscope-intl.aliyuncs.com/api/v1")
    assert resolve_region(None, None) is SINGAPORE


def test_singapore_shows_dollars_from_the_intl_sheet(shell, gateway: Gateway, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DASHSCOPE_REGION", "ap-southeast-1")
    gateway.script(Reply(text="Hello.", usage={"input_tokens": 10_000, "output_tokens": 1_000}))
    assert run_cell(shell, "%%qwen -m qwen-plus -o answer\nHi").success
    footer = footer_of(capsys.readouterr().out)
    # Singapore's qwen-plus: $0.4 in, $1.2 out per 1M (Beijing's would be ¥0.8 and ¥2).
    assert " · $0.0052 · " in footer and "session $0.0052" in footer and "¥" not in footer, footer
    assert shell.user_ns["answer"].cost == pytest.approx(0.0052)
    assert shell.user_ns["answer"].currency == "USD"
    assert str(run_cell(shell, "%qwen budget 2").result) == "Budget $2.00: spent $0.0052, $1.99 left."
    config = pretty(run_cell(shell, "%qwen config").result)
    assert "region    Singapore (international site): prices, budgets and limits in US dollars" in config
    refused = refusal(shell, capsys, "%qwen limit daily ¥5")
    assert "in the region's currency, US dollars ($), not yuan" in refused


def test_a_model_without_a_singapore_price_is_unpriced_there(shell, gateway: Gateway, capsys) -> None:
    shell.run_line_magic("config", "QwenMagic.region = 'singapore'")
    assert run_cell(shell, "%%qwen -m qwen-long\nHi").success
    assert "· cost unknown ·" in capsys.readouterr().out


def test_a_store_with_spend_in_both_currencies_keeps_them_apart(shell, gateway: Gateway, capsys, isolated_env) -> None:
    gateway.script(Reply(text="x", usage={"input_tokens": 100_000, "output_tokens": 0}), times=2)
    run_cell(shell, "%%qwen -m qwen-plus\nIn Beijing")
    shell.run_line_magic("config", "QwenMagic.region = 'singapore'")
    run_cell(shell, "%%qwen -m qwen-plus\nIn Singapore")
    assert "session $0.04 ·" in capsys.readouterr().out  # not ¥0.08 + $0.04
    report = run_cell(shell, "%qwen usage --all").result
    text = pretty(report)
    assert "in US dollars" in text and "$0.04" in text and "¥" not in text, text
    assert "Calls billed in CNY are kept apart" in text
    # Singapore's free quota is per region, and for input and output each.
    assert "qwen-plus  1      $0.04  900,000 in / 1,000,000 out of 1,000,000 each" in text, text
    session_usage = pretty(run_cell(shell, "%qwen usage").result)
    assert "total: ¥0.08 and $0.04 in 2 calls" in session_usage
    rows = sqlite3.connect(Path(isolated_env).parent / "history.sqlite3").execute(
        "SELECT currency, region, cost FROM calls ORDER BY id").fetchall()
    assert rows == [("CNY", "beijing", pytest.approx(0.08)), ("USD", "singapore", pytest.approx(0.04))]


# ---- cache and search prices


@pytest.mark.parametrize(
    ("options", "reply", "expected"),
    [
        # Implicit cache (no markers): 4,000 read at 20% of qwen-max's ¥2.4 per 1M.
        ("-m qwen-max", Reply(text="x", cached_tokens=4_000, usage={"input_tokens": 10_000, "output_tokens": 0}),
         (6_000 + 4_000 * 0.2) * 2.4 / 1e6),
        # Explicit cache (--cache): 4,000 read at 10%, 2,000 written at 125% of qwen-plus's ¥0.8.
        ("-m qwen-plus --cache", Reply(text="x", cached_tokens=4_000, cache_creation_tokens=2_000,
                                       usage={"input_tokens": 10_000, "output_tokens": 0}),
         (4_000 + 4_000 * 0.1 + 2_000 * 1.25) * 0.8 / 1e6),
        # The same figures without --cache: the read is implicit, at 20%.
        ("-m qwen-plus", Reply(text="x", cached_tokens=4_000, cache_creation_tokens=2_000,
                               usage={"input_tokens": 10_000, "output_tokens": 0}),
         (4_000 + 4_000 * 0.2 + 2_000 * 1.25) * 0.8 / 1e6),
    ],
)
def test_cached_and_written_tokens_are_priced_at_20_10_and_125_percent(shell, gateway: Gateway, capsys,
                                                                       options, reply, expected) -> None:
    gateway.script(reply)
    assert run_cell(shell, f"%%qwen {options} -o answer\nHi").success
    assert shell.user_ns["answer"].cost == pytest.approx(expected)
    footer = footer_of(capsys.readouterr().out)
    assert "4,000 cached" in footer


def test_searches_are_counted_and_priced_where_the_catalog_has_a_price(shell, gateway: Gateway, capsys,
                                                                       isolated_env) -> None:
    sources = [{"index": 1, "title": "Hangzhou", "url": "https://example.com", "site_name": "Example"}]
    gateway.script(Reply(text="x", search_results=sources, usage={"input_tokens": 1_000, "output_tokens": 0}),
                   times=2)
    run_cell(shell, "%%qwen -m qwen-max --search -o plain\nWeather?")
    shell.run_line_magic("config", "QwenMagic.models = {'qwen-max': {'search_price': 4}}")
    run_cell(shell, "%%qwen -m qwen-max --search -o priced\nWeather?")
    assert "· 1 search ·" in capsys.readouterr().out
    assert shell.user_ns["plain"].cost == pytest.approx(1_000 * 2.4 / 1e6)
    assert shell.user_ns["priced"].cost == pytest.approx(1_000 * 2.4 / 1e6 + 4 / 1_000)
    searches = sqlite3.connect(Path(isolated_env).parent / "history.sqlite3").execute(
        "SELECT SUM(searches) FROM calls").fetchone()[0]
    assert searches == 2


# ---- --cache


def _marked(message: dict) -> bool:
    content = message["content"]
    return isinstance(content, list) and any(block.get("cache_control") == {"type": "ephemeral"} for block in content)


@pytest.mark.parametrize("protocol", ["native", "openai"])
def test_cache_marks_the_stable_prefix_and_the_gateway_writes_then_reads_it(shell, gateway: Gateway, capsys,
                                                                            protocol) -> None:
    shell.user_ns["long_system"] = LONG_SYSTEM
    options = f"-m qwen-plus --cache --protocol {protocol}"
    assert run_cell(shell, f"%%qwen {options} -s '{{long_system}}' -o first\nFirst question").success
    assert run_cell(shell, f"%%qwen {options} -o second\nSecond question").success
    first, second = gateway.requests
    # The system prompt is marked; the question never is; the previous answer closes the prefix.
    assert [_marked(m) for m in first.messages] == [True, False]
    assert [_marked(m) for m in second.messages] == [True, False, True, False]
    for message in second.messages:
        if _marked(message):
            (block,) = message["content"]
            assert block["text"] and set(block) <= {"type", "text", "cache_control"}
        else:
            assert isinstance(message["content"], str)
    answers = shell.user_ns["first"], shell.user_ns["second"]
    assert answers[0].usage.cache_creation_tokens > 1_024 and answers[0].usage.cached_tokens == 0
    assert answers[1].usage.cached_tokens == answers[0].usage.cache_creation_tokens
    printed = capsys.readouterr().out
    assert f"({answers[0].usage.cache_creation_tokens:,} written to cache)" in printed
    assert f"({answers[1].usage.cached_tokens:,} cached, " in printed


def test_the_cache_trait_marks_as_the_option_does(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", "QwenMagic.cache = True")
    run_cell(shell, "%%qwen -m qwen-plus -s 'Be brief.'\nHi")
    assert _marked(gateway.requests[-1].messages[0])


def test_without_cache_nothing_is_marked(shell, gateway: Gateway) -> None:
    run_cell(shell, "%%qwen -m qwen-plus -s 'Be brief.'\nHi")
    assert all(isinstance(m["content"], str) for m in gateway.requests[-1].messages)


def test_cache_on_a_model_without_explicit_cache_is_one_line(shell, gateway: Gateway, capsys) -> None:
    line = refusal(shell, capsys, "%%qwen -m qwen-max --cache\nHi")
    assert "--cache: qwen-max has no explicit context cache" in line and "qwen-plus" in line
    assert gateway.requests == []


def test_the_dry_run_shows_what_the_cache_saves(shell, gateway: Gateway) -> None:
    shell.user_ns["long_system"] = LONG_SYSTEM
    dry = run_cell(shell, "%%qwen -m qwen-plus --cache --dry-run -s '{long_system}'\nHi").result
    text = pretty(dry)
    (line,) = [line for line in text.splitlines() if line.strip().startswith("cache")]
    assert "prefix tokens marked" in line and "saved when read from the cache (at 10%)" in line
    assert "<td style='text-align:left'>cache</td>" in dry._repr_html_()
    assert gateway.requests == []


def test_the_catalog_records_implicit_and_explicit_cache(shell) -> None:
    from qwen_magic.catalog import INTL_PATH, builtin_catalog

    for catalog in (builtin_catalog(), builtin_catalog(INTL_PATH)):
        assert catalog.get("qwen-plus").explicit_cache and catalog.get("qwen-plus").implicit_cache
        assert catalog.get("qwen-max").implicit_cache and not catalog.get("qwen-max").explicit_cache
    assert not builtin_catalog().get("qwen-max-0428").implicit_cache  # dated snapshots: none


def test_the_model_list_shows_the_regions_sheet_and_cache_kinds(shell) -> None:
    shell.run_line_magic("config", "QwenMagic.region = 'singapore'")
    table = pretty(run_cell(shell, "%qwen models").result)
    assert table.startswith("Qwen models, Singapore (international site) (prices in US dollars;")
    (row,) = [line for line in table.splitlines() if line.strip().startswith("qwen-plus ")]
    assert "0.4→1.2 (tiered)" in row and "implicit, explicit" in row
    details = pretty(run_cell(shell, "%qwen models qwen-max").result)
    assert "$1.6 in → $6.4 out per 1M" in details and "context cache     implicit\n" in details


def test_a_repaired_history_file_keeps_each_calls_currency(shell, capsys, isolated_env) -> None:
    from qwen_magic.store import Store

    from .test_hostile_store import damage

    path = Path(isolated_env).parent / "history.sqlite3"
    store = Store(path)
    for number in range(200):
        store.add_call("nb", "default", "qwen-plus", 10, 20, 0.01, "complete", currency="USD", region="singapore",
                       searches=1)
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    damage(path, first_page=3, every=3)
    assert run_cell(shell, "%qwen repair").success
    rows = sqlite3.connect(path).execute("SELECT DISTINCT currency, region, searches FROM calls").fetchall()
    assert rows == [("USD", "singapore", 1)]
