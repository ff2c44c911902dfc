"""The routing benchmark's fleet: simulated replicas, Envoys, Prometheus, a control plane.

Everything but the control plane stays up for the whole run (the Envoys from the first
control plane on), so each policy meets the same
warm Envoys and the same simulators; the control plane is restarted per policy (each is a
different `serve` flag set) on the same xDS port, and a policy starts only when every Envoy
has acknowledged the new control plane's snapshot.

Heterogeneous on purpose: nodes a and b each carry three 2-rank replicas, node c two 4-rank
replicas (a node with more ranks), and a case can slow one replica down with the simulator's
`slowdown` fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server.bench.procs import Managed, wait_until
from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports

POOL = "qwen3"
ENVOY = str(Path(sys.executable).with_name("envoy"))


@dataclass(frozen=True)
class SimGroup:
    """One simulator process: `replicas` servers of `ranks` ranks on `nodes` (round robin)."""

    replicas: int
    ranks: int
    nodes: tuple[str, ...]


#: The fleet: 8 replicas, 20 ranks, 3 nodes; node-c has more ranks than the others.
GROUPS = (SimGroup(replicas=6, ranks=2, nodes=("node-a", "node-b")),
          SimGroup(replicas=2, ranks=4, nodes=("node-c",)))
#: Envoys by name -> the node they run on ("" for the central one, on no GPU node).
ENVOYS = {"node-a": "node-a", "node-b": "node-b", "node-c": "node-c", "central": ""}


def http_json(url: str, *, timeout_s: float = 2.0, body: Any = None) -> Any:
    """A tiny blocking JSON client for set-up and tear-down (not on the measured path)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


