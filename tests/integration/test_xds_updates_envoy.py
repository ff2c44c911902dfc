"""Config updates as real Envoys live them: a late joiner's view, a pool removed and re-added
under traffic (make-before-break), and a type Envoy asks that the server does not serve."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import ControlPlane, Envoy, Sim, Traffic, free_ports, running, wait_for

pytestmark = pytest.mark.envoy
MODEL = "Qwen/Qwen3-0.6B"


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sim = Sim(workdir, replicas=4, extra=["--max-num-seqs", "4"])
        self.pools = workdir / "pools.yaml"
        self.cp = ControlPlane(
            workdir, self.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2", "--max-num-seqs", "4",
                   "--smoothing-s", "0.5", "--max-step-per-s", "2", "--room-threshold", "0.5"],
        )
        self.node_a = Envoy(workdir, xds_port=self.cp.xds_port, node="node-a", name="envoy-a")
        self.gateway = Envoy(workdir, xds_port=self.cp.xds_port, delta=True, name="envoy-gw")
        # node-b's Envoy also asks ADS for a runtime layer (RTDS), which the server does not
        # serve; it gives up on it after a second and must get everything else regardless.
        self.asks_rtds = Envoy(workdir, xds_port=self.cp.xds_port, node="node-b",
                               name="envoy-rtds")
        config = workdir / "envoy-rtds.yaml"
        doc = yaml.safe_load(config.read_text())
        doc["layered_runtime"] = {"layers": [{"name": "rtds", "rtds_layer": {
            "name": "hybridlb-runtime",
            "rtds_config": {"ads": {}, "resource_api_version": "V3",
                            "initial_fetch_timeout": "1s"}}}]}
        config.write_text(yaml.safe_dump(doc))

    def layout(self, *, other: bool) -> None:
        """qwen3 on replicas 0-2 (node-a, node-b, node-c); `other`, listed first and so the
        pool of requests that name no model, on replica 3 (node-a)."""
        a = self.sim.addresses
        pools = [{"name": "qwen3", "replicas": [
            {"address": a[0], "node": "node-a"}, {"address": a[1], "node": "node-b"},
            {"address": a[2], "node": "node-c"}]}]
        if other:
            pools.insert(0, {"name": "other", "replicas": [{"address": a[3], "node": "node-a"}]})
        tmp = self.pools.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"pools": pools}))
        tmp.replace(self.pools)

    def keep(self, node: str) -> int | None:
        for pool in self.cp.state()["pools"]:
            if pool["name"] == "qwen3":
                value = pool["nodes"].get(node, {}).get("keep_per_mille")
                return None if value is None else int(value)
        return None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("xds-updates"))
    with running(f.sim):
        f.layout(other=True)
        with running(f.cp, f.node_a, f.gateway, f.asks_rtds):
            yield f


def route_keeps(envoy: Envoy) -> set[int]:
    """The keep shares in the route names (`...:keep=N`) of an Envoy's active routes."""
    dump = httpx.get(f"{envoy.admin}/config_dump", params={"resource": "dynamic_route_configs"})
    return {int(k) for k in re.findall(r'"name": "model:qwen3:keep=(\d+)"', dump.text)}


def test_a_pool_removed_and_readded_under_traffic_loses_no_request(fleet: Fleet) -> None:
    a = fleet.sim.addresses
    # Requests naming no model go to the first pool: `other` while it exists, then qwen3.
    with Traffic(fleet.node_a.url) as sotw, Traffic(fleet.gateway.url) as delta:
        wait_for(lambda: sotw.served[a[3]] > 10 and delta.served[a[3]] > 10, 20, "traffic")
        fleet.layout(other=False)
        wait_for(lambda: all(t.served[a[0]] + t.served[a[1]] + t.served[a[2]] > 20
                             for t in (sotw, delta)), 30, "traffic moved to qwen3")
        before = (sotw.served[a[3]], delta.served[a[3]])
        fleet.layout(other=True)
        wait_for(lambda: sotw.served[a[3]] > before[0] + 20 and delta.served[a[3]] > before[1] + 20,
                 30, "traffic back on other")
    assert sotw.failures == [] and delta.failures == []


def test_an_envoy_that_joins_late_gets_the_current_keep_share(fleet: Fleet) -> None:
    a = fleet.sim.addresses
    fleet.sim.fault(a[2], slowdown=50.0)  # node-c's replica: requests stay, its queue grows
    stop = threading.Event()

    def occupy() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"http://{a[2]}/v1/completions",
                                json={"model": MODEL, "prompt": "hi", "max_tokens": 60})

    workers = [threading.Thread(target=occupy) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: (fleet.keep("node-c") or 1000) < 1000, 30, "node-c's keep share to fall")
        late = Envoy(fleet.workdir, xds_port=fleet.cp.xds_port, node="node-c", name="envoy-late")
        with running(late):
            # Its routes carry the keep share the control plane holds now (which may still be
            # moving: wait until the two agree).
            wait_for(lambda: route_keeps(late) == {fleet.keep("node-c")}, 30,
                     "the late Envoy's keep share")
    finally:
        stop.set()
        fleet.sim.fault(a[2], slowdown=1.0)
        for w in workers:
            w.join()


def test_a_type_the_server_does_not_serve_changes_nothing_for_the_others(fleet: Fleet) -> None:
    a = fleet.sim.addresses
    assert "asked for unsupported type" in fleet.cp.output()
    assert set(fleet.asks_rtds.endpoint_weights("qwen3/node/node-b")) == {a[1]}
    with Traffic(fleet.asks_rtds.url, headers={"x-model": "qwen3"}) as traffic:
        wait_for(lambda: traffic.served[a[1]] > 10, 20, "traffic")
    assert traffic.failures == []
    # Updates still reach it: `other` goes and comes back.
    fleet.layout(other=False)
    wait_for(lambda: not fleet.asks_rtds.endpoint_weights("other"), 20, "other removed")
    fleet.layout(other=True)
    wait_for(lambda: set(fleet.asks_rtds.endpoint_weights("other")) == {a[3]}, 20, "other back")
