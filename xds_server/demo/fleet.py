"""The demo's processes: simulated vLLM replicas, Prometheus, the control plane, Envoys.

A demo that leaves an Envoy listening spoils the next demo and the tests on a shared
machine, so every process is owned here and stopped on every exit path: SIGTERM, then
SIGKILL after a grace. The children run in their own session (a Ctrl-C meant for the demo
must not kill an Envoy under requests still in flight) and are told by the kernel to die
with the demo (PR_SET_PDEATHSIG), which covers the one path no `finally` runs on: a
SIGKILL of the demo itself.

Ports come from the OS: the simulator binds port 0 and writes its addresses to its pool
file; the others get ports that were free a moment ago, so two demos, or a demo and the
tests, never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports

ENVOY = Path(sys.executable).with_name("envoy")
MODEL = "Qwen/Qwen3-0.6B"
POOL = "qwen3"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class FleetSettings:
    """What runs; the timing values make queues move at a rate two cores can drive."""

    nodes: int = 3
    replicas_per_node: int = 2
    #: DP ranks behind each replica (vLLM hybrid mode: one API server per node's ranks).
    ranks: int = 2
    #: Envoys on no node, in front of all of them (besides one Envoy per node).
    central_envoys: int = 1
    #: vLLM --max-num-seqs of every rank, and the room per rank the control plane assumes.
    max_num_seqs: int = 8
    #: Wall seconds per simulated second: the simulated GPUs run this many times slower than
    #: an H100, so that a load a small machine can generate (and stream) fills their queues.
    time_scale: float = 10.0
    #: Use Prometheus when `prometheus` is on PATH; False: the direct scrape always.
    prometheus: bool = True
    #: How often loads are read (Prometheus scrape and query, or the direct scrape).
    load_interval_s: float = 0.5
    #: Route through the ext_proc endpoint picker, hosted in the control plane.
    extproc: bool = True

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.replicas_per_node < 1 or self.ranks < 1:
            raise ValueError("nodes, replicas per node and ranks must be at least 1")
        if self.central_envoys < 0:
            raise ValueError("central Envoys must not be negative")


@dataclass(frozen=True)
class EnvoyInfo:
    name: str
    #: The node it runs on; empty for a central Envoy.
    node: str
    listener_port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}"


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ports: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.popen.pid, "ports": self.ports,
                "log": str(self.log), "returncode": self.popen.returncode}


class ChildExited(RuntimeError):
    """A process the demo needs is gone."""




#: Held back while a child is forked, so that a Ctrl-C cannot land between the fork and
#: the child's being recorded (a process nobody would stop).
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _child_setup(parent: int) -> Callable[[], None]:
    """Runs in the child before exec: die with the demo, take the stop signals again."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the demo died before prctl took effect
            os._exit(1)

    return setup


def _get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _answers(url: str) -> Callable[[], bool]:
    return lambda: _get(url)[0] == 200


