"""Hostile clients (issue 18): each attack, bounded, against `serve` while a real Envoy
carries a steady trickle of requests.

Each test runs one attack on loopback until it has sent what it set out to (or a memory or
time bound it sets itself), measures how long five config updates take to reach the real
Envoy meanwhile, and asserts the issue's targets: `serve`'s RSS grows < 100 MiB, its log
< 1 MB, no request of the trickle fails, and updates reach Envoy in < 0.5 s. On a shared
2-core machine (load 8 while these ran) a single update varies by a few tenths of a second
whatever serve does, so the update target holds for the median of the five, and none may
take a second (the attacks made all of them take 1.3-2.1 s before). Each writes one
`HOSTILE {...}` line of its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from tests.harness import (
    ControlPlane,
    Envoy,
    Traffic,
    Upstreams,
    free_ports,
    running,
    wait_for,
    write_pools,
)
from xds_server.bench.adsclient import AdsClient
from xds_server.logsafe import MAX_CHARS
from xds_server.xds import types
from xds_server.xds.server import NODE_METADATA_KEY, SERVICE

pytestmark = [pytest.mark.reliability, pytest.mark.envoy]

MIB = 2**20
#: The issue's targets.
MAX_RSS_GROWTH = 100 * MIB
MAX_LOG_BYTES = 1_000_000
MAX_UPDATE_S = 0.5
#: No single update may take this long (see the module docstring).
MAX_ANY_UPDATE_S = 1.0
#: An attack that grows `serve` past this is stopped: the test has failed by then, and the
#: machine is shared.
ABORT_RSS_GROWTH = 300 * MIB


@dataclass
class Stack:
    workdir: Path
    pools: Path
    addresses: list[str]
    cp: ControlPlane
    envoy: Envoy


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("hostile")
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = workdir / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a")])
    cp = ControlPlane(workdir, pools, listener_port=free_ports(1)[0], extra=["--metrics", "none"],
                      source=["--static", str(pools), "--static-poll-interval-s", "0.05"])
    envoy = Envoy(workdir, xds_port=cp.xds_port)
    with running(Upstreams(workdir, ports), cp, envoy):
        wait_for(lambda: addresses[0] in httpx.get(envoy.admin + "/clusters").text, 30,
                 "Envoy has the first replica")
        yield Stack(workdir, pools, addresses, cp, envoy)


@dataclass
class Figures:
    attack: str
    sent: int
    rss_growth_mib: float
    log_bytes: int
    update_s: list[float]
    requests: int
    failed: int


class RssPeak:
    """The highest RSS of a process while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.before = self._process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _update(stack: Stack, present: bool) -> float:
    """Add or remove the second replica; seconds until the real Envoy shows it."""
    members = [(stack.addresses[0], "node-a")] + ([(stack.addresses[1], "node-b")]
                                                   if present else [])
    started = time.monotonic()
    write_pools(stack.pools, members)
    while (stack.addresses[1] in httpx.get(stack.envoy.admin + "/clusters").text) != present:
        if time.monotonic() - started > 20:
            raise TimeoutError("the update never reached Envoy")
        time.sleep(0.005)
    return time.monotonic() - started


