"""Real processes for integration tests: the control plane, Envoy, echo upstreams.

Every process is started by the test module that needs it and stopped by it, on every path.
Ports come from the OS (bind to 0), so tests and a demo can share a machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports

ENVOY = str(Path(sys.executable).with_name("envoy"))
HERE = Path(__file__).parent




def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or predicate}")


class Process:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self._out = out
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ControlPlane(Process):
    def __init__(self, workdir: Path, pools: Path | None, *, listener_port: int,
                 name: str = "cp", extra: list[str] | None = None,
                 source: list[str] | None = None) -> None:
        """`source` replaces the static pool file's flags (e.g. `--kubernetes ...`)."""
        self.xds_port, self.admin_port = free_ports(2)
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        if source is None:
            assert pools is not None
            source = ["--static", str(pools), "--static-poll-interval-s", "0.2"]
        super().__init__(
            [sys.executable, "-m", "xds_server", "serve", *source,
             "--xds-host", "127.0.0.1", "--xds-port", str(self.xds_port),
             "--admin-port", str(self.admin_port), "--listener-port", str(listener_port),
             "--listener-host", "127.0.0.1", *(extra or [])],
            workdir / f"{name}.log",
        )

    def start(self) -> None:
        super().start()
        wait_for(lambda: httpx.get(f"{self.admin}/readyz").status_code == 200, 20,
                 "control plane ready")

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"{self.admin}/debug/state").json()
        return doc

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        text = httpx.get(f"{self.admin}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total


class Envoy(Process):
    def __init__(self, workdir: Path, *, xds_port: int, node: str = "", delta: bool = False,
                 name: str = "envoy", stats: bool = False,
                 bootstrap: dict[str, Any] | None = None) -> None:
        """`stats`: also the bootstrap's stats listener (`--stats-port`), at `stats_port`;
        `bootstrap`: more `build_bootstrap` arguments (`more_xds`, `xds_tls`)."""
        self.listener_port, self.admin_port, stats_port = free_ports(3)
        self.stats_port = stats_port if stats else None
        self.url = f"http://127.0.0.1:{self.listener_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(build_bootstrap(
            xds_host="127.0.0.1", xds_port=xds_port, node=node, node_id=name,
            admin_port=self.admin_port, listener_port=self.listener_port, delta=delta,
            stats_port=self.stats_port, stats_host="127.0.0.1", **(bootstrap or {}),
        )))
        super().__init__(
            [ENVOY, "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
             "--concurrency", "1", "--drain-time-s", "1"],
            workdir / f"{name}.log",
        )

    def start(self) -> None:
        super().start()
        wait_for(lambda: httpx.get(f"{self.admin}/ready").status_code == 200, 30,
                 "envoy ready")

    def endpoint_weights(self, cluster: str) -> dict[str, int]:
        """`address -> weight` of a cluster, from Envoy's admin /clusters."""
        weights: dict[str, int] = {}
        for line in httpx.get(f"{self.admin}/clusters").text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "weight":
                weights[parts[1]] = int(parts[3])
        return weights


class Upstreams(Process):
    """Echo servers that say who they are (`x-hybridlb-replica`), one process for all."""

    def __init__(self, workdir: Path, ports: list[int], name: str = "upstreams") -> None:
        self.ports = ports
        super().__init__([sys.executable, str(HERE / "echo_upstream.py"), *map(str, ports)],
                         workdir / f"{name}.log")

    def start(self) -> None:
        super().start()
        for port in self.ports:
            wait_for(lambda p=port: httpx.get(f"http://127.0.0.1:{p}/health").status_code == 200,
                     10, f"upstream {port}")


