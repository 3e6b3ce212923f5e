"""The real service's frames: first-frame search sources, the search count, cached input, roots.

Real shell, real SDK over HTTP to the offline gateway, which sends what DashScope sends.
Expected costs are worked out from the catalog's figures.
"""

from __future__ import annotations

import pytest
from dashscope.v2.types.common import Usage as SDKUsage
from IPython.lib.pretty import pretty

from qwen_magic.catalog import builtin_catalog
from qwen_magic.client import Usage
from qwen_magic.conversation import Turn
from qwen_magic.gateway import Gateway, Reply
from qwen_magic.pricing import format_yuan

from .test_shell import run

SOURCES = [
    {"title": "Hangzhou weather", "url": "https://weather.example/hz", "site_name": "W", "index": 1},
    {"title": "Rain report", "url": "https://news.example/rain", "site_name": "N", "index": 2},
]
LONG_PROMPT = "Summarise this log line by line. " + "The pump started and stopped again. " * 200


def footer_of(printed: str) -> str:
    (line,) = [line for line in printed.splitlines() if line.startswith("[qwen")]
    return line


def session_of(shell):
    return shell.magics_manager.registry["QwenMagic"].session


def expected_cost(model_name: str, usage: Usage, *, cached: int = 0, written: int = 0) -> float:
    """Yuan by DashScope's cache rules, from the catalog: reads at 20%, writes at 125% of the input price."""
    tier = builtin_catalog().get(model_name).tier_for(usage.input_tokens)
    full = usage.input_tokens - cached - written
    return ((full + 0.2 * cached + 1.25 * written) * tier.input + usage.output_tokens * tier.output) / 1e6


# ---- web search

@pytest.mark.parametrize("thinking", [False, True], ids=["answer", "thinking-first"])
def test_sources_sent_in_the_first_frame_only_are_shown(shell, gateway: Gateway, capsys, thinking) -> None:
    reasoning = "Looking at the reports." if thinking else ""
    gateway.script(Reply(chunks=["It", " rained", " [1]."], reasoning=reasoning, chunk_size=4, search_results=SOURCES))
    flags = "--search --thinking" if thinking else "--search"
    assert run(shell, f"%%qwen {flags} -o answer\nWeather in Hangzhou yesterday?").success
    answer = shell.user_ns["answer"]
    assert [source["url"] for source in answer.search_results] == [s["url"] for s in SOURCES]
    assert "1. [Hangzhou weather](https://weather.example/hz)" in answer._repr_markdown_()
    footer = footer_of(capsys.readouterr().out)
    assert " out tokens" in footer and " · 1 search · " in footer
    assert answer.usage.searches == 1


def test_a_whole_answer_keeps_its_sources_and_search_count(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="It rained [2].", search_results=SOURCES))
    assert run(shell, "%%qwen --search --no-stream -o answer\nWeather in Hangzhou yesterday?").success
    assert gateway.requests[-1].stream is False
    answer = shell.user_ns["answer"]
    assert [source["title"] for source in answer.search_results] == ["Hangzhou weather", "Rain report"]
    assert " · 1 search · " in footer_of(capsys.readouterr().out)


def test_several_searches_and_a_search_without_sources(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Compared.", search_results=SOURCES,
                         usage={"plugins": {"search": {"count": 3, "strategy": "max"}}}))
    assert run(shell, "%%qwen --search -o first\nCompare three cities").success
    assert " · 3 searches · " in footer_of(capsys.readouterr().out)
    assert shell.user_ns["first"].usage.searches == 3
    gateway.script(Reply(text="Nothing found.", search_results=[]))
    assert run(shell, "%%qwen --search -o second\nSomething obscure").success
    second = shell.user_ns["second"]
    assert second.search_results == [] and "Sources" not in second._repr_markdown_()
    assert " · 1 search · " in footer_of(capsys.readouterr().out)


def test_compatible_mode_counts_the_search_and_has_no_sources(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="It rained.", search_results=SOURCES))
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    assert run(shell, "%%qwen --protocol openai --search -o answer\nWeather in Hangzhou yesterday?").success
    assert gateway.requests[-1].protocol == "openai"
    assert shell.user_ns["answer"].search_results == []
    assert " · 1 search · " in footer_of(capsys.readouterr().out)


