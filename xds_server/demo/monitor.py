"""What the fleet looks like over time: true queues, the weights Envoy got, keep shares.

Queues come from the simulator's `/sim/state` (the truth at this instant, not the sample
the control plane acted on), weights and keep shares from the control plane's
`/debug/state` (what it published), so the plot shows the weights chasing the queues.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class ReplicaSample:
    running: int
    waiting: int
    #: The endpoint weight the control plane published; None before it had one.
    weight: int | None


@dataclass(frozen=True)
class Sample:
    #: Seconds since the monitor started.
    t_s: float
    replicas: dict[str, ReplicaSample]
    #: Envoy name -> per mille of its requests it keeps on its node (None: not connected).
    keep: dict[str, int | None]


@dataclass
class Monitor:
    replicas: list[str]
    admin_url: str
    envoys: list[str]
    pool: str
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    #: The control plane's last /debug/state document.
    state: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    #: `time.monotonic()` of the run's start: samples are dated from it.
    started: float = field(default_factory=time.monotonic)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            started = time.monotonic()
            await self.poll(session)
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))

    async def poll(self, session: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(
            self._json(session, self.admin_url + "/debug/state"),
            *(self._json(session, f"http://{a}/sim/state") for a in self.replicas),
        )
        state, sims = results[0], results[1:]
        if state:
            self.state = state
        weights: dict[str, int | None] = {}
        for pool in self.state.get("pools", []):
            if pool.get("name") == self.pool:
                weights = {r["address"]: r.get("weight") for r in pool.get("replicas", [])}
        replicas: dict[str, ReplicaSample] = {}
        previous = self.latest()
        for address, sim in zip(self.replicas, sims, strict=True):
            if sim is None:
                # Keep the line of the plot continuous through a missed poll.
                if previous is not None and address in previous.replicas:
                    replicas[address] = previous.replicas[address]
                continue
            ranks = sim.get("ranks", [])
            replicas[address] = ReplicaSample(
                running=sum(int(r["running"]) for r in ranks),
                waiting=sum(int(r["waiting"]) for r in ranks),
                weight=weights.get(address),
            )
        keep: dict[str, int | None] = dict.fromkeys(self.envoys)
        for envoy in self.state.get("envoys", []):
            if envoy.get("id") in keep:
                keep[envoy["id"]] = envoy.get("keep_per_mille", {}).get(self.pool)
        self.samples.append(Sample(t_s=time.monotonic() - self.started, replicas=replicas,
                                   keep=keep))

    async def _json(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                doc: dict[str, Any] = await response.json()
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.errors += 1
            return None
