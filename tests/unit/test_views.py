"""Keep shares: how much of its traffic an Envoy keeps on its own node."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from xds_server.policy.views import HybridSettings, keep_shares


def keep_share(node: str, utilization: Mapping[str, float], capacity: Mapping[str, int],
               settings: HybridSettings) -> int:
    return keep_shares([node], utilization, capacity, settings)[node]

S = HybridSettings(room_threshold=0.6, keep_step=1)
CAPACITY = {"a": 2, "b": 2, "c": 4}


@pytest.mark.parametrize(
    ("utilization", "expected"),
    [
        ({"a": 0.1, "b": 0.0, "c": 0.0}, 1000),   # room: keep everything
        ({"a": 0.6, "b": 0.0, "c": 0.0}, 1000),   # at the threshold: still keep
        ({"a": 0.8, "b": 0.0, "c": 0.0}, 500),    # half way past it: spill half
        ({"a": 1.0, "b": 0.0, "c": 0.0}, 0),      # saturated: everything to the pool
        ({"a": 0.9, "b": 0.9, "c": 0.9}, 1000),   # elsewhere no better: stay local
        ({"a": 0.9, "b": 0.8, "c": 0.8}, 500),    # past the rest of the pool: spill that part
    ],
)
def test_spill_grows_smoothly_past_the_room_threshold(
    utilization: dict[str, float], expected: int
) -> None:
    assert keep_share("a", utilization, CAPACITY, S) == expected


def test_a_node_without_ready_replicas_keeps_nothing() -> None:
    assert keep_share("a", {"b": 0.1}, CAPACITY, S) == 0


def test_the_only_node_keeps_everything_however_busy() -> None:
    assert keep_share("a", {"a": 1.0}, {"a": 2}, S) == 1000


def test_keep_moves_in_steps() -> None:
    coarse = HybridSettings(room_threshold=0.6, keep_step=50)
    assert keep_share("a", {"a": 0.73, "b": 0.0}, CAPACITY, coarse) % 50 == 0


def test_local_first_off_keeps_nothing_local() -> None:
    off = HybridSettings(local_first=False)
    assert keep_share("a", {"a": 0.0, "b": 0.0}, CAPACITY, off) == 0
