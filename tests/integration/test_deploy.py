"""What deploy/ promises, run for real: Envoy's stats listener, the plain Prometheus scrape
config's relabeling, and every dashboard query against a Prometheus that scraped a stack.

The stack: simulated vLLM servers on two nodes, the control plane reading their loads from
that Prometheus, a node-local and a gateway Envoy with requests through both, and a second
control plane fed a pool Envoy rejects (so the NACK and load-error panels have something to
show). Prometheus runs deploy/prometheus/prometheus.yml with its Kubernetes discovery
replaced by static target groups that carry the `__meta_kubernetes_*` labels the pod role
would set for these pods (labels taken from the manifests): Debian's Prometheus is built
without Kubernetes discovery, and no cluster runs here, but the relabeling is the file's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import (
    PROMETHEUS,
    ControlPlane,
    Envoy,
    Process,
    Prometheus,
    Sim,
    free_ports,
    running,
    wait_for,
    write_pools,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "monitoring/dashboards"
NAMESPACE = "hybridlb"
POOL = "qwen3"
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None,
                                      reason="Debian's prometheus is not installed")


@pytest.mark.envoy
def test_stats_port_serves_only_prometheus_stats_and_ready(tmp_path: Path) -> None:
    """The admin stays on localhost; the stats listener is the only way in, for two paths."""
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [("127.0.0.1:9", "node-a")])
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port, node="node-a", stats=True)
    with running(cp, envoy):
        stats = f"http://127.0.0.1:{envoy.stats_port}"
        r = httpx.get(f"{stats}/stats/prometheus")
        assert r.status_code == 200
        assert "# TYPE envoy_server_live gauge" in r.text
        assert httpx.get(f"{stats}/stats/prometheus?filter=server").status_code == 200
        assert httpx.get(f"{stats}/ready").status_code == 200
        for path in ("/config_dump", "/clusters", "/stats", "/runtime", "/", "/readyz"):
            assert httpx.get(stats + path).status_code == 404, path
        for path in ("/quitquitquit", "/drain_listeners", "/stats/prometheus", "/ready"):
            assert httpx.post(stats + path).status_code == 404, path
        assert envoy.alive()  # /quitquitquit did not reach the admin
        assert httpx.get(f"{envoy.admin}/config_dump").status_code == 200  # still there


# --- the stack ------------------------------------------------------------------------------


def manifest(kind: str, name: str) -> dict[str, Any]:
    for path in DEPLOY.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind and doc["metadata"].get("name") == name \
                    and "spec" in doc and "selector" in doc["spec"]:
                return doc
    raise LookupError(f"{kind}/{name}")


def meta_name(name: str) -> str:
    """A label or annotation name as Kubernetes discovery puts it in a `__meta_` label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(*, name: str, template: dict[str, Any], node: str, ports: dict[str, str],
                phase: str = "Running") -> list[dict[str, Any]]:
    """The target groups Kubernetes pod discovery gives for one pod: one per container port."""
    labels = {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": name,
              "__meta_kubernetes_pod_node_name": node, "__meta_kubernetes_pod_phase": phase}
    for key, value in template["metadata"].get("labels", {}).items():
        labels[f"__meta_kubernetes_pod_label_{meta_name(key)}"] = str(value)
    for key, value in template["metadata"].get("annotations", {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{meta_name(key)}"] = str(value)
    return [{"targets": [address],
             "labels": {**labels, "__meta_kubernetes_pod_container_port_name": port_name}}
            for port_name, address in ports.items()]


def scrape_configs(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """deploy/prometheus/prometheus.yml, every job discovering `pods` (as every job would in a
    cluster: its relabeling alone picks its targets), at the global 1 s interval."""
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = []
    for job in config["scrape_configs"]:
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
        job = {k: v for k, v in job.items()
               if k not in ("kubernetes_sd_configs", "scrape_interval")}
        jobs.append({**job, "static_configs": copy.deepcopy(pods)})
    return jobs


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sim = Sim(workdir, replicas=4, nodes=2, ranks=2,
                       extra=["--time-scale", "0.1", "--max-num-seqs", "2"])
        self.prometheus_port = free_ports(1)[0]
        url = f"http://127.0.0.1:{self.prometheus_port}"
        # The picker as deploy/ runs it: a child process with its own admin port.
        self.picker_admin_port, extproc_port = free_ports(2)
        self.cp = ControlPlane(workdir, self.sim.pools, listener_port=free_ports(1)[0],
                               extra=["--metrics", "auto", "--prometheus-url", url,
                                      "--prometheus-max-age-s", "5",
                                      "--scrape-interval-s", "0.5",
                                      "--extproc-port", str(extproc_port),
                                      "--extproc-admin-port", str(self.picker_admin_port)])
        # A host name in a pool: accepted with a warning, rejected by Envoy's EDS.
        self.broken_pools = workdir / "broken.yaml"
        self.broken_pools.write_text(yaml.safe_dump({"pools": [
            {"name": "broken", "replicas": [{"address": "localhost:9", "node": "node-a"}]}]}))
        self.broken = ControlPlane(workdir, self.broken_pools, listener_port=free_ports(1)[0],
                                   name="cp-broken", extra=["--metrics", "scrape",
                                                            "--scrape-interval-s", "0.5"])
        self.node_envoy = Envoy(workdir, xds_port=self.cp.xds_port, node="node-a",
                                name="envoy-node-a", stats=True)
        self.gateway = Envoy(workdir, xds_port=self.cp.xds_port, name="envoy-gateway",
                             stats=True)
        # Not an Envoy(): it never becomes ready on a config it rejects.
        broken_envoy = Envoy(workdir, xds_port=self.broken.xds_port, name="envoy-broken")
        self.broken_envoy = Process(broken_envoy.args, workdir / "envoy-broken.log")
        self.prometheus: Prometheus | None = None
        self.client = httpx.Client(timeout=10)

    def pods(self) -> list[dict[str, Any]]:
        vllm = manifest("Deployment", "vllm-qwen3")["spec"]["template"]
        cp = manifest("Deployment", "hybridlb")["spec"]["template"]
        gateway = manifest("Deployment", "hybridlb-gateway")["spec"]["template"]
        node = manifest("DaemonSet", "hybridlb-node-envoy")["spec"]["template"]
        pods = []
        for i, address in enumerate(self.sim.addresses):
            pods += pod_targets(name=f"vllm-{i}", template=vllm, node=self.sim.nodes[address],
                                ports={"http": address, "dp-rpc": "127.0.0.1:1"})
        pods += pod_targets(name="vllm-pending", template=vllm, node="node-b",
                            ports={"http": "127.0.0.1:2"}, phase="Pending")
        pods += pod_targets(name="hybridlb-0", template=cp, node="node-c", ports={
            "grpc-xds": f"127.0.0.1:{self.cp.xds_port}",
            "admin": f"127.0.0.1:{self.cp.admin_port}",
            "picker-admin": f"127.0.0.1:{self.picker_admin_port}"})
        pods += pod_targets(name="hybridlb-broken", template=cp, node="node-c", ports={
            "grpc-xds": f"127.0.0.1:{self.broken.xds_port}",
            "admin": f"127.0.0.1:{self.broken.admin_port}"})
        for name, envoy, template, on in (("envoy-node-a", self.node_envoy, node, "node-a"),
                                          ("envoy-gateway", self.gateway, gateway, "node-c")):
            pods += pod_targets(name=name, template=template, node=on, ports={
                "http": f"127.0.0.1:{envoy.listener_port}",
                "stats": f"127.0.0.1:{envoy.stats_port}"})
        return pods

    def query(self, expr: str) -> list[dict[str, Any]]:
        assert self.prometheus is not None
        r = self.client.get(f"{self.prometheus.url}/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def series(self, match: str) -> list[dict[str, str]]:
        assert self.prometheus is not None
        r = self.client.get(f"{self.prometheus.url}/api/v1/series", params={"match[]": match})
        assert r.status_code == 200, f"{match}: {r.text}"
        found: list[dict[str, str]] = r.json()["data"]
        return found


def send(url: str, n: int) -> None:
    """`n` completions through one Envoy, eight at a time; every one must succeed."""
    def one(i: int) -> None:
        r = httpx.post(f"{url}/v1/completions", timeout=30, headers={"x-model": POOL},
                       json={"model": "Qwen/Qwen3-0.6B", "prompt": "x" * (40 * (i % 5 + 1)),
                             "max_tokens": 16})
        assert r.status_code == 200, r.text

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(n)))


@contextlib.contextmanager
def running_together(*procs: Process) -> Iterator[None]:
    """Start slow starters side by side (a control plane takes seconds to import)."""
    try:
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(p.start) for p in procs]:
                future.result()
        yield
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("deploy"))
    with running(s.sim):
        s.prometheus = Prometheus(s.workdir, [], interval_s=1.0, port=s.prometheus_port,
                                  scrape_configs=scrape_configs(s.pods()))
        with running_together(s.prometheus, s.cp, s.broken), \
                running(s.node_envoy, s.gateway, s.broken_envoy):
            wait_for(lambda: s.broken.metric("hybridlb_xds_nacks_total") > 0, 20,
                     "Envoy to reject the host name")
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for future in [pool.submit(send, e.url, 40) for e in (s.node_envoy, s.gateway)]:
                    future.result()
            try:
                yield s
            finally:
                s.client.close()


