"""The persistent model weighs each replica by its decode speed against the pool's: a slow
GPU loses weight within a few readings and gets it back as quickly once it is fast again."""

from __future__ import annotations

import dataclasses

import pytest

from xds_server.model import Load, Pool, Replica
from xds_server.policy.load import relative_speeds
from xds_server.policy.weights import SCALE, Decision, Memory, PolicySettings, decide

A1 = Replica("10.0.0.1", 8000, "node-a", capacity=2)
A2 = Replica("10.0.0.2", 8000, "node-a", capacity=2)
B1 = Replica("10.0.0.3", 8000, "node-b", capacity=2)
POOL = Pool("p", (A1, A2, B1))
#: The tilt on, so that speeds are seen to combine with it.
S = PolicySettings(deadband=0.0, balance_gain_per_s=0.1)
FULL = 2 * SCALE


def reading(speed: float | None, running: float = 4, waiting: float = 0) -> Load:
    return Load(running=running, waiting=waiting, decode_speed=speed)


def run(readings: dict[str, Load], seconds: int, memory: Memory | None = None,
        start: float = 0.0) -> Decision:
    """The same readings, fresh, once a second for `seconds` seconds."""
    memory = memory or Memory()
    decision = None
    for t in range(seconds + 1):
        now = start + t
        fresh = {a: dataclasses.replace(x, read_at=now) for a, x in readings.items()}
        decision = decide(POOL, fresh, memory, now, S)
        memory = decision.memory
    assert decision is not None
    return decision


PEERS = {r.address: reading(30.0) for r in POOL.replicas}
SLOW = {**PEERS, A1.address: reading(10.0)}


def test_a_replica_a_third_as_fast_ends_up_with_a_third_of_its_weight() -> None:
    settled = run(PEERS, 10)
    assert set(settled.weights.endpoints.values()) == {FULL}
    first = run(SLOW, 0, settled.memory, start=11)
    lowered = run(SLOW, 12, settled.memory, start=11)
    # One reading moves it part of the way (speeds are smoothed), a few all of it.
    assert FULL / 3 < first.weights.endpoints[A1.address] <= FULL
    assert lowered.weights.endpoints[A1.address] == pytest.approx(FULL / 3, rel=0.05)
    assert lowered.weights.endpoints[A2.address] == lowered.weights.endpoints[B1.address] == FULL
    assert lowered.explain[A1.address].relative_speed == pytest.approx(1 / 3, rel=0.05)
    # Its node weighs what its replicas do together, as a locality.
    assert lowered.weights.localities["node-a"] == pytest.approx(FULL * 4 / 3, rel=0.05)


def test_a_healed_replica_gets_its_weight_back_within_a_few_speed_windows() -> None:
    lowered = run(SLOW, 20)
    healed = run(PEERS, 4 * round(S.speed_window_s), lowered.memory, start=21)
    assert healed.weights.endpoints[A1.address] >= 0.95 * FULL


def test_a_speed_no_longer_read_is_forgotten_at_twice_stale_after_s() -> None:
    lowered = run(SLOW, 20)
    # Idle (vLLM gave no speed) but freshly read: the last speed holds a while, then goes.
    idle = {a: reading(None, running=0) for a in PEERS}
    held = run(idle, 1, lowered.memory, start=21)
    assert held.weights.endpoints[A1.address] < 0.5 * FULL
    gone = run(idle, round(2 * S.stale_after_s) + 1, lowered.memory, start=21)
    assert gone.weights.endpoints[A1.address] == FULL


def test_equal_speeds_weigh_as_no_speeds_at_all() -> None:
    # A lasting excess load on A1: the tilt lowers it the same with or without speeds.
    unknown = {**{a: reading(None) for a in PEERS}, A1.address: reading(None, 8, waiting=8)}
    equal = {**PEERS, A1.address: reading(30.0, 8, waiting=8)}
    without, alike = run(unknown, 20), run(equal, 20)
    assert without.weights.endpoints[A1.address] < FULL
    assert alike.weights == without.weights
    assert alike.node_keep == without.node_keep


def test_a_replica_that_decodes_nothing_keeps_the_minimum_share() -> None:
    stuck = run({**PEERS, A1.address: reading(0.0)}, 20)
    assert stuck.weights.endpoints[A1.address] == round(S.min_share * FULL)


@pytest.mark.parametrize(
    ("speeds", "capacities", "expected"),
    [
        # The typical speed is a rank's: B1's four ranks outweigh A1's and A2's two.
        ({"a1": 10.0, "a2": 10.0, "b1": 30.0}, {"a1": 1, "a2": 1, "b1": 4},
         {"a1": 1 / 3, "a2": 1 / 3, "b1": 1.0}),
        # Two alike: the faster sets it, so the slow one loses rather than the fast gains.
        ({"a1": 10.0, "b1": 30.0}, {"a1": 1, "b1": 1}, {"a1": 1 / 3, "b1": 1.0}),
        # Clamped to [low, high].
        ({"a1": 0.1, "a2": 30.0, "b1": 30.0, "c1": 300.0}, {}, {"a1": 0.02, "a2": 1.0,
                                                             "b1": 1.0, "c1": 4.0}),
        # Nothing decodes anywhere: nothing to compare with.
        ({"a1": 0.0, "b1": 0.0}, {}, {}),
    ],
)
def test_relative_speed_is_against_the_capacity_weighted_median(
    speeds: dict[str, float], capacities: dict[str, int], expected: dict[str, float]
) -> None:
    assert relative_speeds(speeds, capacities, low=0.02, high=4.0) == pytest.approx(expected)
