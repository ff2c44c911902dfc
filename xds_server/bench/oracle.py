"""The benchmark's oracle: a client that knows every rank's true queue when it sends.

BENCH.md asks for the practical limit of routing, not a strawman: a client-side
join-shortest-expected-wait router that reads each simulator's `/sim/state` at the instant
of each request, pins the best rank with vLLM's `X-data-parallel-rank` header, and sends
straight to the replica with no proxy in the path. What it cannot see is the request it sent
a moment ago that is still in the API server's front end (not yet queued on a rank), so it
counts its own recent picks until they become visible, as vLLM's DP balancer does.

`choose` is pure (tested); `OracleReplayer` is the same open-loop client as
`workload.Replayer`, except that it routes each request itself, and its latency clock
reports nothing of the time it spends deciding: it stands for the practical limit, and on a
shared 2-core machine eight `/sim/state` reads in Python take tens of milliseconds that a
real router with a push feed would not pay. The decision time is recorded and reported.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp

from xds_server.workload import Arrival, Replayer

#: vLLM's header that pins a request to one of the API server's local ranks.
DP_RANK_HEADER = "X-data-parallel-rank"


@dataclass(frozen=True)
class RankQueue:
    """One rank's true queue as `/sim/state` reports it, with its slowdown."""

    address: str
    rank: int
    running: int
    waiting: int
    max_num_seqs: int
    slowdown: float = 1.0


def ranks_from_state(address: str, state: Mapping[str, Any]) -> list[RankQueue]:
    """The ranks of one replica from its `/sim/state` document."""
    faults = state.get("faults") or {}
    # A rank's own slowdown where the simulator gives one (a fault can slow a single rank).
    replica = float(faults.get("slowdown", 1.0) or 1.0)
    return [
        RankQueue(address=address, rank=int(r["rank"]), running=int(r["running"]),
                  waiting=int(r["waiting"]), max_num_seqs=int(r["max_num_seqs"]),
                  slowdown=float(r.get("slowdown", replica) or replica))
        for r in state.get("ranks", ())
    ]


def expected_wait(queue: RankQueue, pending: int = 0) -> float:
    """Work ahead of a new request, in units of one slot's service time.

    Requests ahead (running, waiting, and our own picks not yet visible) over the slots that
    serve them, times how slow the rank is: a free fast rank scores lowest, a free slow rank
    ranks behind a fast one with the same queue, and a full rank's score grows with its line.
    """
    ahead = queue.running + queue.waiting + pending + 1
    return queue.slowdown * ahead / max(1, queue.max_num_seqs)


def choose(queues: Sequence[RankQueue], pending: Mapping[tuple[str, int], int],
           rng: random.Random) -> RankQueue:
    """The rank with the shortest expected wait; ties broken at random (no herding on one)."""
    if not queues:
        raise ValueError("no ranks to choose from")
    scored = [(expected_wait(q, pending.get((q.address, q.rank), 0)), q) for q in queues]
    best = min(score for score, _ in scored)
    return rng.choice([q for score, q in scored if score <= best + 1e-9])


@dataclass
class OracleReplayer(Replayer):
    """`Replayer` that routes each request itself, to the rank `choose` picks."""

    addresses: Sequence[str] = ()
    #: Wall seconds a sent request stays invisible in `/sim/state` (the front end's delay).
    visible_after_s: float = 0.1
    seed: int = 0
    #: Wall seconds each decision took (reading every replica's state, then choosing).
    decision_s: list[float] = field(default_factory=list)
    _pending: Counter[tuple[str, int]] = field(default_factory=Counter)
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    async def _queues(self, session: aiohttp.ClientSession) -> list[RankQueue]:
        async def one(address: str) -> list[RankQueue]:
            async with session.get(f"http://{address}/sim/state") as response:
                return ranks_from_state(address, await response.json())

        found = await asyncio.gather(*(one(a) for a in self.addresses))
        return [q for queues in found for q in queues]

    def _forget(self, key: tuple[str, int]) -> None:
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]

    #: `choose` with no queue to choose from, or a /sim/state that is not JSON.
    route_errors: ClassVar[tuple[type[Exception], ...]] = (ValueError,)

    async def route(
        self, session: aiohttp.ClientSession, arrival: Arrival
    ) -> tuple[str, Mapping[str, str]]:
        """Straight to the rank `choose` picks from the true queues, read now."""
        deciding = time.monotonic()
        target = choose(await self._queues(session), self._pending, self._rng)
        self.decision_s.append(time.monotonic() - deciding)
        key = (target.address, target.rank)
        self._pending[key] += 1
        asyncio.get_running_loop().call_later(self.visible_after_s, self._forget, key)
        return f"http://{target.address}", {**self.entry_headers(arrival),
                                                DP_RANK_HEADER: str(target.rank)}
