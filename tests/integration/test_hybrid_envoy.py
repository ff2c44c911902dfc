"""Hybrid routing across an Envoy fleet: one Envoy per node plus a central one, real Envoys,
simulated vLLM replicas on three nodes (node-c has twice the ranks of the others)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import (
    ControlPlane,
    Envoy,
    Sim,
    Traffic,
    free_ports,
    running,
    served_by,
    wait_for,
)

pytestmark = pytest.mark.envoy
MODEL = "Qwen/Qwen3-0.6B"


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sim = Sim(workdir, replicas=4, ranks=2, extra=["--max-num-seqs", "4"])
        self.pools = workdir / "pools.yaml"
        self.cp = ControlPlane(
            workdir, self.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2", "--max-num-seqs", "4",
                   "--smoothing-s", "0.5", "--max-step-per-s", "2", "--room-threshold", "0.5",
                   "--load-model", "queue"],
        )
        self.envoys = {
            node: Envoy(workdir, xds_port=self.cp.xds_port, node=node, name=f"envoy-{node}")
            for node in ("node-a", "node-b", "node-c", "")
        }

    def layout(self, replicas: dict[str, str] | None = None) -> None:
        """node-a: replica 0, node-b: replica 1, node-c: replicas 2 and 3 (two ranks each)."""
        a = self.sim.addresses
        placement = replicas or {a[0]: "node-a", a[1]: "node-b", a[2]: "node-c", a[3]: "node-c"}
        doc = {"pools": [{"name": "qwen3", "replicas": [
            {"address": address, "node": node, "capacity": 2}
            for address, node in placement.items()]}]}
        tmp = self.pools.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.pools)

    def node_of(self, address: str) -> str:
        a = self.sim.addresses
        return {a[0]: "node-a", a[1]: "node-b", a[2]: "node-c", a[3]: "node-c"}[address]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("hybrid"))
    with running(f.sim):
        f.layout()
        with running(f.cp, *f.envoys.values()):
            yield f


@pytest.fixture
def calm(fleet: Fleet) -> Fleet:
    """Every replica idle and every view keeping all of its node's traffic."""
    fleet.layout()
    for address in fleet.sim.addresses:
        fleet.sim.fault(address, slowdown=1.0)

    def settled() -> bool:
        envoys = fleet.cp.state()["envoys"]
        return len(envoys) == 4 and all(
            e["keep_per_mille"]["qwen3"] == (1000 if e["node"] else 0) for e in envoys)

    wait_for(settled, 30, "idle views")
    return fleet


def test_each_node_envoy_keeps_its_traffic_local_at_low_load(calm: Fleet) -> None:
    for node, envoy in calm.envoys.items():
        if not node:
            continue
        # It holds its own node's local cluster and no other node's.
        assert set(envoy.endpoint_weights(f"qwen3/node/{node}")) == {
            a for a in calm.sim.addresses if calm.node_of(a) == node}
        assert not any(envoy.endpoint_weights(f"qwen3/node/{other}")
                       for other in ("node-a", "node-b", "node-c") if other != node)
        counts = served_by(envoy.url, 100)
        local = sum(n for address, n in counts.items() if calm.node_of(address) == node)
        assert local / 100 > 0.9, (node, counts)


def test_central_envoy_splits_nodes_by_free_capacity(calm: Fleet) -> None:
    counts = served_by(calm.envoys[""].url, 600)
    by_node = Counter()
    for address, n in counts.items():
        by_node[calm.node_of(address)] += n
    # node-c fronts four ranks, node-a and node-b two each.
    assert 1.5 < by_node["node-c"] / by_node["node-a"] < 2.7, by_node
    assert 1.5 < by_node["node-c"] / by_node["node-b"] < 2.7, by_node


def test_node_pin_header_and_rank_header(calm: Fleet) -> None:
    a = calm.sim.addresses
    for envoy in calm.envoys.values():
        assert set(served_by(envoy.url, 20, {"x-hybridlb-node": "node-b"})) == {a[1]}
    r = httpx.get(calm.envoys["node-a"].url + "/v1/models", headers={"x-hybridlb-node": "nope"})
    assert r.status_code == 503
    assert "node nope has no ready replica" in r.text
    # vLLM's own rank header reaches the replica untouched: local rank 1 is engine 2i+1.
    for _ in range(10):
        r = httpx.post(calm.envoys[""].url + "/v1/completions",
                       headers={"X-data-parallel-rank": "1"},
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        assert int(r.headers["x-hybridlb-rank"]) % 2 == 1


def _flood(url: str, stop: threading.Event, results: Counter[str], failures: list[str]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                r = client.post(url + "/v1/completions",
                                json={"model": MODEL, "prompt": "hello " * 20, "max_tokens": 40})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if r.status_code == 200:
                results[r.headers["x-hybridlb-replica"]] += 1
            else:
                failures.append(f"{r.status_code} {r.text[:80]}")


def test_saturated_node_spills_over_then_returns_local(calm: Fleet) -> None:
    a = calm.sim.addresses
    calm.sim.fault(a[0], slowdown=4.0)  # node-a's only replica becomes slow: its queue grows
    url = calm.envoys["node-a"].url
    stop, results, failures = threading.Event(), Counter[str](), []
    workers = [threading.Thread(target=_flood, args=(url, stop, results, failures))
               for _ in range(24)]
    for w in workers:
        w.start()
    try:
        def spilling() -> bool:
            envoy = next(e for e in calm.cp.state()["envoys"] if e["node"] == "node-a")
            return bool(envoy["keep_per_mille"]["qwen3"] < 1000)

        wait_for(spilling, 20, "node-a's view to spill")
        results.clear()

        def spilled_a_third() -> bool:
            # Counted from when the view first spills; the share grows as the keep share
            # falls and Envoy applies it (which a busy machine may take seconds to do).
            total = sum(results.values())
            return total >= 40 and (total - results[a[0]]) / total > 0.3

        wait_for(spilled_a_third, 30, "a third of node-a's traffic elsewhere")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == []
    calm.sim.fault(a[0], slowdown=1.0)

    def local_again() -> bool:
        counts = served_by(url, 40)
        return counts[a[0]] / 40 > 0.9

    wait_for(local_again, 30, "traffic back on node-a")


def test_node_that_loses_its_replicas_routes_elsewhere_without_failures(calm: Fleet) -> None:
    a = calm.sim.addresses
    with Traffic(calm.envoys["node-a"].url) as traffic:
        wait_for(lambda: traffic.served[a[0]] > 20, 10, "local traffic")
        calm.layout({a[1]: "node-b", a[2]: "node-c", a[3]: "node-c"})
        # Count from when node-a's Envoy has dropped the replica and what it already sent
        # there has finished: from then on, no request may reach it.
        wait_for(lambda: a[0] not in calm.envoys["node-a"].endpoint_weights("qwen3"), 20,
                 "node-a's Envoy to drop the replica")
        wait_for(lambda: calm.sim.queues(a[0])["in_flight"] == 0, 20,
                 "the replica's last requests to finish")
        before = traffic.served.copy()
        wait_for(lambda: sum((traffic.served - before).values()) > 100, 20, "traffic")
        moved = traffic.served - before
    assert traffic.failures == []
    assert moved[a[0]] == 0, moved
