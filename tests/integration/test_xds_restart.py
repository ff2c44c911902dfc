"""The control plane killed and restarted under traffic: Envoy keeps its last config."""

from __future__ import annotations

import signal
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


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_killed_control_plane_keeps_routing_and_converges_after_restart(
    tmp_path: Path, delta: bool
) -> None:
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port, delta=delta)
    upstreams = Upstreams(tmp_path, ports)
    with running(upstreams, cp, envoy), Traffic(envoy.url) as traffic:
        wait_for(lambda: len(traffic.served) == 2, 10, "traffic on both replicas")
        cp.stop(signal.SIGKILL)
        served = sum(traffic.served.values())
        wait_for(lambda: sum(traffic.served.values()) > served + 100, 10, "traffic while down")
        # Change the pools while the control plane is down; the restart must deliver it.
        write_pools(pools, [(addresses[1], "node-b"), (addresses[2], "node-c")])
        cp.start()
        wait_for(lambda: addresses[2] in served_by(envoy.url, 20), 30, "converged")
        wait_for(lambda: addresses[0] not in served_by(envoy.url, 30), 10, "old one removed")
    assert traffic.failures == []