@dataclass
class Fleet:
    """Starts and owns every long-lived process; `stack` stops them on any exit."""

    workdir: Path
    stack: contextlib.ExitStack
    sim_args: Sequence[str]
    prometheus_interval_s: float = 5.0
    with_prometheus: bool = True
    replica_nodes: dict[str, str] = field(default_factory=dict)
    replica_ranks: dict[str, int] = field(default_factory=dict)
    envoy_urls: dict[str, str] = field(default_factory=dict)
    envoy_admins: dict[str, str] = field(default_factory=dict)
    prometheus_url: str = ""
    processes: dict[str, Managed] = field(default_factory=dict)
    cp: Managed | None = None
    #: Seconds from the last control plane's start to its /readyz, and to every Envoy's ACK.
    last_ready_s: float = 0.0
    last_acked_s: float = 0.0

    def __post_init__(self) -> None:
        self.xds_port, self.admin_port, self.listener_port = free_ports(3)
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.pools = self.workdir / "pools.yaml"

    def _start(self, name: str, args: Sequence[str]) -> Managed:
        process = Managed(name, args, self.workdir / f"{name}.log")
        self.stack.callback(process.stop)
        self.processes[name] = process
        return process

    def start(self) -> None:
        start_rank = 0
        replicas: list[dict[str, Any]] = []
        for i, group in enumerate(GROUPS):
            out = self.workdir / f"sim{i}-pools.yaml"
            sim = self._start(f"sim{i}", [
                sys.executable, "-m", "xds_server", "sim", "--port", "0",
                "--replicas", str(group.replicas), "--ranks", str(group.ranks),
                "--nodes", str(len(group.nodes)), "--node-names", ",".join(group.nodes),
                "--start-rank", str(start_rank),
                "--pools-out", str(out), "--seed", str(i), *self.sim_args])
            start_rank += group.replicas * group.ranks

            def written(path: Path = out, process: Managed = sim) -> bool:
                process.check_alive()
                return path.exists() and bool(yaml.safe_load(path.read_text()))

            wait_until(written, timeout_s=30, what=f"simulator {i}")
            replicas.extend(yaml.safe_load(out.read_text())["pools"][0]["replicas"])
        self.replica_nodes = {r["address"]: r["node"] for r in replicas}
        self.replica_ranks = {r["address"]: int(r.get("capacity", 1)) for r in replicas}
        tmp = self.pools.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"pools": [{"name": POOL, "replicas": replicas}]}))
        os.replace(tmp, self.pools)
        if self.with_prometheus:
            self._start_prometheus()

    def _start_prometheus(self) -> None:
        port = free_ports(1)[0]
        self.prometheus_url = f"http://127.0.0.1:{port}"
        interval = f"{int(self.prometheus_interval_s * 1000)}ms"
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "vllm", "static_configs": [
                {"targets": list(self.replica_nodes)}]}],
        }))
        process = self._start("prometheus", [
            "prometheus", f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])

        def ready() -> bool:
            process.check_alive()
            with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)

        wait_until(ready, timeout_s=30, what="prometheus ready")

    def _start_envoy(self, name: str, node: str) -> None:
        listener, admin = free_ports(2)
        config = self.workdir / f"envoy-{name}.yaml"
        config.write_text(yaml.safe_dump(build_bootstrap(
            xds_host="127.0.0.1", xds_port=self.xds_port, node=node, node_id=f"envoy-{name}",
            admin_port=admin, listener_port=listener)))
        self._start(f"envoy-{name}", [
            ENVOY, "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
            "--concurrency", "1", "--drain-time-s", "1"])
        self.envoy_urls[name] = f"http://127.0.0.1:{listener}"
        self.envoy_admins[name] = f"http://127.0.0.1:{admin}"

    def start_control_plane(self, name: str, flags: Sequence[str]) -> None:
        """A control plane with `flags`, ready when every Envoy ACKed its snapshot."""
        self.stop_control_plane()
        process = Managed(f"cp-{name}", [
            sys.executable, "-m", "xds_server", "serve", "--static", str(self.pools),
            "--xds-host", "127.0.0.1", "--xds-port", str(self.xds_port),
            "--admin-port", str(self.admin_port), "--listener-port", str(self.listener_port),
            "--listener-host", "127.0.0.1", *flags], self.workdir / f"cp-{name}.log")
        self.cp = process
        self.stack.callback(process.stop)
        began = time.monotonic()

        def ready() -> bool:
            process.check_alive()
            with urllib.request.urlopen(f"{self.admin}/readyz", timeout=2) as r:
                return bool(r.status == 200)

        self.last_ready_s = wait_until(ready, timeout_s=60, what=f"control plane {name}",
                                       interval_s=0.1) - began
        # Envoys start with the first control plane: one started with nothing to connect to
        # backs its reconnects off to tens of seconds.
        for envoy, node in ENVOYS.items():
            if envoy not in self.envoy_urls:
                self._start_envoy(envoy, node)

        def acked() -> bool:
            process.check_alive()
            state = http_json(f"{self.admin}/debug/state")
            envoys = state.get("envoys", [])
            return len(envoys) == len(ENVOYS) and all(
                len(e["acked"]) >= 4 and all(e["acked"].values()) and not e["nacked"]
                for e in envoys)

        self.last_acked_s = wait_until(
            acked, timeout_s=60, what=f"every Envoy to ACK control plane {name}",
            interval_s=0.2) - began

    def stop_control_plane(self) -> None:
        if self.cp is not None:
            self.cp.stop()
            self.cp = None

    def states(self) -> dict[str, Any]:
        """Every replica's `/sim/state`, blocking (set-up only)."""
        return {a: http_json(f"http://{a}/sim/state") for a in self.replica_nodes}

    def fault(self, address: str, faults: dict[str, Any]) -> None:
        http_json(f"http://{address}/sim/fault", body=faults)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the simulators, the Envoys, Prometheus, the control plane."""
        roles: dict[str, float] = {}
        running = [*self.processes.values(), *([self.cp] if self.cp else [])]
        for process in running:
            role = process.name.split("-")[0].rstrip("0123456789")
            with contextlib.suppress(Exception):
                roles[role] = roles.get(role, 0.0) + process.meter.usage().cpu_s
        return roles

    def check_alive(self) -> None:
        for process in self.processes.values():
            process.check_alive()


@contextlib.contextmanager
def instant_endpoint(workdir: Path) -> Iterator[str]:
    """A server that answers a streamed completion at once: the client's own latency floor."""
    port = free_ports(1)[0]
    process = Managed("instant", [sys.executable, "-m", "xds_server.bench.instant", str(port)],
                      workdir / "instant.log")
    try:
        def ready() -> bool:
            process.check_alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return bool(r.status == 200)

        wait_until(ready, timeout_s=20, what="instant endpoint")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()
