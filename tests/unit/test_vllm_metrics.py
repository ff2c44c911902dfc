"""Parsing vLLM's /metrics: per-rank loads, and bad bodies rejected with a reason."""

from __future__ import annotations

import pytest

from xds_server.model import RankLoad
from xds_server.sources.scrape import combine
from xds_server.sources.vllm_metrics import MetricsTextError, parse_rank_loads

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


def test_hybrid_server_ranks_are_read_and_summed() -> None:
    ranks = parse_rank_loads(HYBRID)
    assert ranks == [RankLoad("4", 3.0, 2.0, 0.5), RankLoad("5", 1.0, 0.0, 0.1)]
    load = combine(ranks, read_at=7.0)
    assert (load.running, load.waiting, load.read_at) == (4.0, 2.0, 7.0)
    assert load.kv_cache_usage == pytest.approx(0.3)


def test_a_nan_rank_is_left_out_the_others_count() -> None:
    text = HYBRID.replace('engine="5",model_name="qwen"} 1.0', 'engine="5",model_name="qwen"} NaN')
    assert [r.engine for r in parse_rank_loads(text)] == ["4"]


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
        parse_rank_loads(body)
