"""The simulator's ORCA header is byte for byte what vLLM's orca_metrics.py writes."""

from __future__ import annotations

import pytest

from xds_server.sim.orca import orca_header


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("TEXT", "TEXT named_metrics.num_requests_waiting=3.0, "
                 "named_metrics.kv_cache_usage_perc=0.4"),
        ("text", "TEXT named_metrics.num_requests_waiting=3.0, "
                 "named_metrics.kv_cache_usage_perc=0.4"),
        ("JSON", 'JSON {"named_metrics": {"num_requests_waiting": 3.0, '
                 '"kv_cache_usage_perc": 0.4}}'),
    ],
)
def test_header_has_vllms_shape_and_only_its_two_metrics(requested: str, expected: str) -> None:
    assert orca_header(requested, num_requests_waiting=3, kv_cache_usage_perc=0.4) == {
        "endpoint-load-metrics": expected}


@pytest.mark.parametrize("requested", ["", "PROTO", "BINARY"])
def test_unknown_or_missing_format_gets_no_header(requested: str) -> None:
    assert orca_header(requested, num_requests_waiting=1, kv_cache_usage_perc=0.1) == {}
