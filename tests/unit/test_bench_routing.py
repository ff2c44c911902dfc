"""The routing benchmark's pure logic: the oracle's pick, imbalance, on-node share, noise.

No benchmark figure is asserted here (BENCH.md): only the arithmetic the figures come from.
"""

from __future__ import annotations

import argparse
import math
import random

import pytest

from xds_server.bench import cli
from xds_server.bench.oracle import RankQueue, choose, expected_wait, ranks_from_state
from xds_server.bench.routing import (
    CASE_POINTS,
    CASE_POLICIES,
    Point,
    make_plan,
    point_fault,
    policies,
)
from xds_server.bench.routing_report import summarize
from xds_server.bench.routing_stats import (
    cross_node,
    cv,
    full_rank_share,
    is_noise,
    latency,
    mean_cv,
    node_depth_ratio,
    on_node_share,
    per_rank_depths,
    picked_share,
    ratios,
)
from xds_server.commands import serve
from xds_server.sim.faults import Faults
from xds_server.workload import Arrival, Result


def rank(address: str, r: int, running: int, waiting: int = 0, seqs: int = 4,
         slowdown: float = 1.0) -> RankQueue:
    return RankQueue(address=address, rank=r, running=running, waiting=waiting,
                     max_num_seqs=seqs, slowdown=slowdown)


def test_oracle_picks_the_rank_with_the_shortest_queue() -> None:
    queues = [rank("a", 0, 4, 2), rank("a", 1, 1), rank("b", 0, 3)]
    assert choose(queues, {}, random.Random(0)) == queues[1]


def test_oracle_counts_its_own_picks_not_yet_visible() -> None:
    queues = [rank("a", 0, 1), rank("b", 0, 2)]
    assert choose(queues, {("a", 0): 2}, random.Random(0)) == queues[1]


def test_oracle_avoids_a_slow_rank_with_the_same_queue() -> None:
    queues = [rank("slow", 0, 1, slowdown=3.0), rank("fast", 0, 1)]
    assert choose(queues, {}, random.Random(0)).address == "fast"


def test_oracle_spreads_ties_instead_of_herding_on_one_rank() -> None:
    queues = [rank(a, 0, 0) for a in "abcd"]
    rng = random.Random(1)
    assert len({choose(queues, {}, rng).address for _ in range(200)}) == 4


def test_oracle_weighs_a_queue_by_the_slots_that_serve_it() -> None:
    assert expected_wait(rank("a", 0, 8, 4, seqs=8)) < expected_wait(rank("b", 0, 4, 4, seqs=4))


def test_oracle_needs_ranks() -> None:
    with pytest.raises(ValueError):
        choose([], {}, random.Random(0))


def test_ranks_from_state_reads_local_ranks_and_the_slowdown() -> None:
    state = {"faults": {"slowdown": 3.0}, "ranks": [
        {"rank": 0, "engine": 4, "running": 2, "waiting": 1, "max_num_seqs": 4},
        {"rank": 1, "engine": 5, "running": 0, "waiting": 0, "max_num_seqs": 4}]}
    queues = ranks_from_state("10.0.0.1:8000", state)
    assert [(q.rank, q.running, q.waiting, q.slowdown) for q in queues] == [
        (0, 2, 1, 3.0), (1, 0, 0, 3.0)]


def test_ranks_from_state_reads_a_single_slow_ranks_own_slowdown() -> None:
    state = {"faults": {"slowdown": 3.0, "slow_rank": 1}, "ranks": [
        {"rank": 0, "engine": 4, "running": 0, "waiting": 0, "max_num_seqs": 4,
         "slowdown": 1.0},
        {"rank": 1, "engine": 5, "running": 0, "waiting": 0, "max_num_seqs": 4,
         "slowdown": 3.0}]}
    assert [q.slowdown for q in ranks_from_state("10.0.0.1:8000", state)] == [1.0, 3.0]


def test_cv_of_equal_queues_is_zero_and_of_an_idle_fleet_is_unknown() -> None:
    assert cv([2.0, 2.0, 2.0]) == 0.0
    assert cv([0.0, 0.0]) is None
    assert cv([]) is None
    assert cv([0.0, 2.0]) == pytest.approx(1.0)


def test_queue_depth_is_per_rank_so_a_bigger_replica_is_not_called_busier() -> None:
    states = {
        "a": {"ranks": [{"running": 2, "waiting": 0}, {"running": 1, "waiting": 1}]},
        "c": {"ranks": [{"running": 2, "waiting": 0}] * 4},
    }
    assert per_rank_depths(states) == {"a": 2.0, "c": 2.0}


