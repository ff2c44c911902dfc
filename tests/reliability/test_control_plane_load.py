"""Load on the control plane itself: many ADS streams come and go while the pools churn.

A real `serve` process; a pool file rewritten every ~100 ms (each generation has its own
replica ports, so an endpoint assignment names the generation it came from); light ADS
clients (xds_server/bench/adsclient.py), some connected throughout, most connecting and
disconnecting in a loop, state of the world and delta. Properties:
- no stream ever receives an endpoint assignment older than one it already had;
- once the churn stops, every connected stream holds the final generation;
- the server's memory does not grow per stream (RSS after warm-up vs end of a phase of
  streams alone, per connect), and it forgets every closed stream.
(Under churn alone RSS grows with each generation until the resource builders' bounded
memo caches fill: a cost per distinct state, not per stream, so it is reported, not bounded.)
The figures (streams, connects/s, RSS) are printed as `LOAD {...}` for the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from envoy.config.endpoint.v3 import endpoint_pb2

from tests.harness import ControlPlane, free_ports
from xds_server.bench.adsclient import AdsClient
from xds_server.xds import types

pytestmark = pytest.mark.reliability

BASE_PORT = 20000
CHURN_S = 12.0
WARMUP_S = 2.0
CONNECT_S = 8.0
LONG_LIVED = 8
CYCLING = 32


def write_generation(path: Path, gen: int) -> None:
    """Two nodes, two to four replicas; the ports say the generation."""
    replicas = [{"address": f"127.0.0.1:{BASE_PORT + gen}", "node": "node-a"},
                {"address": f"127.0.0.2:{BASE_PORT + gen}", "node": "node-b"}]
    replicas += [{"address": f"127.0.0.{3 + i}:{BASE_PORT + gen}", "node": "node-b"}
                 for i in range(gen % 3)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"pools": [{"name": "qwen3", "replicas": replicas}]}))
    os.replace(tmp, path)


def generation(payload: bytes) -> int | None:
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(payload)
    ports = [lb.endpoint.address.socket_address.port_value
             for group in cla.endpoints for lb in group.lb_endpoints]
    return max(ports) - BASE_PORT if ports else None


class CheckingClient(AdsClient):
    """Records, per endpoint assignment, the generations received, in order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keep_history=False, **kwargs)
        self.latest: dict[str, int] = {}
        self.regressions: list[str] = []

    def _on_response(self, response: Any) -> None:
        if response.type_url == types.ENDPOINT:
            if self.delta:
                items = [(r.name, r.resource.value) for r in response.resources]
            else:
                items = [("", r.value) for r in response.resources]
            for name, payload in items:
                cla_name = name or endpoint_pb2.ClusterLoadAssignment.FromString(
                    payload).cluster_name
                gen = generation(payload)
                if gen is None:
                    continue
                seen = self.latest.get(cla_name, -1)
                if gen < seen:
                    self.regressions.append(f"{cla_name}: {gen} after {seen}")
                self.latest[cla_name] = max(gen, seen)
        super()._on_response(response)


async def test_streams_churn_without_stale_resources_or_memory_growth(tmp_path: Path) -> None:
    pools = tmp_path / "pools.yaml"
    write_generation(pools, 0)
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0], extra=[
        "--metrics", "none", "--static-poll-interval-s", "0.05"])
    await asyncio.to_thread(cp.start)
    assert cp.proc is not None
    server = psutil.Process(cp.proc.pid)
    target = f"127.0.0.1:{cp.xds_port}"
    gen = 0
    connects = 0
    regressions: list[str] = []
    stop_cycling = asyncio.Event()
    rss: dict[str, int] = {"start": server.memory_info().rss}

    def client(i: int) -> CheckingClient:
        return CheckingClient(target=target, node_id=f"load-{i}",
                              node=random.choice(["", "node-a", "node-b"]), delta=i % 2 == 1)

    async def cycle(i: int) -> None:
        nonlocal connects
        rng = random.Random(i)
        while not stop_cycling.is_set():
            c = client(i)
            connects += 1
            task = asyncio.create_task(c.run())
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            regressions.extend(c.regressions)

    long_lived = [client(1000 + i) for i in range(LONG_LIVED)]
    tasks = [asyncio.create_task(c.run()) for c in long_lived]
    cyclers = [asyncio.create_task(cycle(i)) for i in range(CYCLING)]
    try:
        started = time.monotonic()
        while time.monotonic() - started < CHURN_S:
            gen += 1
            await asyncio.to_thread(write_generation, pools, gen)
            await asyncio.sleep(0.1)
        churned_s = time.monotonic() - started
        churn_connects = connects
        rss["churned"] = server.memory_info().rss
        # Churn stopped: every stream still connected converges to the last generation.
        final = [client(2000 + i) for i in range(4)]
        tasks += [asyncio.create_task(c.run()) for c in final]
        for c in long_lived + final:
            await c.wait_until(lambda c=c: bool(c.latest) and all(
                v == gen for v in c.latest.values()) and "qwen3" in c.latest, 30)
            regressions.extend(c.regressions)
        # Streams alone (the state still): what each one costs the server, after warm-up.
        await asyncio.sleep(WARMUP_S)
        rss["warm"], warm_connects = server.memory_info().rss, connects
        await asyncio.sleep(CONNECT_S)
        rss["end"], cycled = server.memory_info().rss, connects - warm_connects
        stop_cycling.set()
        await asyncio.gather(*cyclers)
        # The server notices the last cancellations a moment later: wait for the count to
        # settle (it must reach exactly the survivors), without blocking the clients' loop.
        deadline = time.monotonic() + 20
        while True:
            streams = cp.metric("hybridlb_xds_streams")
            envoys = len(cp.state()["envoys"])
            if streams == envoys == LONG_LIVED + 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        for t in tasks + cyclers:
            t.cancel()
        await asyncio.gather(*tasks, *cyclers, return_exceptions=True)
        await asyncio.to_thread(cp.stop)
    growth = rss["end"] - rss["warm"]
    figures = {"long_lived": LONG_LIVED, "cycling": CYCLING, "connects": connects,
               "connects_per_s": round(churn_connects / churned_s, 1), "generations": gen,
               "rss_start_mib": round(rss["start"] / 2**20, 1),
               "rss_after_churn_mib": round(rss["churned"] / 2**20, 1),
               "rss_warm_mib": round(rss["warm"] / 2**20, 1),
               "rss_end_mib": round(rss["end"] / 2**20, 1),
               "connects_measured": cycled,
               "growth_per_connect_bytes": round(growth / max(1, cycled)),
               "regressions": len(regressions)}
    print("LOAD", json.dumps(figures))
    assert regressions == []
    assert streams == LONG_LIVED + 4 and envoys == LONG_LIVED + 4  # closed ones forgotten
    assert cycled > 300  # enough streams for a per-stream leak to show
    # A stream's state on the server (per-type versions, nonces, names) is several KiB:
    # kept per connect, it would show here; allocator noise stays well below.
    assert growth < 2048 * cycled