# --- the scrape config ----------------------------------------------------------------------


@needs_prometheus
@pytest.mark.prometheus
@pytest.mark.envoy
def test_scrape_config_keeps_pod_ip_and_port_as_instance_and_adds_node_and_pool(
    stack: Stack,
) -> None:
    def up() -> dict[str, list[dict[str, str]]]:
        jobs: dict[str, list[dict[str, str]]] = {}
        for series in stack.query("up == 1"):
            jobs.setdefault(series["metric"]["job"], []).append(series["metric"])
        return jobs

    wait_for(lambda: sum(map(len, up().values())) == 9, 20, "every target scraped")
    jobs = up()
    vllm = {s["instance"]: s for s in jobs["vllm"]}
    assert set(vllm) == set(stack.sim.addresses)  # no rpc port, no Pending pod
    for address, labels in vllm.items():
        assert labels["node"] == stack.sim.nodes[address]
        assert labels["pool"] == POOL
        assert labels["namespace"] == NAMESPACE and labels["pod"].startswith("vllm-")
    assert {s["instance"] for s in jobs["hybridlb-control-plane"]} == {
        f"127.0.0.1:{stack.cp.admin_port}", f"127.0.0.1:{stack.picker_admin_port}",
        f"127.0.0.1:{stack.broken.admin_port}"}
    assert all("node" not in s for s in jobs["hybridlb-control-plane"])
    assert {(s["pod"], s["node"], s["envoy"]) for s in jobs["hybridlb-envoy"]} == {
        ("envoy-node-a", "node-a", "node"), ("envoy-gateway", "node-c", "gateway")}


