"""Drives one rank's `Engine` against a clock: the event-driven engine loop.

The loop sleeps only while a step is in flight and blocks on an event when the rank is idle,
so an idle rank costs no CPU and one core can host dozens of ranks. Steps are laid end to end
on the simulated timeline (each starts where the previous one was planned to end), so a late
wake-up is caught up on the next steps instead of stretching every later step (this is also
what keeps high speed-ups honest: a 2 ms step at `--time-scale 0.05` is a 0.1 ms sleep, below
what the event loop can time). When the loop falls behind by more than `MAX_CATCH_UP_WALL_S`
of wall time (an overloaded core), the timeline restarts from now instead.
How late each step really ended is kept for the benchmark (`step_log`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from xds_server.sim.engine import Engine, SimRequest

STEP_LOG_LENGTH = 20_000
MAX_CATCH_UP_WALL_S = 0.05


class Clock(Protocol):
    """Simulated time: `now` in simulated seconds, `sleep_until` a simulated instant."""

    time_scale: float

    def now(self) -> float: ...

    async def sleep_until(self, deadline_s: float) -> None: ...


class ScaledClock:
    """Simulated seconds = wall seconds / `time_scale` (0.1 runs ten times faster)."""

    def __init__(self, time_scale: float) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) / self.time_scale

    async def sleep(self, duration_s: float) -> None:
        await self.sleep_until(self.now() + duration_s)

    async def sleep_until(self, deadline_s: float) -> None:
        wall_delay = self._origin + deadline_s * self.time_scale - time.monotonic()
        if wall_delay > 0:
            await asyncio.sleep(wall_delay)


class RankRunner:
    """One simulated DP rank: an engine, its loop, and the hooks the server reads."""

    def __init__(
        self,
        *,
        engine: Engine,
        clock: Clock,
        global_rank: int,
        slowdown: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.global_rank = global_rank
        self._slowdown = slowdown
        self._wake = asyncio.Event()
        # (planned step length, how late it ended), both in simulated seconds.
        self.step_log: deque[tuple[float, float]] = deque(maxlen=STEP_LOG_LENGTH)

    def submit(self, request: SimRequest) -> None:
        self.engine.add(request, self.clock.now())
        self._wake.set()

    def abort(self, request: SimRequest) -> None:
        self.engine.abort(request, self.clock.now())

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            start_s = self.clock.now()
            while (plan := self.engine.plan_step(start_s, slowdown=self._slowdown())) is not None:
                deadline_s = start_s + plan.duration_s
                await self.clock.sleep_until(deadline_s)
                self.engine.complete_step(plan, deadline_s)
                now_s = self.clock.now()
                lateness_s = now_s - deadline_s
                self.step_log.append((plan.duration_s, lateness_s))
                caught_up = lateness_s * self.clock.time_scale <= MAX_CATCH_UP_WALL_S
                start_s = deadline_s if caught_up else now_s
