"""The persistent load model: room read from vLLM, weights from lasting differences only,
keep shares that spill only a queue the rest of the pool does not have."""

from __future__ import annotations

import math

import pytest

from xds_server.model import Load, Pool, RankLoad, Replica
from xds_server.policy.load import (
    expected_wait,
    learn_slots,
    observed_slots,
    per_slot,
    pool_slots,
)
from xds_server.policy.weights import SCALE, Decision, Memory, PolicySettings, decide

A1 = Replica("10.0.0.1", 8000, "node-a", capacity=2)
A2 = Replica("10.0.0.2", 8000, "node-a", capacity=2)
B1 = Replica("10.0.0.3", 8000, "node-b", capacity=2)
B2 = Replica("10.0.0.4", 8000, "node-b", capacity=2)
POOL = Pool("p", (A1, A2, B1, B2))
#: The configured room is far from the replicas' own (4): nothing may depend on it.
#: The tilt (off by default) on: most of these tests are about it.
S = PolicySettings(deadband=0.0, balance_gain_per_s=0.1)


def load(running: float, waiting: float = 0.0, at: float = 0.0) -> Load:
    return Load(running=running, waiting=waiting, read_at=at)


def run(readings: dict[str, Load], seconds: int, memory: Memory | None = None,
        settings: PolicySettings = S, start: float = 0.0) -> Decision:
    """The same readings, fresh, once a second for `seconds` seconds."""
    memory = memory or Memory()
    decision = None
    for t in range(seconds + 1):
        now = start + t
        fresh = {a: Load(running=x.running, waiting=x.waiting, ranks=x.ranks, read_at=now)
                 for a, x in readings.items()}
        decision = decide(POOL, fresh, memory, now, settings)
        memory = decision.memory
    assert decision is not None
    return decision


EVEN = {r.address: load(4) for r in POOL.replicas}


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        (load(3, waiting=0), None),                     # room left: the room is unknown
        (load(8, waiting=2), 4.0),                      # full: 8 running over 2 ranks
        (Load(running=0, waiting=0, ranks=(RankLoad("0", 6, 1), RankLoad("1", 2, 0))), 6.0),
    ],
)
def test_room_is_what_a_rank_runs_when_requests_wait(reading: Load,
                                                     expected: float | None) -> None:
    assert observed_slots(reading, capacity=2) == expected


def test_room_is_learnt_from_the_first_full_reading_and_rises_to_what_a_rank_runs() -> None:
    assert learn_slots(None, load(3), 2) is None  # never full: unknown
    assert learn_slots(None, load(8, waiting=1), 2) == 4.0
    assert learn_slots(4.0, load(12, waiting=1), 2) == 6.0
    assert learn_slots(4.0, load(10), 2) == 5.0  # a rank runs 5: the room is at least 5
    assert learn_slots(5.0, load(1), 2) == 5.0
    ranks = Load(running=7, waiting=0, ranks=(RankLoad("0", 6, 0), RankLoad("1", 1, 0)))
    assert learn_slots(4.0, ranks, 2) == 6.0  # the busiest rank, not the mean


def test_a_first_full_reading_starts_the_room_at_no_less_than_the_pools() -> None:
    # Load ramps up: a rank's first wait (2 running, 1 waiting) lags beside 2 free slots.
    assert learn_slots(None, load(4, waiting=1), 2, pool_floor=4.0) == 4.0
    assert learn_slots(None, load(12, waiting=1), 2, pool_floor=4.0) == 6.0  # its own is more
    assert learn_slots(None, load(3), 2, pool_floor=4.0) is None  # not full: still unknown
    # Once learnt, the replica's own readings move it as before: the KV cache's limit of 3.
    room = learn_slots(None, load(6, waiting=2), 2, pool_floor=4.0)
    for _ in range(100):
        room = learn_slots(room, load(6, waiting=2), 2, pool_floor=4.0)
    assert room == pytest.approx(3.0, abs=0.05)


