"""Where the picker's view of the fleet comes from: the control plane's own state when it
runs inside `hybridlb serve`, or the control plane's /picker/state when it runs in its own
process.

Both correct the latest load reading by what the picker itself saw (`PickLedger`): its own
picks sent there since the reading was taken (not yet counted) less its picked requests that
ended there since (still counted), so that a reading a second old does not make every pick
herd on the replica it shows emptiest; and at least its own requests there now. Both give the
keep shares the control plane published (a node with one above 0 holds its requests while it
has room: pick.py).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import aiohttp

from xds_server.extproc.pick import Candidate, Rank
from xds_server.model import RankLoad, ReplicaState
from xds_server.policy.views import PER_MILLE
from xds_server.policy.weights import Explanation
from xds_server.state import State

log = logging.getLogger(__name__)


class PickerState(Protocol):
    def candidates(self, pool: str) -> list[Candidate] | None:
        """Ready replicas of a pool, None when the pool is unknown."""

    def default_pool(self) -> str:
        """The pool requests naming none go to (the first), or "" with no pools."""

    def keep(self, pool: str, node: str) -> int:
        """Per mille of the pool's requests from an Envoy on `node` to hold there (0: none,
        also for an unknown pool or node)."""

    def note_pick(self, address: str, rank: int | None = None) -> None: ...

    def note_served(self, picked: str, served: str, rank: int | None = None) -> None:
        """The proxy reports that `served` took the request picked for `picked` (and
        `rank`, the same index there)."""

    def note_done(self, address: str, rank: int | None = None) -> None:
        """A request picked for `address` (and `rank`) ended: its response is complete, or
        its stream closed."""


class PendingPicks:
    """Events per replica (picks, or ends of picked requests) with their times; a load read
    at time t already counts earlier ones."""

    def __init__(self, horizon_s: float = 30.0) -> None:
        self._picks: dict[str, deque[float]] = {}
        self._horizon_s = horizon_s

    def add(self, address: str, now: float | None = None) -> None:
        self._picks.setdefault(address, deque()).append(time.time() if now is None else now)

    def move(self, src: str, dst: str) -> None:
        """The latest pick of `src` went to `dst` instead (the proxy's fallback)."""
        picks = self._picks.get(src)
        if picks:
            picks.pop()
        self.add(dst)

    def since(self, address: str, read_at: float, now: float | None = None) -> int:
        picks = self._picks.get(address)
        if not picks:
            return 0
        cutoff = (time.time() if now is None else now) - self._horizon_s
        while picks and picks[0] < cutoff:
            picks.popleft()
        # Picks are appended in time order: the ones after read_at are a suffix. A scan was
        # O(picks in the horizon) per candidate per pick, thousands at a few hundred picks/s.
        return len(picks) - bisect.bisect_right(picks, read_at)


class PickLedger:
    """What the picker sent to each replica (and to each rank, when it names one) and saw end.

    A reading misses more than the picks made since it was taken: vLLM counts a request only
    once its front end has handed it to the engine (HTTP, tokenization: tens of milliseconds,
    more under load), so the picks of that time before the reading are in neither. On a
    fleet that runs at its room those were one request per replica, which read as a free
    slot: about one request in ten went to a full rank. The picker's own requests there now
    (picked, not yet ended) are exact for its own traffic, so a replica's load is read as at
    least those.
    """

    def __init__(self, horizon_s: float = 30.0) -> None:
        self._picks = PendingPicks(horizon_s)
        self._ends = PendingPicks(horizon_s)
        #: Picked and not ended, by key; a key leaves at 0. An end with no pick seen (the
        #: picker restarted) counts nothing, rather than going below 0.
        self._open: dict[str, int] = {}

    def pick(self, address: str, rank: int | None = None) -> None:
        for key in _keys(address, rank):
            self._picks.add(key)
            self._shift(key, 1)

    def served(self, picked: str, served: str, rank: int | None = None) -> None:
        """The proxy reports that `served` took the request picked for `picked`."""
        for src, dst in zip(_keys(picked, rank), _keys(served, rank), strict=True):
            self._picks.move(src, dst)
            self._shift(src, -1)
            self._shift(dst, 1)

    def done(self, address: str, rank: int | None = None) -> None:
        for key in _keys(address, rank):
            self._ends.add(key)
            self._shift(key, -1)

    def unread(self, key: str, read_at: float, shown: float) -> float:
        """What the reading taken at `read_at`, which shows `shown` requests there, misses:
        the picks since less the ends since (below 0 when more ended than were sent), and at
        least the picker's own requests there that it does not show."""
        since = self._picks.since(key, read_at) - self._ends.since(key, read_at)
        return max(float(since), self._open.get(key, 0) - shown)

    def _shift(self, key: str, delta: int) -> None:
        n = self._open.get(key, 0) + delta
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)


def _keys(address: str, rank: int | None) -> tuple[str, ...]:
    return (address,) if rank is None else (address, _rank_key(address, rank))