def test_mean_cv_leaves_idle_samples_out() -> None:
    samples = [{"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 2.0}]
    assert mean_cv(samples) == pytest.approx(0.25)
    assert math.isnan(mean_cv([{"a": 0.0}]))


def result(entry: str, replica: str, *, status: int = 200, ttft: float = 0.1,
           e2e: float = 1.0, error: str = "", output: int = 10) -> Result:
    arrival = Arrival(index=0, at_s=0.0, entry=entry, prompt_tokens=10, output_tokens=output)
    return Result(arrival=arrival, sent_s=0.0, status=status, ttft_s=ttft, e2e_s=e2e,
                  replica=replica, error=error)


def test_on_node_share_counts_node_envoys_only() -> None:
    entry_nodes = {"node-a": "node-a", "node-b": "node-b", "central": ""}
    replica_nodes = {"r1": "node-a", "r2": "node-b"}
    results = [result("node-a", "r1"), result("node-a", "r2"), result("node-b", "r2"),
               result("central", "r1"), result("node-b", "", status=503)]
    assert on_node_share(results, entry_nodes, replica_nodes) == pytest.approx(2 / 3)
    assert math.isnan(on_node_share([result("central", "r1")], entry_nodes, replica_nodes))


def test_cross_node_counts_requests_and_bytes_served_off_their_entry_node() -> None:
    origins = {"node-a": "node-a", "central": "central"}
    replica_nodes = {"r1": "node-a", "r2": "node-b"}
    results = [result("node-a", "r1"), result("node-a", "r2"), result("central", "r1"),
               result("node-a", "", status=503)]
    for r, size in zip(results, (100, 200, 400, 800), strict=True):
        r.bytes = size
    assert cross_node(results, origins, replica_nodes) == {
        "cross_node_requests": 2, "cross_node_bytes": 600}


def test_hot_node_depth_ratio_is_its_requests_per_rank_over_the_rest_averaged_in_time() -> None:
    nodes = {"a1": "node-a", "a2": "node-a", "b1": "node-b", "c1": "node-c"}
    samples = [{"a1": 3.0, "a2": 1.0, "b1": 1.0, "c1": 1.0},  # node-a 2 a rank, others 1
               {"a1": 0.0, "a2": 0.0, "b1": 0.0, "c1": 2.0},  # node-a idle, others 1
               {"a1": 4.0, "b1": 0.0}]                         # a replica not read: left out
    assert node_depth_ratio(samples, nodes, "node-a") == pytest.approx((2 + 0 + 4) / (1 + 1 + 0))
    assert math.isnan(node_depth_ratio([{"a1": 1.0, "b1": 0.0}], nodes, "node-a"))
    assert math.isnan(node_depth_ratio([{"a1": 1.0}], nodes, "node-a"))  # no other node read


def sent(replica: str, rank: int, at: float, e2e: float, status: int = 200) -> Result:
    r = result("node-a", replica, e2e=e2e, status=status)
    r.sent_s, r.rank = at, rank
    return r


def test_full_rank_share_counts_requests_that_found_every_slot_of_their_rank_busy() -> None:
    # Rank r1#0 with room 2: the third request arrives while both earlier ones run, the
    # fourth after one of them ended. The same times on another rank or replica do not add.
    results = [sent("r1", 0, 0.0, 5.0), sent("r1", 0, 1.0, 1.5), sent("r1", 0, 2.0, 1.0),
               sent("r1", 0, 3.0, 1.0), sent("r1", 1, 2.0, 1.0), sent("r2", 0, 2.0, 1.0)]
    assert full_rank_share(results, room=2) == pytest.approx(1 / 6)
    assert full_rank_share(results, room=1) == pytest.approx(3 / 6)
    # A failed request is neither counted nor occupies a slot; no served rank: NaN.
    assert full_rank_share([*results, sent("r1", 0, 2.5, 9.0, status=503)],
                           room=2) == pytest.approx(1 / 6)
    assert math.isnan(full_rank_share([result("node-a", "r1")], room=2))


def test_picked_share_is_of_served_requests_the_picker_chose() -> None:
    results = [result("node-a", "r1"), result("node-a", "r2"), result("central", "r1"),
               result("node-a", "", status=503)]
    results[0].picked = results[3].picked = True  # a failed pick has no replica: left out
    assert picked_share(results) == pytest.approx(1 / 3)
    assert math.isnan(picked_share(results[3:]))


def test_latency_counts_failures_and_throughput_over_the_window() -> None:
    results = [result("a", "r", ttft=t, e2e=2 * t) for t in (0.1, 0.2, 0.3)]
    results.append(result("a", "r", status=500, error="boom"))
    doc = latency(results, window_s=2.0)
    assert (doc["ok"], doc["failed"]) == (3, 1)
    assert doc["ttft_p50_s"] == pytest.approx(0.2)
    assert doc["e2e_p50_s"] == pytest.approx(0.4)
    assert doc["throughput_rps"] == pytest.approx(1.5)


@pytest.mark.parametrize(("per_repeat", "noise"), [
    ([2.0, 2.1, 1.9], False),   # a clear 2x, tight repeats
    ([1.05, 0.8, 1.3], True),   # repeats disagree on the direction
    ([1.2, 1.0, 1.6], True),    # spread 0.6 wider than the 0.2 effect
    ([2.0], True),              # one repeat cannot show its own noise
    ([], True),
])
def test_a_ratio_is_noise_when_repeats_disagree_by_more_than_the_effect(
        per_repeat: list[float], noise: bool) -> None:
    assert is_noise(per_repeat) is noise


def test_ratios_pair_each_repeat_with_the_same_repeats_baseline() -> None:
    assert ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert math.isnan(ratios([1.0], [0.0])[0])


def test_summary_gives_ratios_to_the_oracle_per_repeat() -> None:
    def run(policy: str, repeat: int, p99: float) -> dict[str, float | str | int]:
        doc: dict[str, float | str | int] = {
            m: 1.0 for m in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "e2e_p90_s",
                             "e2e_p99_s", "throughput_rps", "output_tokens_per_s",
                             "imbalance_cv", "on_node_share", "client_cpu_s")}
        doc.update(policy=policy, point="85%", repeat=repeat, ttft_p99_s=p99, failed=0)
        return doc

    runs = [run("oracle", k, 1.0) for k in range(3)] + [
        run("round-robin", 0, 3.0), run("round-robin", 1, 2.9), run("round-robin", 2, 3.1)]
    ratio = summarize(runs)["85%"]["round-robin"]["ratio_to_oracle"]["ttft_p99_s"]
    assert ratio["median"] == pytest.approx(3.0)
    assert ratio["noise"] is False


def routing_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["routing", *argv])