def write_pools(path: Path, replicas: list[tuple[str, str]], pool: str = "qwen3",
                extra_pools: dict[str, list[tuple[str, str]]] | None = None) -> None:
    """Write a static pool file atomically (rename), as a ConfigMap update would land."""
    pools = {pool: replicas, **(extra_pools or {})}
    doc = {"pools": [
        {"name": name, "replicas": [{"address": a, "node": n} for a, n in members]}
        for name, members in pools.items()
    ]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


class Traffic:
    """Requests in a background thread until stopped; records who answered and failures."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 interval_s: float = 0.005) -> None:
        self.url = url
        self.headers = headers or {}
        self.interval_s = interval_s
        self.served: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url + "/v1/models", headers=self.headers)
                    if r.status_code == 200:
                        self.served[r.headers.get("x-hybridlb-replica", "?")] += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(self.interval_s)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def served_by(url: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    counts: Counter[str] = Counter()
    with httpx.Client(timeout=5.0) as client:
        for _ in range(n):
            r = client.get(url + "/v1/models", headers=headers or {})
            r.raise_for_status()
            counts[r.headers["x-hybridlb-replica"]] += 1
    return counts


@contextlib.contextmanager
def running(*procs: Process) -> Iterator[None]:
    started: list[Process] = []
    try:
        for p in procs:
            # Before start returns: one that was spawned but never got ready is stopped too.
            started.append(p)
            p.start()
        yield
    finally:
        for p in reversed(started):
            p.stop()


class Sim(Process):
    """`hybridlb sim`: simulated vLLM servers on free ports; `addresses` once started."""

    def __init__(self, workdir: Path, *, replicas: int, nodes: int = 1, ranks: int = 1,
                 extra: list[str] | None = None, name: str = "sim") -> None:
        self.pools = workdir / f"{name}-pools.yaml"
        self.addresses: list[str] = []
        self.nodes: dict[str, str] = {}
        super().__init__(
            [sys.executable, "-m", "xds_server", "sim", "--port", "0",
             "--replicas", str(replicas), "--nodes", str(nodes), "--ranks", str(ranks),
             "--pools-out", str(self.pools), *(extra or [])],
            workdir / f"{name}.log",
        )

    def start(self) -> None:
        self.pools.unlink(missing_ok=True)
        super().start()

        def loaded() -> bool:
            doc = yaml.safe_load(self.pools.read_text())
            replicas = doc["pools"][0]["replicas"]
            self.addresses = [r["address"] for r in replicas]
            self.nodes = {r["address"]: r["node"] for r in replicas}
            return bool(self.addresses)

        wait_for(loaded, 20, "simulator pools file")

    def fault(self, address: str, **faults: Any) -> None:
        httpx.post(f"http://{address}/sim/fault", json=faults).raise_for_status()

    def queues(self, address: str) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"http://{address}/sim/state").json()
        return doc


PROMETHEUS = shutil.which("prometheus")


class Prometheus(Process):
    """Debian's Prometheus scraping the given targets every `interval_s`."""

    def __init__(self, workdir: Path, targets: list[str], *, interval_s: float = 1.0,
                 name: str = "prometheus", port: int | None = None,
                 scrape_configs: list[dict[str, Any]] | None = None) -> None:
        """`scrape_configs` replaces the one job scraping `targets`; `port`: a port chosen
        beforehand, for a control plane that must know the URL before Prometheus exists."""
        assert PROMETHEUS is not None
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / f"{name}.yml"
        config.write_text(yaml.safe_dump({
            # Prometheus durations take no fractions: "500ms", not "0.5s".
            "global": {"scrape_interval": f"{int(interval_s * 1000)}ms",
                       "scrape_timeout": f"{int(interval_s * 1000)}ms"},
            "scrape_configs": scrape_configs or [
                {"job_name": "vllm", "static_configs": [{"targets": targets}]}],
        }))
        super().__init__(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / name}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            workdir / f"{name}.log",
        )

    def start(self) -> None:
        super().start()
        wait_for(lambda: httpx.get(f"{self.url}/-/ready").status_code == 200, 30,
                 "prometheus ready")
