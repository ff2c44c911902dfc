"""Envoy's own ORCA-driven balancers (`--lb-policy orca_wrr | load_aware_locality`) on a
real Envoy 1.40: the control plane's config is accepted and routes, and what each does
with the only ORCA report vLLM sends (the simulator's, in vLLM's format)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ControlPlane, Envoy, Sim, free_ports, running, wait_for

pytestmark = pytest.mark.envoy

POLICIES = ("orca_wrr", "load_aware_locality")
#: Least-request drawing more hosts than power-of-two (the `choices` Envoy and its plane).
CHOICES = 16


class Stack:
    def __init__(self, workdir: Path) -> None:
        # Two nodes, three replicas each: node-a's Envoy has a local locality to prefer.
        self.sim = Sim(workdir, replicas=6, nodes=2)
        self.cps: dict[str, ControlPlane] = {}
        self.envoys: dict[str, Envoy] = {}
        for policy in POLICIES:
            self.cps[policy] = ControlPlane(
                workdir, self.sim.pools, listener_port=free_ports(1)[0], name=f"cp-{policy}",
                extra=["--metrics", "none", "--local-first", "false", "--lb-policy", policy])
            self.envoys[policy] = Envoy(workdir, xds_port=self.cps[policy].xds_port,
                                        node="node-a", name=f"envoy-{policy}")
        self.cps["choices"] = ControlPlane(
            workdir, self.sim.pools, listener_port=free_ports(1)[0], name="cp-choices",
            extra=["--metrics", "none", "--least-request-choices", str(CHOICES)])
        self.envoys["choices"] = Envoy(workdir, xds_port=self.cps["choices"].xds_port,
                                       node="node-a", name="envoy-choices")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("lb-policies"))
    with running(s.sim, *s.cps.values(), *s.envoys.values()):
        yield s


def complete(envoy: Envoy) -> httpx.Response:
    return httpx.post(f"{envoy.url}/v1/completions", timeout=30, headers={"x-model": "qwen3"},
                      json={"model": "Qwen/Qwen3-0.6B", "prompt": "hi", "max_tokens": 2})


def served_nodes(stack: Stack, envoy: Envoy, n: int) -> Counter[str]:
    nodes: Counter[str] = Counter()
    for _ in range(n):
        r = complete(envoy)
        assert r.status_code == 200, r.text
        nodes[stack.sim.nodes[r.headers["x-hybridlb-replica"]]] += 1
    return nodes


def active_cluster(envoy: Envoy, name: str) -> dict[str, object]:
    dump = httpx.get(f"{envoy.admin}/config_dump?resource=dynamic_active_clusters").json()
    for entry in dump["configs"]:
        if entry["cluster"]["name"] == name:
            return dict(entry["cluster"])
    return {}


def test_least_request_draws_as_many_hosts_as_configured(stack: Stack) -> None:
    envoy = stack.envoys["choices"]
    for name in ("qwen3", "qwen3/node/node-a"):
        wait_for(lambda name=name: active_cluster(envoy, name), 20, f"{name} in Envoy")
        cluster = active_cluster(envoy, name)
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        assert cluster["least_request_lb_config"] == {"choice_count": CHOICES}
    assert stack.cps["choices"].metric("hybridlb_xds_nacks_total") == 0
    assert sum(served_nodes(stack, envoy, 6).values()) == 6


def cluster_policy(envoy: Envoy) -> str:
    """The name of the load-balancing extension the pool's cluster runs in Envoy."""
    dump = httpx.get(f"{envoy.admin}/config_dump?resource=dynamic_active_clusters").json()
    for entry in dump["configs"]:
        cluster = entry["cluster"]
        if cluster["name"] == "qwen3":
            policies = cluster["load_balancing_policy"]["policies"]
            return str(policies[0]["typed_extension_config"]["name"])
    return ""


@pytest.mark.parametrize(("policy", "extension"), [
    ("orca_wrr", "envoy.load_balancing_policies.client_side_weighted_round_robin"),
    ("load_aware_locality", "envoy.load_balancing_policies.load_aware_locality"),
])
def test_envoy_accepts_the_policy_and_routes_with_it(stack: Stack, policy: str,
                                                     extension: str) -> None:
    envoy = stack.envoys[policy]
    wait_for(lambda: cluster_policy(envoy) == extension, 20, f"{policy} cluster in Envoy")
    assert stack.cps[policy].metric("hybridlb_xds_nacks_total") == 0
    assert sum(served_nodes(stack, envoy, 12).values()) == 12


def test_orca_wrr_asks_vllm_for_its_load_report(stack: Stack) -> None:
    envoy = stack.envoys["orca_wrr"]
    wait_for(lambda: cluster_policy(envoy) != "", 20, "cluster in Envoy")
    # Envoy adds the format header; the replica answers with vLLM's report, which Envoy parses
    # (and passes on): no named metric it could weigh by without a request rate.
    report = complete(envoy).headers.get("endpoint-load-metrics", "")
    assert report.startswith("TEXT named_metrics.num_requests_waiting=")


def test_load_aware_locality_keeps_a_node_envoys_traffic_local(stack: Stack) -> None:
    envoy = stack.envoys["load_aware_locality"]
    wait_for(lambda: cluster_policy(envoy) != "", 20, "cluster in Envoy")
    # vLLM reports no utilization Envoy reads, so every locality looks idle: all local but
    # the probe share (3%). That node-a wins at all shows the bootstrap locality matched.
    nodes = served_nodes(stack, envoy, 60)
    assert nodes["node-a"] >= 50, nodes