def test_ranks_case_runs_85_percent_and_a_slow_rank() -> None:
    plan = make_plan(routing_args("--case", "ranks", "--point-s", "10", "--repeats", "3"))
    assert plan.points == (Point("85%", 0.85), Point("slow-rank", 0.85, "slow-rank"))
    assert (plan.duration_s, plan.repeats) == (10.0, 3)
    only = make_plan(routing_args("--case", "ranks", "--points", "slow-rank"))
    assert [p.name for p in only.points] == ["slow-rank"]
    with pytest.raises(SystemExit, match="no point slow-replica"):
        make_plan(routing_args("--case", "ranks", "--points", "slow-replica"))


def test_a_slow_rank_point_slows_one_rank_of_the_slow_replica_only() -> None:
    plan = make_plan(routing_args("--case", "ranks"))
    slow_rank, at_85 = CASE_POINTS["ranks"][1], CASE_POINTS["ranks"][0]
    faults = Faults().updated(point_fault(plan, slow_rank))
    assert [faults.slowdown_of(r) for r in range(2)] == [1.0, plan.slow_replica_slowdown]
    assert point_fault(plan, at_85) == {}
    # The slow-replica point still slows every rank.
    hetero = Faults().updated(point_fault(plan, Point("slow-replica", 0.85, "hetero")))
    assert [hetero.slowdown_of(r) for r in range(2)] == [plan.slow_replica_slowdown] * 2


@pytest.mark.parametrize(("policy", "pinned"), [("picker-rank", True),
                                                ("picker-no-rank", False)])
def test_ranks_case_runs_the_picker_with_and_without_the_rank_choice(
        policy: str, pinned: bool) -> None:
    known = policies(True, 4)
    assert set(CASE_POLICIES["ranks"]) <= set(known)
    assert {"picker-rank", "picker-no-rank", "oracle"} <= set(CASE_POLICIES["ranks"])
    flags = known[policy].flags
    assert flags is not None
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    argv = ["--static", "pools.yaml",
            *("9002" if f == "EXTPROC_PORT" else f for f in flags)]
    settings = serve.settings_from_args(parser.parse_args(argv))
    assert settings.extproc.port == 9002
    assert settings.extproc.pick.pin_rank is pinned