def test_the_search_count_is_kept_in_the_turn_record_and_old_records_still_load(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="It rained.", search_results=SOURCES, cached_tokens=300))
    assert run(shell, f"%%qwen --search\n{LONG_PROMPT}").success
    session = session_of(shell)
    (stored,) = session.store(shell.magics_manager.registry["QwenMagic"].settings()).turns(session.notebook, "default")
    assert stored["usage"]["searches"] == 1 and stored["usage"]["cached_tokens"] == 300
    restored = Turn.from_record(stored).result
    assert restored.usage.searches == 1 and restored.usage.cached_tokens == 300
    assert " · 1 search · " in restored.footer()
    old = {key: value for key, value in stored.items()}
    old["usage"] = {"input_tokens": 10, "output_tokens": 2, "reasoning_tokens": 0, "cached_tokens": 0}
    assert Turn.from_record(old).result.usage == Usage(10, 2)


# ---- cached input

def test_cached_input_is_billed_at_a_fifth_and_shown_everywhere_the_same(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Summary.", cached_tokens=1024))
    assert run(shell, f"%%qwen -m qwen-plus -o answer\n{LONG_PROMPT}").success
    answer = shell.user_ns["answer"]
    usage = answer.usage
    assert usage.input_tokens > 1024 and usage.cached_tokens == 1024
    cost = expected_cost("qwen-plus", usage, cached=1024)
    assert answer.cost == pytest.approx(cost)
    footer = footer_of(capsys.readouterr().out)
    assert f"{usage.input_tokens:,} in (1,024 cached) / {usage.output_tokens:,} out tokens · {format_yuan(cost)} · " in footer
    # The session's ledger, %qwen usage and the all-time store add up to the same figure.
    assert session_of(shell).ledger.total_cost == pytest.approx(cost)
    assert f"total: {format_yuan(cost)} in 1 call" in pretty(shell.run_line_magic("qwen", "usage"))
    (row,) = session_of(shell).store(shell.magics_manager.registry["QwenMagic"].settings()).totals_by_model()
    assert row[4] == pytest.approx(cost)


def test_cache_writes_cost_more_and_the_tier_is_the_whole_inputs(shell, gateway: Gateway, capsys) -> None:
    gateway.script(Reply(text="Kept.", cache_creation_tokens=1500))
    assert run(shell, f"%%qwen -m qwen-plus -o written\n{LONG_PROMPT}").success
    written = shell.user_ns["written"]
    assert written.usage.cache_creation_tokens == 1500
    assert written.cost == pytest.approx(expected_cost("qwen-plus", written.usage, written=1500))
    assert "in (1,500 written to cache) / " in footer_of(capsys.readouterr().out)
    # 40,000 tokens in, 30,000 of them cached: qwen3-max's second tier, as for the whole input.
    gateway.script(Reply(text="Long.", cached_tokens=30_000, usage={"input_tokens": 40_000, "output_tokens": 1_000}))
    assert run(shell, "%%qwen -m qwen3-max -o tiered\nThe long report again").success
    tiered = shell.user_ns["tiered"]
    qwen3_max = builtin_catalog().get("qwen3-max")
    assert qwen3_max.tier_for(40_000) != qwen3_max.tier_for(10_000)
    assert tiered.cost == pytest.approx(expected_cost("qwen3-max", tiered.usage, cached=30_000))
    assert "40,000 in (30,000 cached) / 1,000 out tokens" in footer_of(capsys.readouterr().out)


def test_compatible_mode_and_the_vision_variant_are_priced_alike(shell, gateway: Gateway) -> None:
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}'")
    gateway.script(Reply(text="Summary.", cached_tokens=1024))
    assert run(shell, f"%%qwen --protocol openai -m qwen-plus -o compatible\n{LONG_PROMPT}").success
    compatible = shell.user_ns["compatible"]
    assert gateway.requests[-1].protocol == "openai" and compatible.usage.cached_tokens == 1024
    assert compatible.cost == pytest.approx(expected_cost("qwen-plus", compatible.usage, cached=1024))
    # Some vision models report the cache read at the top of the usage.
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.base_url}'")
    gateway.script(Reply(text="A cat.", usage={"input_tokens": 2_000, "output_tokens": 10, "cached_tokens": 1_200}))
    assert run(shell, "%%qwen -m qwen-vl-plus -o vision\nDescribe the picture again").success
    vision = shell.user_ns["vision"]
    assert vision.usage.cached_tokens == 1_200
    assert vision.cost == pytest.approx(expected_cost("qwen-vl-plus", vision.usage, cached=1_200))


