"""One process hosting many simulated servers: start-up, pool file, SIGTERM drain.

Servers listen on consecutive ports from the first one (or each on a free port when it is 0)
and share one simulated clock. Replica i fronts global ranks
`start_rank + i * num_ranks ... + num_ranks - 1`, so ranks are numbered across the whole
simulated deployment as vLLM numbers them across nodes.

On SIGTERM (or SIGINT) every server fails readiness (`/health` 503) and answers new requests
with 503, the requests in flight run to completion (up to `drain_timeout_wall_s`), and the
process exits 0: what vLLM's API server does when Kubernetes stops a pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import string
from dataclasses import dataclass, field
from pathlib import Path

from xds_server.sim.engine import EngineSettings
from xds_server.sim.faults import Faults
from xds_server.sim.runner import ScaledClock
from xds_server.sim.server import ServerSettings, SimServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSettings:
    """Everything `hybridlb sim` runs."""

    server: ServerSettings = field(default_factory=ServerSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    faults: Faults = field(default_factory=Faults)
    replicas: int = 1
    nodes: int = 1
    node_names: tuple[str, ...] = ()
    """Names of the nodes, in order; default node-a, node-b, ... (`node_name`)."""
    pool_name: str = "qwen3"
    pools_out: Path | None = None
    time_scale: float = 1.0
    """Wall seconds per simulated second (0.1 runs ten times faster than real time)."""
    drain_timeout_wall_s: float = 30.0


def node_name(index: int) -> str:
    """node-a, node-b, ..., node-z, node-aa, node-ab, ..."""
    letters = string.ascii_lowercase
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = letters[rest] + name
    return f"node-{name}"


def pools_yaml(*, pool_name: str, addresses: list[str], nodes: list[str], capacity: int,
               dp_ranks: list[int] | None = None) -> str:
    """The static pool file for `hybridlb serve`: each replica with its node and, when it
    fronts several ranks, the first global rank it fronts (`dp_rank`)."""
    lines = ["pools:", f"  - name: {pool_name}", "    replicas:"]
    for index, (address, node) in enumerate(zip(addresses, nodes, strict=True)):
        lines += [
            f"      - address: {address}",
            f"        node: {node}",
            f"        capacity: {capacity}",
        ]
        if dp_ranks is not None and capacity > 1:
            lines.append(f"        dp_rank: {dp_ranks[index]}")
    return "\n".join(lines) + "\n"


class SimHost:
    """Builds, starts, drains and closes the simulated servers of one process."""

    def __init__(self, settings: HostSettings) -> None:
        self.settings = settings
        self.clock = ScaledClock(settings.time_scale)
        base = settings.server
        self.servers = [
            SimServer(
                dataclasses.replace(
                    base,
                    port=base.port + index if base.port else 0,
                    start_rank=base.start_rank + index * base.num_ranks,
                    seed=None if base.seed is None else base.seed + index,
                    node=self.node_of(index),
                ),
                settings.engine,
                clock=self.clock,
                faults=settings.faults,
            )
            for index in range(settings.replicas)
        ]

    def node_of(self, index: int) -> str:
        """The node of the index-th server: replicas go round robin over the nodes."""
        position = index % max(1, self.settings.nodes)
        names = self.settings.node_names
        return names[position] if position < len(names) else node_name(position)

    async def start(self) -> None:
        for server in self.servers:
            await server.start()
        peers = {server.address: server for server in self.servers}
        for server in self.servers:
            server.peers = peers
        if self.settings.pools_out is not None:
            # Written once every server listens, and renamed into place, so whoever
            # watches for the file never reads half of it or an address not yet open.
            target = self.settings.pools_out
            partial = target.with_name(f".{target.name}.partial")
            partial.write_text(
                pools_yaml(
                    pool_name=self.settings.pool_name,
                    addresses=[server.address for server in self.servers],
                    nodes=[server.settings.node for server in self.servers],
                    capacity=self.settings.server.num_ranks,
                    dp_ranks=[server.runners[0].global_rank for server in self.servers],
                )
            )
            partial.replace(target)

    async def drain(self) -> bool:
        """Fail readiness everywhere and wait for in-flight requests; False on timeout."""
        for server in self.servers:
            server.begin_drain()
        try:
            async with asyncio.timeout(self.settings.drain_timeout_wall_s):
                for server in self.servers:
                    await server.wait_idle()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for server in self.servers:
            await server.close()

    async def run(self, *, stop: asyncio.Event | None = None) -> int:
        """Serve until SIGTERM/SIGINT (or `stop`), drain, close. Returns the exit code."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        for server in self.servers:
            first, last = server.runners[0].global_rank, server.runners[-1].global_rank
            log.info("simulated vLLM on %s (engines %d-%d)", server.address, first, last)
        print(f"hybridlb sim: ready on {', '.join(s.address for s in self.servers)}",
              flush=True)
        try:
            async with asyncio.TaskGroup() as group:
                loops = [group.create_task(coro) for server in self.servers
                         for coro in server.engine_loops()]
                await stop.wait()
                log.info("stopping: draining %d servers", len(self.servers))
                drained = await self.drain()
                if not drained:
                    log.warning("drain timed out; closing with requests in flight")
                await self.close()
                for task in loops:
                    task.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
        return 0