def _rank_key(address: str, rank: int) -> str:
    return f"{address}#{rank}"


#: pool -> node -> keep share per mille, as the publisher decided them.
KeepShares = Mapping[str, Mapping[str, int]]


class LocalState:
    """The control plane's hub, read in the same process; `keep` gives the keep shares
    published last, `judged(pool, address)` how the policy judged a replica (its relative
    decode speed, the room its load is read against; None: typical, room unknown)."""

    def __init__(self, state: State, keep: Callable[[], KeepShares] = dict,
                 judged: Callable[[str, str], Explanation | None] = lambda pool, address: None
                 ) -> None:
        self._state = state
        self._keep = keep
        self._judged = judged
        self._ledger = PickLedger()

    def candidates(self, pool: str) -> list[Candidate] | None:
        for p in self._state.pools:
            if p.name != pool:
                continue
            loads = self._state.loads
            out = []
            for r in p.replicas:
                if r.state is not ReplicaState.READY:
                    continue
                load = loads.get(r.address)
                read_at = load.read_at if load else 0.0
                view = self._judged(pool, r.address)
                out.append(_with_pending(Candidate(
                    address=r.address, node=r.node, capacity=r.capacity,
                    running=load.running if load else 0.0,
                    waiting=load.waiting if load else 0.0,
                    ranks=_local_ranks(r.capacity, r.dp_rank, load.ranks if load else ()),
                    speed=view.relative_speed if view is not None else 1.0,
                    slots=view.slots if view is not None else None,
                ), self._ledger, read_at))
            return out
        return None

    def default_pool(self) -> str:
        pools = self._state.pools
        return pools[0].name if pools else ""

    def keep(self, pool: str, node: str) -> int:
        return self._keep().get(pool, {}).get(node, 0)

    def note_pick(self, address: str, rank: int | None = None) -> None:
        self._ledger.pick(address, rank)

    def note_served(self, picked: str, served: str, rank: int | None = None) -> None:
        self._ledger.served(picked, served, rank)

    def note_done(self, address: str, rank: int | None = None) -> None:
        self._ledger.done(address, rank)


def _local_ranks(capacity: int, dp_rank: int, engines: Iterable[RankLoad]) -> tuple[Rank, ...]:
    """A hybrid-mode replica's engines by LOCAL index: vLLM's `engine` label is the global DP
    rank, X-data-parallel-rank takes the index among the server's own ranks (0..ranks-1).
    Only when every rank has a reading: a partial view would herd onto the ranks it shows."""
    if capacity <= 1:
        return ()
    out = []
    for e in engines:
        try:
            index = int(e.engine) - dp_rank
        except ValueError:
            return ()
        if 0 <= index < capacity:
            out.append(Rank(index, e.running, e.waiting))
    return tuple(sorted(out, key=lambda k: k.index)) if len(out) == capacity else ()


def _with_pending(c: Candidate, ledger: PickLedger, read_at: float) -> Candidate:
    """The candidate, and its ranks, with what its reading taken at `read_at` misses."""
    return dataclasses.replace(
        c, pending=ledger.unread(c.address, read_at, c.running + c.waiting),
        ranks=tuple(dataclasses.replace(k, pending=ledger.unread(
            _rank_key(c.address, k.index), read_at, k.running + k.waiting)) for k in c.ranks))