def test_figures_that_do_not_add_up_never_make_a_cost_negative(shell, gateway: Gateway) -> None:
    gateway.script(Reply(text="Odd.", usage={"input_tokens": 100, "output_tokens": 10,
                                             "prompt_tokens_details": {"cached_tokens": 500,
                                                                       "cache_creation_input_tokens": 300}}))
    assert run(shell, "%%qwen -m qwen-plus -o odd\nHi").success
    odd = shell.user_ns["odd"]
    # Never more than the whole input at the cached price: 100 tokens read, none left to write.
    assert odd.cost == pytest.approx(expected_cost("qwen-plus", Usage(100, 10), cached=100))
    assert odd.cost > 0


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"prompt_tokens_details": "junk", "plugins": None}, {}),
        ({"plugins": {"search": "junk"}, "prompt_tokens_details": {"cached_tokens": "x"}, "cached_tokens": "x"}, {}),
        ({"plugins": {"search": {"count": 2}}, "prompt_tokens_details": {"cached_tokens": None}}, {"searches": 2}),
        ({"prompt_tokens_details": {}, "cached_tokens": 20}, {"cached_tokens": 20}),
        ({"prompt_tokens_details": {"cached_tokens": -5, "cache_creation_input_tokens": 7}},
         {"cache_creation_tokens": 7}),
    ],
)
def test_missing_or_malformed_details_read_as_none(wire, expected) -> None:
    usage = Usage.from_sdk(SDKUsage(input_tokens=50, output_tokens=5, **wire))
    assert usage == Usage(50, 5, **expected)


# ---- DashScope's two roots

@pytest.mark.parametrize("variable", ["DASHSCOPE_BASE_URL", "DASHSCOPE_HTTP_BASE_URL"])
def test_a_native_root_in_the_environment_serves_the_openai_protocol_too(shell, gateway: Gateway, monkeypatch,
                                                                          capsys, variable) -> None:
    monkeypatch.delenv("DASHSCOPE_BASE_URL")
    monkeypatch.setenv(variable, gateway.base_url)  # .../api/v1, as many users set it
    gateway.script(Reply(text="Bonjour."))
    assert run(shell, "%%qwen --protocol openai -o answer\nSalut").success
    assert gateway.requests[-1].path == "/compatible-mode/v1/chat/completions"
    assert shell.user_ns["answer"].text == "Bonjour."
    shell.run_line_magic("config", "QwenMagic.protocol = 'openai'")
    config = pretty(shell.run_line_magic("qwen", "config"))
    assert gateway.compatible_base_url in config and gateway.base_url + "\n" not in config + "\n"


def test_the_trait_follows_the_protocol_both_ways_but_a_cells_url_is_used_as_written(shell, gateway: Gateway,
                                                                                      capsys) -> None:
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.base_url}'")
    shell.run_line_magic("config", "QwenMagic.protocol = 'openai'")
    assert run(shell, "%%qwen\nOne").success
    assert gateway.requests[-1].path == "/compatible-mode/v1/chat/completions"
    shell.run_line_magic("config", f"QwenMagic.base_url = '{gateway.compatible_base_url}/'")
    shell.run_line_magic("config", "QwenMagic.protocol = 'native'")
    assert run(shell, "%%qwen\nTwo").success
    assert gateway.requests[-1].path == "/api/v1/services/aigc/text-generation/generation"
    assert gateway.base_url in pretty(shell.run_line_magic("qwen", "config"))
    # A URL given for one cell is the user's own choice: sent as written.
    assert not run(shell, f"%%qwen --base-url {gateway.base_url} --protocol openai\nThree").success
    assert gateway.all_requests[-1].path == "/api/v1/chat/completions"
    printed = capsys.readouterr().out
    assert "No route for POST /api/v1/chat/completions" in printed and "Traceback" not in printed