def test_the_policy_starts_a_replica_room_at_what_the_pools_busiest_rank_runs() -> None:
    a = Replica("10.0.0.1", 8000, "node-a", capacity=2)
    b = Replica("10.0.0.2", 8000, "node-b", capacity=2)
    pool = Pool("p", (a, b))
    lagging = Load(running=3, waiting=1, read_at=0.0,
                   ranks=(RankLoad("0", 2, 1), RankLoad("1", 1, 0)))
    busy = Load(running=6, waiting=0, read_at=0.0,
                ranks=(RankLoad("0", 4, 0), RankLoad("1", 2, 0)))
    first = decide(pool, {a.address: lagging, b.address: busy}, Memory(), 0.0,
                   PolicySettings())
    # a's own busiest rank runs 2, but b's runs 4 of the same configuration.
    assert first.memory.slots == {a.address: 4.0}
    alone = decide(pool, {a.address: lagging}, Memory(), 0.0, PolicySettings())
    assert alone.memory.slots == {a.address: 2.0}  # nothing else seen: its own floor


def test_a_room_the_server_states_holds_from_the_start_and_the_kv_cache_still_lowers_it(
) -> None:
    assert learn_slots(None, None, 2, told=8) == 8.0  # before any reading
    assert learn_slots(None, load(3), 2, told=8) == 8.0  # never full: still what it says
    room = learn_slots(None, load(12, waiting=2), 2, told=8)  # a rank runs 6 of 8, 2 wait
    assert 7.8 < room < 8.0  # once could be an admission lagging: barely moves
    for _ in range(100):
        room = learn_slots(room, load(12, waiting=2), 2, told=8)
    assert room == pytest.approx(6.0, abs=0.05)


def test_the_policy_reads_a_replica_against_the_room_its_server_states() -> None:
    told = Replica("10.0.0.1", 8000, "node-a", capacity=2, max_num_seqs=8)
    other = Replica("10.0.0.2", 8000, "node-b", capacity=2)
    pool = Pool("p", (told, other))
    readings = {told.address: load(8), other.address: load(8)}  # 4 a rank, nobody waits
    decision = decide(pool, readings, Memory(), 0.0, PolicySettings())
    assert decision.memory.slots == {told.address: 8.0}
    assert decision.explain[told.address].slots == 8.0
    # The other replica's server says nothing: the pool's room stands in for it.
    assert decision.explain[other.address].slots == 8.0
    assert decision.explain[told.address].utilization == pytest.approx(0.5)


def test_a_reading_that_stays_the_latest_for_several_decisions_counts_once() -> None:
    pool = Pool("p", (A1,))
    settings = PolicySettings(stale_after_s=10)

    def room(readings: list[Load]) -> float:
        memory = Memory()
        for t, reading in enumerate(readings):
            memory = decide(pool, {A1.address: reading}, memory, float(t), settings).memory
        return memory.slots[A1.address]

    full, lagging = load(8, waiting=1, at=0.0), load(6, waiting=1, at=1.0)  # 4, then 3 a rank
    # A Prometheus scrape every 5 s: the policy decides five times on each reading.
    assert room([full, *[lagging] * 5]) == room([full, lagging])
    assert room([full, *[lagging] * 5]) > room([full, lagging, load(6, waiting=1, at=2.0)])


def test_a_lagging_admission_barely_moves_the_room_and_a_lasting_limit_does() -> None:
    # A request that arrived during a step waits beside free slots: one rank runs 1, 1 waits.
    lag = Load(running=5, waiting=1, ranks=(RankLoad("0", 1, 1), RankLoad("1", 4, 0)))
    assert learn_slots(4.0, lag, 2) == 4.0  # the other rank runs 4: still the floor
    alone = load(2, waiting=1)
    assert 3.8 < learn_slots(4.0, alone, 2) < 4.0  # one reading
    room = 4.0
    for _ in range(100):  # the KV cache holds every rank at 3 while requests wait
        room = learn_slots(room, load(6, waiting=2), 2)
    assert room == pytest.approx(3.0, abs=0.05)


def test_replicas_never_seen_full_take_the_pools_room_else_the_configured_hint() -> None:
    assert pool_slots({"a": 4.0, "b": None}, ["a", "b"], 256) == {"a": 4.0, "b": 4.0}
    assert pool_slots({}, ["a"], 256) == {"a": 256.0}


@pytest.mark.parametrize(
    ("running", "waiting", "expected"),
    [(0, 0, 0.0), (4, 0, 0.5), (8, 0, 1.0), (8, 8, 2.0)],
)
def test_load_per_slot_passes_one_when_requests_queue(running: float, waiting: float,
                                                      expected: float) -> None:
    assert per_slot(running, waiting, capacity=2, slots=4) == expected