class RemoteState:
    """Follows a control plane's /picker/state, for a picker in its own process.

    A long poll: the control plane answers when its state changes (or after `WAIT_S` with an
    empty 304), so an unchanged fleet costs one small exchange per `WAIT_S`; `interval_s`
    spaces reads of a changing one."""

    #: How long one read waits for a change before the control plane answers "unchanged".
    WAIT_S = 10.0

    def __init__(self, admin_url: str, interval_s: float = 0.5) -> None:
        self._url = admin_url.rstrip("/") + "/picker/state"
        self._interval_s = interval_s
        #: Each pool's rows as read, and parsed only when a pick asks for the pool: parsing all
        #: 10,000 replicas of a large fleet took 0.15 s of the picker's loop per change.
        self._rows: dict[str, list[list[Any]]] = {}
        self._keep: dict[str, dict[str, int]] = {}
        self._skew = 0.0
        self._pools: dict[str, list[tuple[Candidate, float]]] = {}
        self._ledger = PickLedger()
        self._failing = False
        self._read_at = 0.0
        self._etag = ""
        self.ready = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.WAIT_S + 5, connect=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = time.monotonic()
                try:
                    await self._read(session)
                    if self._failing:
                        log.info("control plane %s answers again", self._url)
                        self._failing = False
                except (OSError, aiohttp.ClientError, TimeoutError, ValueError, KeyError,
                        TypeError, IndexError) as exc:
                    if not self._failing:
                        log.warning("cannot read %s (%s); picking from the last state seen",
                                    self._url, str(exc)[:200])
                        self._failing = True
                await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - started)))

    async def _read(self, session: aiohttp.ClientSession) -> None:
        headers = {"If-None-Match": self._etag} if self._etag else {}
        async with session.get(self._url, headers=headers,
                               params={"wait_s": str(self.WAIT_S)}) as response:
            if response.status not in (200, 304):
                raise ValueError(f"HTTP {response.status}")
            if response.status == 200:
                doc = await response.json()
                # Load times are the control plane's clock: shift them onto ours.
                self._skew = time.time() - float(response.headers["X-Hybridlb-Time"])
                rows = {str(p["name"]): p["replicas"] for p in doc["pools"]}
                # A control plane from before keep shares sends none: nothing is held.
                self._keep = {str(p["name"]): _keep_shares(p.get("keep", {}))
                              for p in doc["pools"]}
                self._rows = rows
                self._pools = {}
                self._etag = response.headers.get("ETag", "")
        self._read_at = time.time()
        self.ready.set()

    def candidates(self, pool: str) -> list[Candidate] | None:
        members = self._pools.get(pool)
        if members is None:
            rows = self._rows.get(pool)
            if rows is None:
                return None
            try:
                members = self._pools[pool] = _parse(rows, self._skew)
            except (ValueError, TypeError, IndexError) as exc:
                log.warning("pool %.100r from %s does not parse (%s); no picks for it",
                            pool, self._url, str(exc)[:200])
                members = self._pools[pool] = []
        return [_with_pending(c, self._ledger, read_at) for c, read_at in members]

    def default_pool(self) -> str:
        return next(iter(self._rows), "")

    def keep(self, pool: str, node: str) -> int:
        return self._keep.get(pool, {}).get(node, 0)

    def describe(self) -> dict[str, Any]:
        """The picker's view for its /debug/state: what it would pick from, and how old."""
        return {
            "control_plane": self._url,
            "read_age_s": round(time.time() - self._read_at, 3) if self._read_at else None,
            "failing": self._failing,
            "pools": [
                {"name": name, "keep_per_mille": self._keep.get(name, {}), "replicas": [
                    {"address": c.address, "node": c.node, "capacity": c.capacity,
                     "running": c.running, "waiting": c.waiting, "pending": c.pending,
                     "speed": c.speed, "slots": c.slots,
                     "ranks": [dataclasses.asdict(k) for k in c.ranks]}
                    for c in self.candidates(name) or ()]}
                for name in self._rows
            ],
        }

    def note_pick(self, address: str, rank: int | None = None) -> None:
        self._ledger.pick(address, rank)

    def note_served(self, picked: str, served: str, rank: int | None = None) -> None:
        self._ledger.served(picked, served, rank)

    def note_done(self, address: str, rank: int | None = None) -> None:
        self._ledger.done(address, rank)


def _keep_shares(doc: object) -> dict[str, int]:
    """A pool's `keep` object, node -> per mille, each clamped to 0..1000."""
    if not isinstance(doc, dict):
        raise ValueError(f"keep: expected an object, got {type(doc).__name__}")
    return {str(node): min(PER_MILLE, max(0, int(share))) for node, share in doc.items()}


def _parse(rows: list[list[Any]], skew: float) -> list[tuple[Candidate, float]]:
    """A pool's /picker/state rows into its ready candidates, each with its load's read time
    on this host's clock."""
    members = []
    for row in rows:
        address, node, capacity, dp_rank, state, running, waiting, read_at, ranks = row[:9]
        # A control plane from before speeds sends nine columns (every replica typical), one
        # from before rooms ten (the room left to the picker's own reckoning).
        speed = float(row[9]) if len(row) > 9 else 1.0
        slots = float(row[10]) if len(row) > 10 and row[10] is not None else None
        if slots is not None and not (1 <= slots < math.inf):  # NaN, below one, infinite
            slots = None
        if state != ReplicaState.READY.value:
            continue
        capacity = int(capacity)
        engines = (RankLoad(str(engine), float(r), float(w)) for engine, r, w in ranks)
        members.append((Candidate(
            address=str(address), node=str(node), capacity=capacity,
            running=float(running or 0.0), waiting=float(waiting or 0.0),
            ranks=_local_ranks(capacity, int(dp_rank), engines),
            speed=speed if speed > 0 else 1.0,
            slots=slots,
        ), float(read_at) + skew if read_at is not None else 0.0))
    return members


class PrefixHolders:
    """Which replicas took each leading block: every one of them, not the last only (a
    system prompt that all requests share is soon in every replica's cache, and favouring
    one replica for it would pile all traffic there). A bounded LRU map of prefixes."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._holders: OrderedDict[str, set[str]] = OrderedDict()
        self._capacity = capacity

    def get(self, prefix: str) -> frozenset[str]:
        holders = self._holders.get(prefix) if prefix else None
        if holders is None:
            return frozenset()
        self._holders.move_to_end(prefix)
        return frozenset(holders)

    def add(self, prefix: str, address: str) -> None:
        if not prefix:
            return
        self._holders.setdefault(prefix, set()).add(address)
        self._holders.move_to_end(prefix)
        while len(self._holders) > self._capacity:
            self._holders.popitem(last=False)
