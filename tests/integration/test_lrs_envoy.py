"""Real Envoys report their load (LRS) to the control plane, which shows each Envoy's ingress
per pool: node-a's Envoy and the gateway get traffic, node-b's gets none."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import (
    ControlPlane,
    Envoy,
    Traffic,
    Upstreams,
    running,
    wait_for,
    write_pools,
)
from xds_server.ports import free_ports

pytestmark = pytest.mark.envoy
HEADERS = {"x-model": "qwen3"}


@dataclass
class Fleet:
    cp: ControlPlane
    envoys: dict[str, Envoy]

    def ingress(self) -> dict[str, float]:
        """Requests a second entering each Envoy for qwen3, by its node ("" the gateway)."""
        rates: dict[str, float] = self.cp.state()["ingress"].get("qwen3", {})
        return rates


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir: Path = tmp_path_factory.mktemp("lrs")
    upstreams = Upstreams(workdir, free_ports(2))
    pools = workdir / "pools.yaml"
    write_pools(pools, [(f"127.0.0.1:{upstreams.ports[0]}", "node-a"),
                        (f"127.0.0.1:{upstreams.ports[1]}", "node-b")])
    cp = ControlPlane(workdir, pools, listener_port=free_ports(1)[0],
                      extra=["--metrics", "none", "--load-report-interval-s", "0.5"])
    envoys = {node: Envoy(workdir, xds_port=cp.xds_port, node=node,
                          name=f"envoy-{node or 'gateway'}")
              for node in ("node-a", "node-b", "")}
    with running(upstreams, cp, *envoys.values()):
        yield Fleet(cp, envoys)


def test_each_envoys_ingress_shows_for_its_node_and_an_idle_envoy_reads_zero(
    fleet: Fleet,
) -> None:
    with Traffic(fleet.envoys["node-a"].url, HEADERS) as to_a, \
            Traffic(fleet.envoys[""].url, HEADERS) as to_gateway:
        def reported() -> bool:
            rates = fleet.ingress()
            return (rates.keys() == {"node-a", "node-b", ""}
                    and rates["node-a"] > 0 and rates[""] > 0)

        wait_for(reported, 20, "node-a's Envoy and the gateway reported traffic")
        rates = fleet.ingress()
    assert to_a.served and to_gateway.served
    assert not to_a.failures + to_gateway.failures
    assert rates["node-b"] == 0.0  # reported, with nothing sent: not absent, zero
    assert fleet.cp.metric("hybridlb_lrs_reports_total") > 0
    assert fleet.cp.metric("hybridlb_lrs_streams") == 3
    assert fleet.cp.metric("hybridlb_lrs_rejected_total") == 0


def test_ingress_falls_back_to_zero_once_traffic_stops(fleet: Fleet) -> None:
    with Traffic(fleet.envoys["node-a"].url, HEADERS):
        wait_for(lambda: fleet.ingress().get("node-a", 0.0) > 0, 20, "node-a's ingress")
    wait_for(lambda: fleet.ingress().get("node-a") == 0.0, 20,
             "node-a's ingress back to zero (a report of its idle interval)")


def test_a_node_envoy_with_all_the_traffic_keeps_only_its_nodes_part(fleet: Fleet) -> None:
    """The hybrid policy plans from the reports: node-a and node-b hold one replica each, so
    with every request entering node-a's Envoy, node-a keeps about half of them and the whole
    pool's locality weights send nothing back to node-a (none of its queues needed for it)."""

    def nodes() -> dict[str, dict[str, int]]:
        return dict(fleet.cp.state()["pools"][0]["nodes"])

    with Traffic(fleet.envoys["node-a"].url, HEADERS) as to_a:
        wait_for(lambda: 400 <= nodes()["node-a"]["keep_per_mille"] <= 600, 30,
                 "node-a's keep share planned at about half")
        planned = nodes()
    assert to_a.served and not to_a.failures
    assert planned["node-b"]["keep_per_mille"] == 1000
    assert planned["node-a"]["weight"] < 0.1 * planned["node-b"]["weight"]
