"""The control plane end to end: static pools → ADS (SotW and delta) → real Envoy → upstreams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ControlPlane,
    Envoy,
    Traffic,
    Upstreams,
    free_ports,
    running,
    served_by,
    wait_for,
    write_pools,
)

pytestmark = pytest.mark.envoy


class Fleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = free_ports(5)
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.base = [(self.addresses[0], "node-a"), (self.addresses[1], "node-a"),
                     (self.addresses[2], "node-b")]
        self.pools = workdir / "pools.yaml"
        write_pools(self.pools, self.base)
        self.upstreams = Upstreams(workdir, self.ports)
        listener = free_ports(1)[0]
        self.cp = ControlPlane(workdir, self.pools, listener_port=listener)
        # Central gateways (on no node): they balance over every replica of a pool.
        self.sotw = Envoy(workdir, xds_port=self.cp.xds_port, name="envoy-sotw")
        self.delta = Envoy(workdir, xds_port=self.cp.xds_port, delta=True, name="envoy-delta")

    def reset(self) -> None:
        write_pools(self.pools, self.base)
        for envoy in (self.sotw, self.delta):
            wait_for(lambda e=envoy: set(e.endpoint_weights("qwen3")) == set(self.addresses[:3]),
                     15, "base pools")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("xds"))
    with running(f.upstreams, f.cp, f.sotw, f.delta):
        yield f


@pytest.fixture
def envoys(fleet: Fleet) -> Iterator[list[Envoy]]:
    fleet.reset()
    yield [fleet.sotw, fleet.delta]


def test_both_protocols_route_to_every_replica(fleet: Fleet, envoys: list[Envoy]) -> None:
    for envoy in envoys:
        counts = served_by(envoy.url, 60)
        assert set(counts) == set(fleet.addresses[:3]), envoy.args
    protocols = sorted(e["protocol"] for e in fleet.cp.state()["envoys"])
    assert protocols == ["delta", "sotw"]


def test_gateways_hold_the_pool_cluster_and_no_node_local_ones(
    fleet: Fleet, envoys: list[Envoy]
) -> None:
    import httpx

    for envoy in envoys:
        assert set(envoy.endpoint_weights("qwen3")) == set(fleet.addresses[:3])
        names = {line.split("::", 1)[0]
                 for line in httpx.get(f"{envoy.admin}/clusters").text.splitlines()}
        assert not any("/node/" in n or "/prefer/" in n for n in names), names


def test_model_header_selects_the_pool(fleet: Fleet, envoys: list[Envoy]) -> None:
    write_pools(fleet.pools, fleet.base, extra_pools={"llama": [(fleet.addresses[4], "node-c")]})
    for envoy in envoys:
        wait_for(lambda e=envoy: bool(e.endpoint_weights("llama")), 15, "llama pool")
        assert set(served_by(envoy.url, 10, {"x-model": "llama"})) == {fleet.addresses[4]}
        assert fleet.addresses[4] not in served_by(envoy.url, 30)


def test_added_and_removed_replicas_without_failures(fleet: Fleet, envoys: list[Envoy]) -> None:
    new = fleet.addresses[3]
    with Traffic(fleet.sotw.url) as sotw, Traffic(fleet.delta.url) as delta:
        write_pools(fleet.pools, [*fleet.base, (new, "node-c")])
        for envoy in envoys:
            wait_for(lambda e=envoy: new in served_by(e.url, 20), 15, "new replica routed")
        # Remove one of the original replicas; the others must keep serving without a failure.
        gone = fleet.addresses[0]
        write_pools(fleet.pools, [*fleet.base[1:], (new, "node-c")])
        for envoy in envoys:
            wait_for(lambda e=envoy: gone not in e.endpoint_weights("qwen3"), 15, "removal")
        before = {t: t.served.copy() for t in (sotw, delta)}
        wait_for(lambda: all(sum(t.served.values()) > sum(before[t].values()) + 50
                             for t in (sotw, delta)), 20, "traffic after removal")
    for traffic in (sotw, delta):
        assert traffic.failures == []
        after = traffic.served - before[traffic]
        assert gone not in after
        assert new in traffic.served


def test_nack_keeps_last_good_config_and_is_counted(fleet: Fleet, envoys: list[Envoy]) -> None:
    nacks_before = fleet.cp.metric("hybridlb_xds_nacks_total", type="EDS")
    # Envoy's EDS takes IP literals only: a host name makes both Envoys reject the update.
    write_pools(fleet.pools, [*fleet.base, ("localhost:9", "node-a")])
    wait_for(lambda: fleet.cp.metric("hybridlb_xds_nacks_total", type="EDS") >= nacks_before + 2,
             15, "two NACKs")
    for envoy in envoys:
        assert set(served_by(envoy.url, 30)) == set(fleet.addresses[:3])
    nacked = [e["nacked"] for e in fleet.cp.state()["envoys"]]
    assert all("malformed IP address" in n["EDS"]["error"] for n in nacked)
    # A good edit after the bad one converges.
    write_pools(fleet.pools, [*fleet.base, (fleet.addresses[3], "node-b")])
    for envoy in envoys:
        wait_for(lambda e=envoy: fleet.addresses[3] in served_by(e.url, 20), 15, "recovery")


def test_broken_pool_file_keeps_last_good_pools(fleet: Fleet, envoys: list[Envoy]) -> None:
    errors_before = fleet.cp.metric("hybridlb_source_errors_total", source="static")
    fleet.pools.write_text("pools:\n  - name: qwen3\n    replicas: [{address: nope}]\n")
    wait_for(lambda: fleet.cp.metric("hybridlb_source_errors_total", source="static")
             > errors_before, 10, "error counted")
    assert "pools[0].replicas[0].address" in fleet.cp.output()
    for envoy in envoys:
        assert set(served_by(envoy.url, 30)) == set(fleet.addresses[:3])


def test_status_command_shows_pools_weights_and_envoys(fleet: Fleet, envoys: list[Envoy]) -> None:
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "xds_server", "status", "--admin", fleet.cp.admin],
        capture_output=True, text=True, check=True,
        env={"PATH": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    ).stdout
    assert "pool qwen3" in out
    for address in fleet.addresses[:3]:
        assert address in out
    assert "envoy-sotw" in out and "envoy-delta" in out and "(gateway)" in out
    assert "qwen3:0%" in out  # a gateway keeps nothing on a node of its own
    unreachable = subprocess.run(
        [sys.executable, "-m", "xds_server", "status", "--admin", "http://127.0.0.1:9"],
        capture_output=True, text=True)
    assert unreachable.returncode != 0
    assert "cannot reach the control plane" in unreachable.stderr