@pytest.mark.parametrize(("running", "waiting", "ahead"),
                         [(0, 0, 0), (7, 0, 0), (8, 0, 1), (6, 3, 2), (8, 8, 9)])
def test_a_new_request_waits_behind_the_requests_without_a_slot(
        running: float, waiting: float, ahead: int) -> None:
    """Counting itself: with every slot busy it waits a slot's turn, not nothing."""
    tie_break = 0.01 * per_slot(running, waiting, capacity=2, slots=4)
    assert expected_wait(running, waiting, capacity=2, slots=4) - tie_break == pytest.approx(
        ahead / 8)


def test_evenly_loaded_replicas_keep_their_capacity_weights() -> None:
    d = run(EVEN, 20)
    assert set(d.weights.endpoints.values()) == {2 * SCALE}


def test_a_persistently_fuller_replica_loses_weight_but_one_reading_moves_it_little() -> None:
    settled = run(EVEN, 20)
    once = run({**EVEN, A1.address: load(8, waiting=2)}, 0, settled.memory, start=21)
    lasting = run({**EVEN, A1.address: load(8, waiting=8)}, 20, settled.memory, start=21)
    assert once.weights.endpoints[A1.address] >= 0.8 * 2 * SCALE
    assert lasting.weights.endpoints[A1.address] < 0.6 * 2 * SCALE
    assert lasting.weights.endpoints[B1.address] == 2 * SCALE


def test_the_weight_returns_to_capacity_once_the_difference_is_gone() -> None:
    lowered = run({**EVEN, A1.address: load(8, waiting=8)}, 20)
    recovered = run(EVEN, 300, lowered.memory, start=21)
    assert recovered.weights.endpoints[A1.address] >= 0.9 * 2 * SCALE


def test_stale_readings_lower_no_weight_and_let_it_drift_back_to_capacity() -> None:
    lowered = run({**EVEN, A1.address: load(8, waiting=8)}, 20)
    # Read at t=0, used at t=21 and later: past twice stale_after_s, so doubted entirely.
    stale = {**{a: load(4, at=0.0) for a in EVEN}, B1.address: load(8, waiting=80, at=0.0)}
    next_second = decide(POOL, stale, lowered.memory, 21.0, S)
    assert next_second.weights.endpoints[B1.address] == 2 * SCALE
    assert (next_second.weights.endpoints[A1.address]
            >= lowered.weights.endpoints[A1.address])
    much_later = decide(POOL, stale, next_second.memory, 300.0, S)
    assert much_later.weights.endpoints[A1.address] == 2 * SCALE


def test_saturation_is_read_from_vllm_not_the_configured_room() -> None:
    # Configured 256 per rank, the replicas run 4: node-a's queue still shows.
    d = run({A1.address: load(8, waiting=8), A2.address: load(8, waiting=8),
             B1.address: load(2), B2.address: load(2)}, 1)
    assert d.node_utilization["node-a"] == pytest.approx(2.0)
    assert d.node_utilization["node-b"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("node_a", "node_b", "keeps_all"),
    [
        (load(4), load(4), True),                        # room everywhere
        (load(8, waiting=4), load(8, waiting=4), True),  # all queued alike: no better elsewhere
        (load(8, waiting=8), load(2), False),            # node-a queues, node-b has room
    ],
)
def test_a_node_keeps_its_requests_unless_it_queues_more_than_the_pool(
    node_a: Load, node_b: Load, keeps_all: bool
) -> None:
    readings = {A1.address: node_a, A2.address: node_a, B1.address: node_b,
                B2.address: node_b}
    keep = run(readings, 10).node_keep
    assert (keep["node-a"] == 1.0) is keeps_all
    assert keep["node-b"] == 1.0


def test_a_spilling_node_climbs_back_once_it_has_room() -> None:
    queued = run({**EVEN, A1.address: load(8, waiting=8), A2.address: load(8, waiting=8)}, 15)
    assert queued.node_keep["node-a"] < 0.5
    back = run(EVEN, 60, queued.memory, start=16)
    assert back.node_keep["node-a"] == 1.0


def test_weights_are_bounded_by_the_minimum_share() -> None:
    d = run({**EVEN, A1.address: load(8, waiting=80)}, 300)
    assert d.weights.endpoints[A1.address] >= math.floor(S.min_share * 2 * SCALE)


