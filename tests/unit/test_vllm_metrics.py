"""Parsing vLLM's /metrics: per-rank loads and output tokens, bad bodies rejected with a
reason; a decode speed from two readings."""

from __future__ import annotations

import pytest

from xds_server.model import RankLoad
from xds_server.sources.scrape import Count, combine, decode_speed
from xds_server.sources.vllm_metrics import MetricsTextError, parse_metrics

HYBRID = """
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="4",model_name="qwen"} 3.0
vllm:num_requests_running{engine="5",model_name="qwen"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="4",model_name="qwen"} 2.0
vllm:num_requests_waiting{engine="5",model_name="qwen"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="4",model_name="qwen"} 0.5
vllm:kv_cache_usage_perc{engine="5",model_name="qwen"} 0.1
"""
#: As vLLM's prometheus_client Counter writes it (with `_created`), after the histograms.
VLLM_TOKENS = """
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="4",model_name="qwen"} 1200.0
vllm:generation_tokens_created{engine="4",model_name="qwen"} 1.7e+09
vllm:generation_tokens_total{engine="5",model_name="qwen"} 34.0
vllm:generation_tokens_created{engine="5",model_name="qwen"} 1.7e+09
vllm:generation_tokens_totally{engine="5",model_name="qwen"} 99.0
"""
#: As the simulator writes it: a collector's counter family, no `_created`, no engine label
#: on a server of one rank in an older vLLM.
SIM_ONE_RANK = """
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 2.0
vllm:num_requests_waiting 0.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total 77.0
"""


def test_hybrid_server_ranks_are_read_and_summed() -> None:
    ranks = parse_metrics(HYBRID).ranks
    assert ranks == [RankLoad("4", 3.0, 2.0, 0.5), RankLoad("5", 1.0, 0.0, 0.1)]
    load = combine(ranks, read_at=7.0)
    assert (load.running, load.waiting, load.read_at) == (4.0, 2.0, 7.0)
    assert load.kv_cache_usage == pytest.approx(0.3)


def test_a_nan_rank_is_left_out_the_others_count() -> None:
    text = HYBRID.replace('engine="5",model_name="qwen"} 1.0', 'engine="5",model_name="qwen"} NaN')
    assert [r.engine for r in parse_metrics(text).ranks] == ["4"]


def test_output_tokens_are_summed_over_the_engines_read() -> None:
    assert parse_metrics(HYBRID + VLLM_TOKENS).generation_tokens == 1234.0
    assert parse_metrics(SIM_ONE_RANK).generation_tokens == 77.0


@pytest.mark.parametrize(
    "tokens",
    [
        HYBRID,                                                  # an older vLLM: no counter
        HYBRID + VLLM_TOKENS.replace("34.0", "NaN"),
        HYBRID + VLLM_TOKENS.replace("34.0", "-3"),
        HYBRID + "\n".join(line for line in VLLM_TOKENS.splitlines()
                           if 'total{engine="5"' not in line),  # one engine's is missing
    ],
)
def test_an_unusable_token_counter_is_no_count_and_no_error(tokens: str) -> None:
    reading = parse_metrics(tokens)
    assert [r.engine for r in reading.ranks] == ["4", "5"]
    assert reading.generation_tokens is None


def test_a_rank_left_out_leaves_its_tokens_out_too() -> None:
    text = HYBRID.replace('engine="5",model_name="qwen"} 1.0', 'engine="5",model_name="qwen"} NaN')
    assert parse_metrics(text + VLLM_TOKENS).generation_tokens == 1200.0


def count(tokens: float, running: float, at: float, engines: tuple[str, ...] = ("4", "5")
          ) -> Count:
    return Count(engines, tokens, running, at)


@pytest.mark.parametrize(
    ("before", "now", "speed"),
    [
        (count(100, 4, 10.0), count(220, 2, 12.0), 20.0),   # 120 tokens / 2 s / 3 running
        (None, count(220, 2, 12.0), None),                   # first reading
        (count(100, 1, 10.0), count(110, 0, 12.0), None),    # idle: under one running
        (count(5000, 4, 10.0), count(40, 4, 11.0), None),    # restarted: counter went back
        (count(100, 4, 10.0), count(220, 4, 10.0), None),    # no time between them
        (count(100, 4, 10.0), count(220, 4, 11.0, ("4",)), None),  # other engines summed
    ],
)
def test_decode_speed_is_tokens_per_second_per_running_request(
        before: Count | None, now: Count, speed: float | None) -> None:
    assert decode_speed([before, now] if before is not None else [now]) == speed


def test_decode_speed_divides_by_the_running_requests_of_every_reading_in_between() -> None:
    # A batch that came and went between two quiet readings: the endpoints alone read 2
    # running and three times the speed.
    readings = [count(100, 2, 10.0), count(160, 10, 11.0), count(220, 2, 12.0)]
    assert decode_speed(readings) == pytest.approx(120 / 2 / (14 / 3))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("<html>502 Bad Gateway</html>", "no vllm:num_requests_running"),
        ('vllm:num_requests_running{engine="0" 1\n', "not Prometheus text"),
        ("", "no vllm:num_requests_running"),
        ("vllm:num_requests_running 1\n", "missing vllm:num_requests_waiting"),
        ("vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n", "running=-1"),
        ("vllm:num_requests_running +Inf\nvllm:num_requests_waiting 0\n", "running=inf"),
    ],
)
def test_unusable_bodies_say_why(body: str, reason: str) -> None:
    with pytest.raises(MetricsTextError, match=reason):
        parse_metrics(body)