@needs_prometheus
@pytest.mark.prometheus
@pytest.mark.envoy
def test_control_plane_reads_loads_through_that_scrape(stack: Stack) -> None:
    """The `instance` the scrape config keeps is what the Prometheus load source maps by."""
    wait_for(lambda: stack.cp.metric("hybridlb_load_replicas", source="prometheus") == 4, 20,
             "loads from Prometheus for every replica")


# --- the dashboards -------------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str]]:
    found = []
    for name, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{name}: {panel['title']} {target['refId']}", target["expr"]))
    return found


def substitute(expr: str, *, node: str) -> str:
    return (expr.replace("$__rate_interval", "30s").replace("$pool", POOL)
            .replace("$node", node))


@needs_prometheus
@pytest.mark.prometheus
@pytest.mark.envoy
@pytest.mark.parametrize("node", [".*", "node-a"])
def test_every_panel_query_is_valid_and_shows_data(stack: Stack, node: str) -> None:
    queries = panel_queries()
    assert len(queries) > 25
    for _, expr in queries:
        stack.query(substitute(expr, node=node))  # a 400 (invalid PromQL) fails here
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = [f"{where}: {substitute(expr, node=node)}" for where, expr in queries
                      if not stack.query(substitute(expr, node=node))]
        return not missing

    try:
        wait_for(all_have_data, 30, "every panel to show data")
    except TimeoutError:
        pytest.fail("queries with no series:\n" + "\n".join(missing))


@needs_prometheus
@pytest.mark.prometheus
@pytest.mark.envoy
def test_every_dashboard_variable_lists_values(stack: Stack) -> None:
    pattern = re.compile(r"^label_values\((.+), *(\w+)\)$")
    for name, dashboard in dashboards().items():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = pattern.match(variable["query"]["query"])
            assert match, f"{name}: {variable['name']}: not label_values(...)"
            selector = match.group(1).replace("$pool", POOL).replace("$node", ".*")
            values = {s[match.group(2)] for s in stack.series(selector) if match.group(2) in s}
            expected = {"pool": {POOL}, "node": {"node-a", "node-b"}}[variable["name"]]
            assert expected <= values, f"{name}: {variable['name']}: {values}"

