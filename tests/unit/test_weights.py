"""The weight policy: free capacity → weights, damping, staleness, lifecycle."""

from __future__ import annotations

import pytest

from xds_server.model import Load, Pool, RankLoad, Replica, ReplicaState
from xds_server.policy.weights import (
    SCALE,
    UNDAMPED,
    Memory,
    PolicySettings,
    capacity_weights,
    decide,
)

A = Replica("10.0.0.1", 8000, "node-a")
B = Replica("10.0.0.2", 8000, "node-a")
C = Replica("10.0.0.3", 8000, "node-b", capacity=2)
POOL = Pool("p", (A, B, C))
S = PolicySettings(max_num_seqs=10, model="queue")
NOW = 1000.0


def load(running: float, waiting: float = 0.0, age: float = 0.0) -> Load:
    return Load(running=running, waiting=waiting, read_at=NOW - age)


def weights(loads: dict[str, Load], settings: PolicySettings = UNDAMPED,
            pool: Pool = POOL) -> dict[str, int]:
    s = PolicySettings(**{**settings.__dict__, "max_num_seqs": 10})
    return decide(pool, loads, Memory(), NOW, s).weights.endpoints


def test_idle_replicas_weigh_their_capacity() -> None:
    w = weights({A.address: load(0), B.address: load(0), C.address: load(0)})
    assert w == {A.address: SCALE, B.address: SCALE, C.address: 2 * SCALE}


def test_weight_follows_free_room() -> None:
    w = weights({A.address: load(5), B.address: load(0), C.address: load(10)})
    assert w[A.address] == SCALE // 2
    assert w[B.address] == SCALE
    assert w[C.address] == SCALE  # half of two ranks' room is free


def test_waiting_requests_count_more_than_running_ones() -> None:
    w = weights({A.address: load(2, waiting=1), B.address: load(3), C.address: load(0)})
    assert w[A.address] < w[B.address]  # 2 + 4*1 = 6 used vs 3


def test_saturated_replica_keeps_a_small_weight() -> None:
    w = weights({A.address: load(10, waiting=50), B.address: load(0), C.address: load(0)})
    assert 1 <= w[A.address] <= 0.05 * SCALE


def test_draining_replica_gets_no_new_requests() -> None:
    draining = Replica("10.0.0.1", 8000, "node-a", state=ReplicaState.DRAINING)
    pool = Pool("p", (draining, B))
    d = decide(pool, {}, Memory(), NOW, S)
    assert d.weights.endpoints[draining.address] == 0
    assert d.weights.localities == {"node-a": SCALE}


def test_node_weights_sum_their_ready_replicas() -> None:
    d = decide(POOL, {A.address: load(5)}, Memory(), NOW, UNDAMPED)
    assert d.weights.localities["node-a"] == sum(
        d.weights.endpoints[r.address] for r in (A, B))
    assert d.weights.localities["node-b"] == d.weights.endpoints[C.address]


def test_no_load_at_all_means_capacity_weights() -> None:
    assert weights({}) == capacity_weights(POOL).endpoints


def test_stale_load_moves_towards_the_pool_mean_not_to_zero_or_idle() -> None:
    fresh = {B.address: load(5), C.address: load(10)}  # pool mean utilization 0.5
    busy_fresh = weights({**fresh, A.address: load(10)})[A.address]
    busy_half_stale = weights({**fresh, A.address: load(10, age=7.5)})[A.address]
    busy_stale = weights({**fresh, A.address: load(10, age=60)})[A.address]
    assert busy_fresh < busy_half_stale < busy_stale
    assert busy_stale == SCALE // 2  # the pool's mean utilization stands in


def test_smoothing_and_step_bound_limit_a_sudden_drop() -> None:
    s = PolicySettings(max_num_seqs=10, smoothing_s=2.0, max_step_per_s=0.25, model="queue")
    idle = {A.address: load(0), B.address: load(0), C.address: load(0)}
    first = decide(POOL, idle, Memory(), NOW, s)
    busy = {**idle, A.address: Load(running=10, waiting=0, read_at=NOW + 1)}
    second = decide(POOL, busy, first.memory, NOW + 1, s)
    drop = first.weights.endpoints[A.address] - second.weights.endpoints[A.address]
    assert 0 < drop <= 0.25 * SCALE
    # Held long enough, it reaches the target.
    memory, t = second.memory, NOW + 1
    for _ in range(30):
        t += 1
        busy = {**idle, A.address: Load(running=10, waiting=0, read_at=t)}
        d = decide(POOL, busy, memory, t, s)
        memory = d.memory
    assert d.weights.endpoints[A.address] <= (s.min_share + s.deadband) * SCALE


def test_changes_inside_the_deadband_are_not_published() -> None:
    s = PolicySettings(max_num_seqs=100, smoothing_s=0, max_step_per_s=0, deadband=0.05,
                       model="queue")
    first = decide(POOL, {A.address: load(10)}, Memory(), NOW, s)
    nudge = decide(POOL, {A.address: Load(13, 0, read_at=NOW + 1)}, first.memory, NOW + 1, s)
    assert nudge.weights.endpoints == first.weights.endpoints
    move = decide(POOL, {A.address: Load(20, 0, read_at=NOW + 2)}, nudge.memory, NOW + 2, s)
    assert move.weights.endpoints[A.address] == 80


def test_explanations_carry_the_inputs() -> None:
    d = decide(POOL, {A.address: load(5, age=6)}, Memory(), NOW, UNDAMPED)
    e = d.explain[A.address]
    assert e.freshness == pytest.approx(0.8)
    assert 0 < e.utilization < 1


@pytest.mark.parametrize("bad", [{"max_num_seqs": 0}, {"min_share": 0}, {"stale_after_s": 0},
                                 {"quantum": 0}, {"deadband": -1}])
def test_bad_settings_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PolicySettings(**bad)  # type: ignore[arg-type]


def test_a_lasting_change_inside_the_deadband_is_published_once_settled() -> None:
    s = PolicySettings(max_num_seqs=100, smoothing_s=0, max_step_per_s=0, deadband=0.05,
                       model="queue")
    first = decide(POOL, {A.address: load(10)}, Memory(), NOW, s)
    memory = first.memory
    for t in (1, 2):
        d = decide(POOL, {A.address: Load(13, 0, read_at=NOW + t)}, memory, NOW + t, s)
        memory = d.memory
    assert d.weights.endpoints[A.address] == 87


def test_per_rank_readings_count_each_rank_free_room() -> None:
    # One rank drowning in a queue, its sibling idle: half the replica's room is free, not none.
    hybrid = Replica("10.0.0.9", 8000, "node-c", capacity=2)
    reading = Load(running=10, waiting=20, read_at=NOW,
                   ranks=(RankLoad("4", 10, 20), RankLoad("5", 0, 0)))
    pool = Pool("p", (hybrid,))
    assert weights({hybrid.address: reading}, pool=pool) == {hybrid.address: SCALE}
    whole = Load(running=10, waiting=20, read_at=NOW)
    assert weights({hybrid.address: whole}, pool=pool)[hybrid.address] < 10