class Fleet:
    """Starts everything (`start`), knows where it listens, stops it (`stop`, idempotent)."""

    def __init__(self, settings: FleetSettings, *, workdir: Path, logdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.logdir = logdir
        self.children: list[Child] = []
        #: replica address -> node, in the simulator's order.
        self.replicas: dict[str, str] = {}
        self.envoys: list[EnvoyInfo] = []
        self.admin_url = ""
        self.prometheus_url = ""

    @property
    def metrics_source(self) -> str:
        if self.prometheus_url:
            return f"Prometheus ({self.prometheus_url})"
        return "direct scrape of /metrics (no prometheus on PATH)"

    @property
    def nodes(self) -> list[str]:
        return sorted(set(self.replicas.values()))

    def start(self, progress: Callable[[str], None] = lambda _: None) -> None:
        s = self.settings
        pools = self.workdir / "pools.yaml"
        progress(f"starting {s.nodes * s.replicas_per_node} simulated vLLM replicas "
                 f"({s.ranks} ranks each) on {s.nodes} nodes")
        sim = self._spawn("sim", [
            sys.executable, "-m", "xds_server", "sim", "--port", "0", "--host", "127.0.0.1",
            "--replicas", str(s.nodes * s.replicas_per_node), "--nodes", str(s.nodes),
            "--ranks", str(s.ranks), "--max-num-seqs", str(s.max_num_seqs),
            "--time-scale", str(s.time_scale), "--model", MODEL, "--pool-name", POOL,
            "--pools-out", str(pools), "--seed", "1", "--drain-timeout-s", "5",
        ])
        self._wait(lambda: pools.exists(), 30, "the simulator's pool file", sim)
        doc = yaml.safe_load(pools.read_text())
        self.replicas = {r["address"]: r["node"] for r in doc["pools"][0]["replicas"]}
        sim.ports = [int(a.rsplit(":", 1)[1]) for a in self.replicas]

        # The rest start side by side (a control plane retries Prometheus, an Envoy retries
        # the control plane), which saves seconds of start-up on a small machine.
        load_flags = ["--metrics", "scrape", "--scrape-interval-s", str(s.load_interval_s)]
        prometheus = shutil.which("prometheus") if s.prometheus else None
        waits: list[tuple[Callable[[], bool], str, Child]] = []
        if prometheus:
            progress("starting Prometheus")
            child = self._start_prometheus(prometheus)
            waits.append((_answers(self.prometheus_url + "/-/ready"), "Prometheus", child))
            load_flags = ["--metrics", "auto", "--prometheus-url", self.prometheus_url,
                          "--prometheus-interval-s", str(s.load_interval_s),
                          "--scrape-interval-s", str(s.load_interval_s)]

        progress("starting the control plane")
        xds_port, admin_port, default_listener, picker_port = free_ports(4)
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        picker_flags = (["--extproc-port", str(picker_port), "--extproc-timeout-s", "0.5"]
                        if s.extproc else [])
        cp = self._spawn("control-plane", [
            sys.executable, "-m", "xds_server", "serve", "--static", str(pools),
            "--xds-host", "127.0.0.1", "--xds-port", str(xds_port),
            "--admin-port", str(admin_port), "--listener-host", "127.0.0.1",
            "--listener-port", str(default_listener), "--max-num-seqs", str(s.max_num_seqs),
            *load_flags, *picker_flags,
        ], ports=[xds_port, admin_port, *([picker_port] if s.extproc else [])])
        waits.append((_answers(self.admin_url + "/readyz"), "the control plane", cp))

        progress(f"starting {s.nodes + s.central_envoys} Envoys")
        names = [(f"envoy-{node}", node) for node in self.nodes]
        names += [(f"envoy-central{i + 1 if s.central_envoys > 1 else ''}", "")
                  for i in range(s.central_envoys)]
        envoys: list[EnvoyInfo] = []
        for name, node in names:
            listener, admin = free_ports(2)
            info = EnvoyInfo(name=name, node=node, listener_port=listener, admin_port=admin)
            config = self.workdir / f"{name}.yaml"
            config.write_text(yaml.safe_dump(build_bootstrap(
                xds_host="127.0.0.1", xds_port=xds_port, node=node, node_id=name,
                admin_port=admin, listener_port=listener,
            )))
            child = self._spawn(name, [
                str(ENVOY), "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
                "--concurrency", "1", "--drain-time-s", "1",
            ], ports=[listener, admin])
            # Routable, not just live: a request through it reaches a replica.
            waits.append((_answers(info.url + "/v1/models"), f"{name} to route", child))
            envoys.append(info)
        for predicate, what, child in waits:
            self._wait(predicate, 60, what, child)
        self.envoys = envoys
        progress("waiting for the first loads")
        self._wait(self._loads_known, 30, "loads in the control plane", cp)

    def _loads_known(self) -> bool:
        doc = json.loads(_get(self.admin_url + "/debug/state")[1])
        replicas = [r for pool in doc["pools"] for r in pool["replicas"]]
        return len(replicas) == len(self.replicas) and all(r["load"] for r in replicas)

    def _start_prometheus(self, binary: str) -> Child:
        (port,) = free_ports(1)
        interval = f"{round(self.settings.load_interval_s * 1000)}ms"
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            # Prometheus durations take no fractions: "500ms", not "0.5s".
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [{"job_name": "vllm",
                                "static_configs": [{"targets": list(self.replicas)}]}],
        }))
        self.prometheus_url = f"http://127.0.0.1:{port}"
        return self._spawn("prometheus", [
            binary, f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], ports=[port])

    def _spawn(self, name: str, args: list[str], ports: list[int] | None = None) -> Child:
        log = self.logdir / f"{name}.log"
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_child_setup(os.getpid()),
                )
            child = Child(name=name, popen=popen, log=log, ports=list(ports or []))
            self.children.append(child)
        finally:
            # A signal that came meanwhile is delivered here, with the child on the list.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return child

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, child: Child) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if child.popen.poll() is not None:
                raise ChildExited(f"{child.name} exited with {child.popen.returncode} while "
                                  f"waiting for {what}; see {child.log}")
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                   f"see {child.log}")
            time.sleep(0.1)

    def check(self) -> None:
        """Raise if a process died under the demo."""
        for child in self.children:
            if child.popen.poll() is not None:
                raise ChildExited(f"{child.name} exited with {child.popen.returncode}; "
                                  f"see {child.log}")

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM to all at once (Envoys first), SIGKILL to whoever outlives the grace."""
        order = sorted(self.children, key=lambda c: not c.name.startswith("envoy"))
        for child in order:
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.popen.terminate()
        deadline = time.monotonic() + grace_s
        for child in order:
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.popen.kill()
                child.popen.wait()
