"""Keep shares and locality fills planned from the Envoys' ingress (policy/spill.py), and
how the persistent model uses them."""

from __future__ import annotations

import pytest

from xds_server.model import Load, Pool, Replica
from xds_server.policy.spill import plan_spill
from xds_server.policy.weights import Decision, Memory, PolicySettings, decide

#: node -> effective capacity: node-c is the biggest, node-a a bit under a third.
CAPACITY = {"node-a": 6.0, "node-b": 6.0, "node-c": 8.0}


def served(ingress: dict[str, float], capacity: dict[str, float]) -> dict[str, float]:
    """What each node serves under the plan: what its Envoy keeps, plus its part of the
    whole-pool cluster (everything not kept), split by capacity times fill."""
    plan = plan_spill(ingress, capacity)
    assert plan is not None
    spilled = sum(ingress.values()) - sum(ingress.get(n, 0.0) * plan.keep[n] for n in capacity)
    pull = {n: capacity[n] * plan.fill[n] for n in capacity}
    return {n: ingress.get(n, 0.0) * plan.keep[n] + spilled * pull[n] / sum(pull.values())
            for n in capacity}


@pytest.mark.parametrize("ingress", [
    {"node-a": 5.0, "node-b": 5.0, "node-c": 5.0, "": 5.0},       # even entries
    {"node-a": 10.0, "node-b": 10 / 3, "node-c": 10 / 3, "": 10 / 3},  # half at node-a
    {"node-a": 1.0, "node-b": 9.0, "node-c": 0.5, "": 0.0},       # no gateway, odd skew
    {"": 12.0},                                                   # only a gateway
])
def test_every_node_serves_its_capacitys_part_of_the_traffic(ingress: dict[str, float]) -> None:
    total = sum(ingress.values())
    by_node = served(ingress, CAPACITY)
    for node, c in CAPACITY.items():
        assert by_node[node] == pytest.approx(total * c / sum(CAPACITY.values()))


def test_a_node_keeps_all_while_its_envoy_brings_no_more_than_its_part() -> None:
    plan = plan_spill({"node-a": 5.0, "node-b": 5.0, "node-c": 5.0, "": 5.0}, CAPACITY)
    assert plan is not None
    assert plan.keep == {"node-a": 1.0, "node-b": 1.0, "node-c": 1.0}
    # The gateway's 5/s goes where the node Envoys leave room: node-c lacks 3, a and b 1.
    assert plan.fill["node-c"] * 8 / (plan.fill["node-a"] * 6) == pytest.approx(3.0)


def test_a_hot_entry_keeps_only_its_nodes_part_and_gets_none_of_the_rest() -> None:
    plan = plan_spill({"node-a": 10.0, "node-b": 10 / 3, "node-c": 10 / 3, "": 10 / 3},
                      CAPACITY)
    assert plan is not None
    assert plan.keep["node-a"] == pytest.approx(0.6)  # 20/s * 6/20 = 6 of its 10
    assert plan.fill["node-a"] == 0.0
    assert plan.keep["node-b"] == plan.keep["node-c"] == 1.0


def test_nothing_entering_or_nothing_to_serve_plans_nothing() -> None:
    assert plan_spill({}, CAPACITY) is None
    assert plan_spill({"node-a": 0.0}, CAPACITY) is None
    assert plan_spill({"node-a": 3.0}, {"node-a": 0.0}) is None


A = tuple(Replica(f"10.0.0.{i}", 8000, "node-a", capacity=2) for i in range(3))
B = tuple(Replica(f"10.0.1.{i}", 8000, "node-b", capacity=2) for i in range(3))
C = tuple(Replica(f"10.0.2.{i}", 8000, "node-c", capacity=4) for i in range(2))
POOL = Pool("p", (*A, *B, *C))
SKEWED = {"node-a": 10.0, "node-b": 10 / 3, "node-c": 10 / 3, "": 10 / 3}


def decide_once(ingress: dict[str, float] | None,
                speeds: dict[str, float] | None = None) -> Decision:
    loads = {r.address: Load(running=2, waiting=0, read_at=100.0,
                             decode_speed=(speeds or {}).get(r.address, 20.0))
             for r in POOL.replicas}
    return decide(POOL, loads, Memory(), 100.0, PolicySettings(), ingress)


def test_the_decision_spills_a_hot_entry_at_once_and_steers_the_spill_away_from_it() -> None:
    planned = decide_once(SKEWED)
    assert planned.node_keep["node-a"] == pytest.approx(0.6)
    localities = planned.weights.localities
    # node-a takes almost nothing of the whole-pool cluster; b and c what they lack.
    assert localities["node-a"] < 0.05 * localities["node-b"]
    assert localities["node-c"] / localities["node-b"] == pytest.approx(
        (20 * 8 / 20 - 10 / 3) / (20 * 6 / 20 - 10 / 3), rel=0.02)
    # Without ingress reports, the same readings keep everything: the old loop alone.
    unplanned = decide_once(None)
    assert unplanned.node_keep["node-a"] == 1.0


def test_a_slow_replica_lowers_its_nodes_part() -> None:
    entries = {"node-a": 5.5, "node-b": 5.0, "node-c": 5.0, "": 4.5}
    healthy = decide_once(entries)
    slow = decide_once(entries, speeds={A[0].address: 20.0 / 3})
    assert healthy.node_keep["node-a"] == 1.0  # its part: 20/s * 6/20 = 6
    # node-a's effective capacity is 2 + 2 + 2/3 ranks of 18 2/3: its part is 5/s.
    part = 20 * (4 + 2 / 3) / (18 + 2 / 3)
    assert slow.node_keep["node-a"] == pytest.approx(part / 5.5, rel=0.01)
    assert slow.node_keep["node-a"] < 0.95


def run(seconds: int, node_a: Load, others: Load, ingress: dict[str, float]) -> Decision:
    """The same readings (node-a's replicas at `node_a`, the rest at `others`) and ingress,
    fresh, once a second."""
    memory = Memory()
    for t in range(seconds):
        loads = {r.address: Load(running=(node_a if r.node == "node-a" else others).running,
                                 waiting=(node_a if r.node == "node-a" else others).waiting,
                                 read_at=100.0 + t, decode_speed=20.0)
                 for r in POOL.replicas}
        decision = decide(POOL, loads, memory, 100.0 + t, PolicySettings(), ingress)
        memory = decision.memory
    return decision


def test_the_planned_share_holds_while_the_node_waits_less_than_the_rest() -> None:
    """The plan steers the gateways' traffic away from a hot entry's node, so its replicas
    queue less than the rest's: that must not wind the share back up to keeping all (a
    burst would then stay on the node)."""
    decision = run(60, Load(running=2, waiting=0), Load(running=8, waiting=6), SKEWED)
    assert decision.node_keep["node-a"] == pytest.approx(0.6)


def test_the_plan_needs_no_load_readings() -> None:
    """With no metrics at all (`--metrics none`) the reports alone plan the shares."""
    decision = decide(POOL, {}, Memory(), 100.0, PolicySettings(), SKEWED)
    assert decision.node_keep["node-a"] == pytest.approx(0.6)


def test_queues_the_reports_do_not_explain_spill_below_the_plan() -> None:
    """node-a's replicas queue (traffic that reaches them past the reporting Envoys) while
    its Envoy brings no more than its part: it spills below the planned share."""
    decision = run(30, Load(running=8, waiting=8), Load(running=2, waiting=0),
                   {"node-a": 5.0, "node-b": 5.0, "node-c": 5.0, "": 5.0})
    assert decision.node_keep["node-a"] < 0.5
