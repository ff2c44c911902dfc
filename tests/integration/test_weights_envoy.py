"""Load-aware weights end to end: simulator → scrape → policy → ADS → real Envoy."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ControlPlane, Envoy, Sim, free_ports, running, wait_for

pytestmark = pytest.mark.envoy


class Stack:
    def __init__(self, workdir: Path) -> None:
        # Four slots per rank, so that a modest flood fills a replica and queues behind it.
        self.sim = Sim(workdir, replicas=3, nodes=2, extra=["--max-num-seqs", "4"])
        self.cp = ControlPlane(
            workdir, self.sim.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2", "--max-num-seqs", "4",
                   "--smoothing-s", "0.5", "--max-step-per-s", "2", "--load-model", "queue"],
        )
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port, node="node-a")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("weights"))
    with running(s.sim, s.cp, s.envoy):
        yield s


def flood(address: str, n: int, max_tokens: int) -> list[concurrent.futures.Future[int]]:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=n)

    def one() -> int:
        r = httpx.post(f"http://{address}/v1/completions", timeout=60,
                       json={"model": "Qwen/Qwen3-0.6B", "prompt": "hello " * 50,
                             "max_tokens": max_tokens})
        return r.status_code

    futures = [pool.submit(one) for _ in range(n)]
    pool.shutdown(wait=False)
    return futures


def test_loaded_replica_loses_weight_in_envoy_then_recovers(stack: Stack) -> None:
    busy, *others = stack.sim.addresses
    wait_for(lambda: set(stack.envoy.endpoint_weights("qwen3").values()) == {100}, 15,
             "idle weights")
    stack.sim.fault(busy, slowdown=4.0)
    futures = flood(busy, 24, max_tokens=300)
    wait_for(lambda: stack.envoy.endpoint_weights("qwen3")[busy] <= 10, 15, "weight drops")
    weights = stack.envoy.endpoint_weights("qwen3")
    assert all(weights[a] == 100 for a in others)
    state = stack.cp.state()["pools"][0]["replicas"]
    explained = next(r for r in state if r["address"] == busy)
    assert explained["load"]["waiting"] > 0 and explained["weight_inputs"]["utilization"] == 1.0
    stack.sim.fault(busy, slowdown=1.0)
    assert all(f.result(timeout=60) == 200 for f in futures)
    wait_for(lambda: stack.envoy.endpoint_weights("qwen3")[busy] == 100, 15, "recovery")


def test_weights_and_ages_are_exported(stack: Stack) -> None:
    address = stack.sim.addresses[0]
    assert stack.cp.metric("hybridlb_endpoint_weight", replica=address) > 0
    wait_for(lambda: 0 <= stack.cp.metric("hybridlb_load_age_seconds", replica=address) < 2, 5,
             "a fresh load age")
    assert stack.cp.metric("hybridlb_load_replicas", source="scrape") == 3


def test_hung_metrics_endpoint_ages_and_falls_back_without_touching_others(stack: Stack) -> None:
    hung, *others = stack.sim.addresses
    stack.sim.fault(hung, hang=True)
    try:
        def stale() -> bool:
            replicas = stack.cp.state()["pools"][0]["replicas"]
            r = next(r for r in replicas if r["address"] == hung)
            return bool(r["weight_inputs"]["freshness"] < 1)

        wait_for(stale, 20, "the hung replica's load to go stale")
        assert stack.cp.metric("hybridlb_load_errors_total", source="scrape",
                               reason="timeout") > 0
        weights = stack.envoy.endpoint_weights("qwen3")
        assert weights[hung] >= 1 and all(weights[a] == 100 for a in others)
    finally:
        stack.sim.fault(hung, hang=False)