class Attack:
    """An attack run in its own thread and event loop; `sent` counts what it sent, and
    `engaged` is set once it is under way."""

    def __init__(self, run: Callable[[Attack], Any]) -> None:
        self.sent = 0
        self.engaged = threading.Event()
        self.stop = threading.Event()
        self.rss: RssPeak | None = None
        self._run = run
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run(self))
        except BaseException as exc:  # reported by the test, not lost in the thread
            self._error = exc
        finally:
            self.engaged.set()

    def wait_done(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def over_budget(self) -> bool:
        return self.stop.is_set() or (self.rss is not None
                                      and self.rss.growth > ABORT_RSS_GROWTH)

    def __enter__(self) -> Attack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the attack did not stop"
        if self._error is not None and not isinstance(self._error, grpc.aio.AioRpcError):
            raise self._error


def under_attack(stack: Stack, name: str, run: Callable[[Attack], Any],
                 *, during: bool = True) -> Figures:
    """Run the attack to its end beside the trickle; measure updates while it runs (or,
    `during=False`, after it has done its harm: claimed views stay)."""
    assert stack.cp.proc is not None
    log_before = stack.cp.log.stat().st_size
    with Traffic(stack.envoy.url, interval_s=0.02) as traffic, \
            RssPeak(stack.cp.proc.pid) as rss, Attack(run) as attack:
        attack.rss = rss
        assert attack.engaged.wait(120), "the attack never got going"
        if not during:
            attack.wait_done(300)
        updates = [_update(stack, present) for present in (True, False, True, False, True)]
        _update(stack, False)
        attack.wait_done(120)  # its whole run, which bounds itself
        wait_for(lambda: sum(traffic.served.values()) > 10, 10, "trickle requests")
    figures = Figures(
        attack=name, sent=attack.sent, rss_growth_mib=round(rss.growth / MIB, 1),
        log_bytes=stack.cp.log.stat().st_size - log_before,
        update_s=[round(u, 3) for u in updates], requests=sum(traffic.served.values()),
        failed=len(traffic.failures))
    print("HOSTILE", json.dumps(asdict(figures)))
    assert stack.cp.alive()
    assert traffic.failures == []
    return figures


def assert_targets(figures: Figures) -> None:
    assert figures.rss_growth_mib * MIB < MAX_RSS_GROWTH, figures
    assert figures.log_bytes < MAX_LOG_BYTES, figures
    assert statistics.median(figures.update_s) < MAX_UPDATE_S, figures
    assert max(figures.update_s) < MAX_ANY_UPDATE_S, figures


# --- the clients ------------------------------------------------------------------------


def _node(node_id: str, node: str = "", listener_port: int | None = None) -> base_pb2.Node:
    meta: dict[str, Any] = {"node": node}
    if listener_port is not None:
        meta["listener_port"] = listener_port
    metadata = struct_pb2.Struct()
    metadata.update({NODE_METADATA_KEY: meta})
    return base_pb2.Node(id=node_id, metadata=metadata)


@contextlib.asynccontextmanager
async def _stream(port: int, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """A raw SotW ADS call: requests as bytes; responses as bytes, read only if asked."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE}/StreamAggregatedResources",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(requests)
        try:
            yield call
        finally:
            call.cancel()


# --- the attacks ------------------------------------------------------------------------


def test_huge_node_ids_on_repeated_requests_do_not_flood_the_log(stack: Stack) -> None:
    """Streams with a 1 MB node id, each sending 300 requests for a type the server does not
    serve (each logged a warning with the node id): 3,000 requests, ~3 GB of log before."""
    big = _node("n" * 1_000_000)
    first = discovery_pb2.DiscoveryRequest(node=big, type_url="type.example/nope")
    again = discovery_pb2.DiscoveryRequest(type_url="type.example/nope").SerializeToString()

    async def run(attack: Attack) -> None:
        for _ in range(10):
            done = asyncio.Event()

            async def requests(done: asyncio.Event = done) -> AsyncIterator[bytes]:
                yield first.SerializeToString()
                for _ in range(299):
                    attack.sent += 1
                    yield again
                done.set()
                await asyncio.Event().wait()

            async with _stream(stack.cp.xds_port, requests()):
                await done.wait()
                attack.engaged.set()
                # Until the server has read them all (it answers none: an unsupported type).
                await asyncio.sleep(0.2)
            if attack.over_budget():
                return

    suppressed_before = stack.cp.metric("hybridlb_log_suppressed_total")
    figures = under_attack(stack, "huge node id log flood", run)
    assert_targets(figures)
    assert stack.cp.metric("hybridlb_log_suppressed_total") > suppressed_before


def test_a_nack_message_cannot_forge_a_log_line_or_grow_debug_state(stack: Stack) -> None:
    """An Envoy-like client NACKs every update (8 NACKs) with a message holding a newline and
    a fake log line, then 100 KB more; the log gets it escaped on the NACK's own line."""
    forged = ("no\n2026-01-01 00:00:00,000 ERROR xds_server.app: FORGED-LINE "
              + "x" * 100_000)

    async def run(attack: Attack) -> None:
        def reject(type_url: str, names: list[str]) -> str:
            attack.sent += 1
            return forged

        client = AdsClient(target=f"127.0.0.1:{stack.cp.xds_port}", node_id="nacker",
                           reject=reject)
        task = asyncio.create_task(client.run())
        try:
            await client.wait_until(lambda: bool(client.received), 20)
            attack.engaged.set()
            # The updates the test makes meanwhile are pushed, and NACKed.
            deadline = time.monotonic() + 30
            while attack.sent < 8 and time.monotonic() < deadline and not attack.over_budget():
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task

    nacks_before = stack.cp.metric("hybridlb_xds_nacks_total")
    log_start = stack.cp.log.stat().st_size
    figures = under_attack(stack, "NACK newline forgery", run)
    assert_targets(figures)
    assert stack.cp.metric("hybridlb_xds_nacks_total") > nacks_before
    with stack.cp.log.open("rb") as f:
        f.seek(log_start)
        lines = f.read().decode(errors="replace").splitlines()
    forged_lines = [ln for ln in lines if "FORGED-LINE" in ln]
    assert forged_lines, "the NACK was not logged at all"
    assert all("rejected" in ln and "no\\n2026" in ln for ln in forged_lines), forged_lines[:2]
    assert all(len(ln) < 4 * MAX_CHARS for ln in forged_lines)


def test_debug_state_under_concurrent_readers_and_big_node_ids(stack: Stack) -> None:
    """Four streams with 512 KiB node ids (and 400 KiB node names) held open while 200
    readers fetch /debug/state over and over: each reply used to copy every id."""

    async def hold(attack: Attack, i: int, ready: asyncio.Event) -> None:
        client = AdsClient(target=f"127.0.0.1:{stack.cp.xds_port}",
                           node_id=f"{i}" + "i" * 512 * 1024, node=f"{i}" + "n" * 400_000)
        task = asyncio.create_task(client.run())
        await client.wait_until(lambda: types.CLUSTER in client.held, 20)
        ready.set()
        try:
            while not attack.over_budget():
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task

    longest: list[int] = [0]

    async def read(attack: Attack, client: httpx.AsyncClient) -> None:
        for _ in range(40):
            if attack.over_budget():
                return
            doc = (await client.get(stack.cp.admin + "/debug/state")).json()
            attack.sent += 1
            longest[0] = max([longest[0], *(len(e["id"]) + len(e["node"])
                                            for e in doc["envoys"])])

    async def run(attack: Attack) -> None:
        readies = [asyncio.Event() for _ in range(4)]
        holders = [asyncio.create_task(hold(attack, i, r)) for i, r in enumerate(readies)]
        await asyncio.gather(*(r.wait() for r in readies))
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            attack.engaged.set()
            await asyncio.gather(*(read(attack, client) for _ in range(200)))
        attack.stop.set()
        await asyncio.gather(*holders)

    figures = under_attack(stack, "/debug/state readers, big node ids", run)
    assert_targets(figures)
    assert figures.sent > 0
    assert 0 < longest[0] < 2 * (MAX_CHARS + 30)


def test_delta_reconnects_with_made_up_resource_versions(stack: Stack) -> None:
    """Four clients reconnecting for 10 s, each new delta stream's first request claiming
    10,000 made-up resource versions (the most `--xds-max-resource-names` lets through): the
    server diffs and removes each of them. Looped with 200,000, it made every pick time
    out; 45,000 (what fits in the 1 MiB receive limit) took updates to 0.59 s."""
    versions = {f"made-up-{i:06d}": "v1" for i in range(10_000)}
    first = discovery_pb2.DeltaDiscoveryRequest(
        node=_node("delta-looper"), type_url=types.CLUSTER,
        initial_resource_versions=versions).SerializeToString()
    assert len(first) < 1024 * 1024

    async def loop(attack: Attack, deadline: float) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.cp.xds_port}") as channel:
            while time.monotonic() < deadline and not attack.over_budget():
                async def requests() -> AsyncIterator[bytes]:
                    yield first
                    await asyncio.Event().wait()

                call = channel.stream_stream(
                    f"/{SERVICE}/DeltaAggregatedResources", request_serializer=lambda b: b,
                    response_deserializer=lambda b: b)(requests())
                with contextlib.suppress(grpc.aio.AioRpcError, StopAsyncIteration):
                    await call.read()  # the answer: every made-up name removed
                call.cancel()
                attack.sent += 1
                attack.engaged.set()

    async def run(attack: Attack) -> None:
        deadline = time.monotonic() + 10
        await asyncio.gather(*(loop(attack, deadline) for _ in range(4)))

    assert_targets(under_attack(stack, "delta reconnects, 10,000 made-up versions", run))


def test_a_flood_of_big_requests_from_a_client_that_never_reads(stack: Stack) -> None:
    """One stream that never reads a response and sends CDS requests as fast as gRPC lets
    it, for at most 15 s or until serve has grown 300 MiB: by turns every cluster (a
    wildcard) and 10,000 made-up names (the most a request may name), so that each asks
    for an answer, which the server cannot write once the client's window is full."""
    names = [f"r{i:06d}" for i in range(10_000)]
    wildcard = discovery_pb2.DiscoveryRequest(node=_node("flooder"), type_url=types.CLUSTER)
    big = discovery_pb2.DiscoveryRequest(type_url=types.CLUSTER,
                                         resource_names=names).SerializeToString()

    async def run(attack: Attack) -> None:
        deadline = time.monotonic() + 15

        async def requests() -> AsyncIterator[bytes]:
            while time.monotonic() < deadline and not attack.over_budget():
                attack.sent += 1
                if attack.sent == 20:
                    attack.engaged.set()
                yield wildcard.SerializeToString() if attack.sent % 2 else big
            attack.engaged.set()
            await asyncio.Event().wait()

        async with _stream(stack.cp.xds_port, requests()):
            while time.monotonic() < deadline and not attack.over_budget():
                await asyncio.sleep(0.05)

    assert_targets(under_attack(stack, "non-reading flood of big requests", run))


def test_thousands_of_claimed_views_cost_nothing(stack: Stack) -> None:
    """Streams that each claim a made-up node and listener port, take their listener, and
    leave: 5,000 views. Updates afterwards (a replica added or removed: shared resources
    change) must still reach the real Envoy in time, and the views not pile up in memory.
    (An update that changes only per-view resources rebuilds every known view: issue 18's
    views keyed by what differs cover that path.)"""

    async def claim(attack: Attack, first: int) -> None:
        for i in range(first, 5_000, 8):
            if attack.over_budget():
                return
            client = AdsClient(target=f"127.0.0.1:{stack.cp.xds_port}", node_id=f"fake-{i}",
                               node=f"fake-node-{i}", listener_port=20_000 + i % 40_000)
            task = asyncio.create_task(client.run())
            try:
                await client.wait_until(lambda c=client: types.LISTENER in c.held, 20)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            attack.sent += 1

    async def run(attack: Attack) -> None:
        attack.engaged.set()
        await asyncio.gather(*(claim(attack, k) for k in range(8)))

    figures = under_attack(stack, "5,000 claimed views", run, during=False)
    assert figures.sent == 5_000
    assert_targets(figures)