BIG = Pool("p", (A1, A2, B1, B2, *(Replica(f"10.0.1.{i}", 8000, "node-c", capacity=2)
                                     for i in range(8))))


def node_keep_at(node_a: float, others: float, seconds: int = 30) -> float:
    """node-a's kept share with its replicas at `node_a` running per rank, the rest at
    `others`, in a pool whose room (4 per rank) was read from one full reading."""
    memory = decide(BIG, {A1.address: load(8, waiting=1, at=0.0)}, Memory(), 0.0, S).memory
    for t in range(1, seconds + 1):
        readings = {r.address: load((node_a if r.node == "node-a" else others) * 2,
                                    at=float(t)) for r in BIG.replicas}
        decision = decide(BIG, readings, memory, float(t), S)
        memory = decision.memory
    return decision.node_keep["node-a"]


@pytest.mark.parametrize(
    ("node_a", "others", "keeps_all"),
    [
        (2.0, 1.6, True),    # half full, a bit above the pool: its queue costs no hop's worth
        (2.4, 2.4, True),    # 60% everywhere: still nothing worth a hop
        (3.6, 3.0, False),   # 90% against 75%: a small node's queue costs more than a hop
        (3.8, 3.8, True),    # 95% everywhere: its replicas wait no longer than the others'
        (3.8, 2.8, False),   # 95% against 70%: its replicas' queues cost more than a hop
    ],
)
def test_a_node_spills_only_when_its_own_queue_would_cost_more_than_the_pools(
    node_a: float, others: float, keeps_all: bool
) -> None:
    assert (node_keep_at(node_a, others) == 1.0) is keeps_all


def test_a_node_full_of_its_own_traffic_weighs_less_as_a_locality_not_per_replica() -> None:
    busy_a = {A1.address: load(8, waiting=4), A2.address: load(8, waiting=4),
              B1.address: load(2), B2.address: load(2)}
    d = run(busy_a, 120)
    # Its replicas are equally full: no reason to tilt between them.
    assert d.weights.endpoints[A1.address] == d.weights.endpoints[A2.address] == 2 * SCALE
    # As a locality (the central Envoy's and the spilled requests' choice) it weighs less.
    assert d.weights.localities["node-a"] < 0.7 * d.weights.localities["node-b"]


def test_a_lasting_difference_in_wait_keeps_moving_the_locality_weight() -> None:
    # node-a's own traffic keeps its replicas queued while node-b's have room: the whole-pool
    # cluster must send node-b ever more of the rest until the waits match, not settle at a
    # fixed proportion of the loads.
    busier_a = {A1.address: load(8, waiting=1), A2.address: load(8, waiting=1),
                B1.address: load(6), B2.address: load(6)}

    def ratio(d: Decision) -> float:
        return d.weights.localities["node-a"] / d.weights.localities["node-b"]

    early, late = run(busier_a, 30), run(busier_a, 90)
    assert ratio(late) < 0.9 * ratio(early) < 0.9


def test_a_node_that_is_gone_is_forgotten_by_the_locality_weights() -> None:
    busier_a = {A1.address: load(8, waiting=1), A2.address: load(8, waiting=1),
                B1.address: load(6), B2.address: load(6)}
    steered = run(busier_a, 30)
    assert steered.memory.locality["node-b"] == 0.0 > steered.memory.locality["node-a"]
    only_a = Pool("p", (A1, A2))
    later = decide(only_a, {a: load(8, waiting=1, at=31.0) for a in (A1.address, A2.address)},
                   steered.memory, 31.0, S)
    # node-b no longer pins the top: node-a, alone, is back at its capacity's share.
    assert set(later.memory.locality) == {"node-a"}
    assert later.memory.locality["node-a"] == 0.0


def test_the_room_each_load_is_read_against_is_shown() -> None:
    hint = PolicySettings(max_num_seqs=16)
    # Never seen full: only the hint stands in, which is no room learnt (the picker keeps its
    # own reckoning then).
    assert {e.slots for e in run(EVEN, 1, settings=hint).explain.values()} == {None}
    seen = run({**EVEN, A1.address: load(6, waiting=1)}, 1, settings=hint).explain
    # A1 was full at 3 per rank; the others, never seen full, take the pool's median.
    assert [seen[r.address].slots for r in POOL.replicas] == [3.0, 3.0, 3.0, 3.0]
