"""Kubernetes discovery end to end: fake API server → control plane (a real process) → Envoy.

The pods point at echo upstreams (pod IP 127.0.0.1, a port each through `hybridlb.io/port`),
so every request shows which pod Envoy chose.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakekube import FakeKube, Pod, make_pod
from tests.harness import (
    ControlPlane,
    Envoy,
    Traffic,
    Upstreams,
    free_ports,
    running,
    served_by,
    wait_for,
)

pytestmark = pytest.mark.envoy


class Cluster:
    def __init__(self, workdir: Path, kube: FakeKube) -> None:
        self.kube = kube
        self.ports = free_ports(4)
        self.upstreams = Upstreams(workdir, self.ports)
        kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig")
        self.cp = ControlPlane(
            workdir, None, listener_port=free_ports(1)[0],
            source=["--kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", "default",
                    "--selector", "app=vllm"],
            extra=["--metrics", "none"],  # echo upstreams have no vLLM metrics
        )
        # A gateway on no GPU node spreads over every node, so each pod's share is visible
        # (an Envoy on node-a would keep node-a's traffic on node-a while it has room).
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port, node="")

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def pod(self, name: str, i: int, *, node: str = "node-a", ready: bool = True) -> Pod:
        # Unannotated but for the port: the pool comes from vLLM's own arguments.
        return make_pod(name, node=node, ready=ready,
                        annotations={"hybridlb.io/port": str(self.ports[i])},
                        args=["vllm", "serve", "Qwen/Qwen3-0.6B", "--served-model-name", "qwen3"])

    def envoy_hosts(self, cluster: str = "qwen3") -> dict[str, set[str]]:
        """`address -> health flags` of a cluster, from Envoy's admin /clusters."""
        hosts: dict[str, set[str]] = {}
        for line in httpx.get(f"{self.envoy.admin}/clusters").text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
                hosts[parts[1]] = set(filter(None, parts[3].split("/"))) - {"healthy"}
        return hosts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("kubernetes")
    with FakeKube() as kube:
        c = Cluster(workdir, kube)
        kube.create(c.pod("vllm-0", 0), c.pod("vllm-1", 1, node="node-b"))
        with running(c.upstreams, c.cp, c.envoy):
            yield c


def test_pod_lifecycle_through_envoy(cluster: Cluster) -> None:
    c, kube = cluster, cluster.kube
    wait_for(lambda: set(c.envoy_hosts()) == {c.address(0), c.address(1)}, 15, "first pods")
    # The node comes from spec.nodeName (a gateway Envoy holds no node-local clusters).
    nodes = {r["address"]: r["node"] for r in c.cp.state()["pools"][0]["replicas"]}
    assert nodes[c.address(1)] == "node-b"
    with Traffic(c.envoy.url) as traffic:
        # Pending → Ready: routed only once Ready.
        kube.create(c.pod("vllm-2", 2, ready=False))
        kube.create(c.pod("vllm-3", 3, node="node-b"))
        wait_for(lambda: c.address(3) in c.envoy_hosts(), 15, "a ready pod")
        assert c.address(2) not in c.envoy_hosts()
        kube.update("default", "vllm-2",
                    lambda p: p["status"]["conditions"][0].update({"status": "True"}))
        wait_for(lambda: c.address(2) in served_by(c.envoy.url, 20), 15, "the pod turned Ready")

        # Terminating: draining in Envoy, and no new request reaches it.
        kube.terminate("default", "vllm-0")
        wait_for(lambda: c.envoy_hosts().get(c.address(0)) == {"eds_status_draining"}, 15,
                 "draining in Envoy")
        before = traffic.served.copy()
        wait_for(lambda: sum((traffic.served - before).values()) >= 200, 20, "more traffic")
        after_drain: Counter[str] = traffic.served - before
        assert c.address(0) not in after_drain
        assert {c.address(1), c.address(2), c.address(3)} <= set(after_drain)

        # Deleted: gone from Envoy.
        kube.delete(("default", "vllm-0"))
        wait_for(lambda: c.address(0) not in c.envoy_hosts(), 15, "deleted pod removed")
        assert set(c.envoy_hosts()) == {c.address(1), c.address(2), c.address(3)}
    assert traffic.failures == []
    assert c.address(0) in traffic.served  # it did serve before it drained


def test_control_plane_reports_pods_in_debug_state(cluster: Cluster) -> None:
    replicas = {r["address"]: r for p in cluster.cp.state()["pools"] for r in p["replicas"]}
    assert replicas[cluster.address(1)]["origin"] == "pod default/vllm-1"
    assert replicas[cluster.address(1)]["node"] == "node-b"
