"""The benchmark's own logic: its pool file, its statistics, its reading of Envoy's log.

The benchmark itself is not run here; these are the parts whose mistakes would silently
skew its figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from xds_server.bench import report
from xds_server.bench.xds import (
    EnvoyEds,
    LogTail,
    _is_delta,
    node_name,
    pool_yaml,
    replica_address,
)
from xds_server.sources.static_file import parse_pools
from xds_server.xds import types


def test_generated_pool_file_parses_with_every_replica_on_its_node() -> None:
    (pool,) = parse_pools(pool_yaml(replicas=30, nodes=7, capacity=2))
    assert len(pool.replicas) == 30
    assert len({r.address for r in pool.replicas}) == 30
    assert len(pool.nodes) == 7
    assert {r.capacity for r in pool.replicas} == {2}
    by_node: dict[str, int] = {}
    for r in pool.replicas:
        by_node[r.node] = by_node.get(r.node, 0) + 1
    assert sorted(by_node.values()) == [4, 4, 4, 4, 4, 5, 5]


def test_addresses_are_private_and_unique_across_many_nodes() -> None:
    nodes = 70_000
    addresses = {replica_address(i, nodes) for i in range(2 * nodes)}
    assert len(addresses) == 2 * nodes
    assert all(a.startswith("10.") for a in addresses)


def test_node_names_sort_in_index_order() -> None:
    names = [node_name(i, 1250) for i in range(1250)]
    assert names == sorted(names)
    assert names[0] == "node-0000"


@pytest.mark.parametrize(("streams", "share", "delta"), [(200, 0.5, 100), (7, 0.5, 3),
                                                         (10, 0.0, 0), (10, 1.0, 10)])
def test_delta_streams_follow_the_share(streams: int, share: float, delta: int) -> None:
    assert sum(_is_delta(i, share) for i in range(streams)) == delta


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(values, 0) == 1.0
    assert report.percentile(values, 50) == 2.5
    assert report.percentile(values, 100) == 4.0
    assert report.percentile(values, 99) == pytest.approx(3.97)
    assert math.isnan(report.percentile([], 50))


def test_spread_leaves_out_missing_repeats() -> None:
    s = report.spread([3.0, math.nan, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert report.with_spread(s) == "2.00 s (1.00 s-3.00 s)"
    assert report.with_spread(report.spread([])) == "n/a"


EDS = types.ENDPOINT


def test_envoy_eds_is_complete_when_every_assignment_is_in_and_requests_resume() -> None:
    eds = EnvoyEds()
    eds.feed([
        "100.000001 main some unrelated line",
        f"100.5 config Received gRPC message for {EDS} at version abc",
        f"100.6 config Pausing discovery requests for {EDS} (previous count 0)",
        f"100.7 config gRPC config for {EDS} accepted with 1 resources with version abc",
    ])
    assert not eds.complete(2)
    eds.feed([
        f"100.8 config gRPC config for {EDS} accepted with 1 resources with version abc",
        f"100.9 config Resuming discovery requests for {EDS}",
    ])
    assert eds.complete(2)
    assert (eds.received, eds.last_accepted, eds.accepted) == (100.5, 100.8, 2)


def test_envoy_eds_ignores_other_types_and_counts_rejections() -> None:
    eds = EnvoyEds()
    eds.feed([
        f"1.0 config Resuming discovery requests for {EDS}",  # before any response: not ours
        f"1.1 config gRPC config for {types.CLUSTER} accepted with 3 resources with version x",
        f"1.2 config Received gRPC message for {EDS} at version y",
        f"1.3 config gRPC config for {EDS} rejected: bad endpoint",
        "not a log line at all",
    ])
    assert eds.resumed is None and eds.accepted == 0 and eds.rejected == 1
    assert eds.received == 1.2


def test_log_tail_returns_only_new_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "envoy.log"
    path.write_text("old\n")
    tail = LogTail(path)
    tail.skip()
    with open(path, "a") as f:
        f.write("one\ntw")
    assert tail.lines() == ["one"]
    with open(path, "a") as f:
        f.write("o\n")
    assert tail.lines() == ["two"]
    assert tail.lines() == []
