"""Weights from what is known of each replica's load: pure functions, no I/O.

The formula, per replica with capacity `c` (DP ranks), load read `age` seconds ago:

    room       = c * max_num_seqs
    used       = running + waiting_factor * waiting            (waiting costs more: it is
                                                                 latency already promised)
    util       = min(1, used / room)                            (fresh load; with per-rank
                 readings, 1 - mean over ranks of (1 - min(1, used_rank / max_num_seqs)))
    util       → pool_util as age goes stale_after_s → 2*stale_after_s (linearly), where
                 pool_util is the capacity-weighted mean util of the replicas with fresh
                 load (0 if none: then every weight is its capacity weight)
    target     = SCALE * c * max(min_share, 1 - util)           (SCALE = 100 per rank)

and then, against herding (many Envoys acting on the same number at once):

    smoothed  += (target - smoothed) * (1 - exp(-dt / smoothing_s))
    smoothed  is moved at most max_step * SCALE * c per second of dt
    published  changes only when |smoothed - published| >= deadband * SCALE * c, or when
               smoothed has settled on its target (stopped moving); it is quantized to
               `quantum`

A draining replica weighs 0 (Envoy sends it nothing new anyway: its EDS status is
DRAINING); a saturated one keeps `min_share` of its capacity weight. Node (locality)
weights are the sums of their ready replicas' weights. Envoy's least-request balancer then
divides each weight by its own in-flight count, which absorbs bursts between pushes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from xds_server.model import Load, Pool, Replica, ReplicaState, Weights
from xds_server.options import option

#: Weight of one idle rank. Envoy needs integers >= 1 and a locality sum below 2**32.
SCALE = 100
#: Envoy requires every endpoint weight to be at least 1.
MIN_WEIGHT = 1


@dataclass(frozen=True)
class PolicySettings:
    """Tunables of the weight policy; each is a flag and a config key of `serve`."""

    #: Lower it to the concurrency at which your latency target still holds.
    max_num_seqs: int = option(256, "requests one rank takes at once: the room per rank (vLLM "
                               "--max-num-seqs, or the concurrency your latency target "
                               "allows)", flag="max-num-seqs")
    #: vLLM's own balancer counts a waiting request 4 times.
    waiting_factor: float = option(4.0, "how much more a waiting request weighs than a "
                                   "running one", flag="waiting-factor")
    stale_after_s: float = option(5.0, "load older than this is doubted; at twice it the pool "
                                  "mean stands in", flag="stale-after-s")
    smoothing_s: float = option(2.0, "time constant of weight smoothing (0: off)",
                                flag="smoothing-s")
    max_step_per_s: float = option(0.5, "largest weight move per second, as a share of "
                                   "capacity weight (0: off)", flag="max-step-per-s")
    deadband: float = option(0.05, "smallest weight change worth a push, as a share of "
                             "capacity weight", flag="deadband")
    #: So that a saturated replica is never starved.
    min_share: float = option(0.02, "share of its capacity weight a saturated replica keeps",
                              flag="min-share")
    #: Published weights are multiples of this.
    quantum: int = 1
    #: A reading's age is judged when deciding, so loads that stop coming go stale on time.
    decide_interval_s: float = option(1.0, "weights are decided again at least this often "
                                      "without a new reading, so that loads that stop "
                                      "arriving go stale on time", flag="decide-interval-s")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if not 0 < self.min_share <= 1:
            raise ValueError("min_share must be in (0, 1]")
        if self.waiting_factor < 0 or self.stale_after_s <= 0 or self.smoothing_s < 0:
            raise ValueError("waiting_factor, smoothing_s must be >= 0; stale_after_s > 0")
        if self.max_step_per_s < 0 or self.deadband < 0 or self.quantum < 1:
            raise ValueError("max_step_per_s and deadband must be >= 0, quantum >= 1")
        if self.decide_interval_s <= 0:
            raise ValueError("decide_interval_s must be > 0")


UNDAMPED = PolicySettings(smoothing_s=0.0, max_step_per_s=0.0, deadband=0.0)
"""The same formula with no smoothing, step bound or deadband (the benchmark's baseline)."""


@dataclass(frozen=True)
class Explanation:
    """Why a replica weighs what it does (shown in /debug/state)."""

    utilization: float
    freshness: float  # 1: fresh load, 0: unknown (pool mean used)
    target: float
    smoothed: float


@dataclass(frozen=True)
class Memory:
    """What the policy remembers between decisions for one pool."""

    at: float | None = None
    smoothed: Mapping[str, float] = field(default_factory=dict)
    published: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    weights: Weights
    memory: Memory
    explain: Mapping[str, Explanation]
    #: node -> capacity-weighted utilization of its ready replicas, from the smoothed values
    #: (what the hybrid views decide local-first on); nodes with no ready replica are absent.
    node_utilization: Mapping[str, float] = field(default_factory=dict)


def capacity_weight(replica: Replica) -> int:
    return SCALE * replica.capacity


def capacity_weights(pool: Pool) -> Weights:
    """Weights as if every replica were idle: its capacity alone."""
    return _assemble(pool, {r.address: capacity_weight(r) for r in pool.replicas})


def utilization(replica: Replica, load: Load, settings: PolicySettings) -> float:
    """Share of the replica's room in use. With per-rank readings (a hybrid-mode server),
    the free room is summed rank by rank: one rank's long queue does not hide that its
    sibling is idle, and vLLM's own balancer will send the request to that sibling."""
    if load.ranks and len(load.ranks) == replica.capacity:
        free = sum(1.0 - _used(r.running, r.waiting, 1, settings) for r in load.ranks)
        return 1.0 - free / replica.capacity
    return _used(load.running, load.waiting, replica.capacity, settings)


def _used(running: float, waiting: float, capacity: int, settings: PolicySettings) -> float:
    used = max(0.0, running) + settings.waiting_factor * max(0.0, waiting)
    return min(1.0, used / (capacity * settings.max_num_seqs))


def freshness(load: Load | None, now: float, settings: PolicySettings) -> float:
    """1 while a reading is younger than stale_after_s, falling to 0 at twice that age."""
    if load is None:
        return 0.0
    age = max(0.0, now - load.read_at)
    return min(1.0, max(0.0, 2.0 - age / settings.stale_after_s))


def decide(
    pool: Pool,
    loads: Mapping[str, Load],
    memory: Memory,
    now: float,
    settings: PolicySettings,
) -> Decision:
    """Endpoint and node weights for one pool; `memory` comes from the previous decision."""
    ready = [r for r in pool.replicas if r.state is ReplicaState.READY]
    fresh: dict[str, float] = {}
    util: dict[str, float] = {}
    for r in ready:
        load = loads.get(r.address)
        fresh[r.address] = freshness(load, now, settings)
        util[r.address] = utilization(r, load, settings) if load is not None else 0.0
    known = [r for r in ready if fresh[r.address] > 0]
    known_capacity = sum(r.capacity * fresh[r.address] for r in known)
    pool_util = (
        sum(util[r.address] * r.capacity * fresh[r.address] for r in known) / known_capacity
        if known_capacity
        else 0.0
    )
    dt = None if memory.at is None else max(0.0, now - memory.at)
    smoothed: dict[str, float] = {}
    published: dict[str, int] = {}
    explain: dict[str, Explanation] = {}
    for r in ready:
        f = fresh[r.address]
        u = f * util[r.address] + (1 - f) * pool_util
        full = capacity_weight(r)
        target = full * max(settings.min_share, 1.0 - u)
        value = _damp(memory.smoothed.get(r.address), target, dt, full, settings)
        smoothed[r.address] = value
        before = memory.published.get(r.address)
        # Settled (at its target and no longer moving): publish it exactly, so that the
        # deadband filters transients but never leaves a lasting residue.
        last = memory.smoothed.get(r.address)
        settled = (
            last is not None
            and abs(target - value) < 0.5 * settings.quantum
            and abs(value - last) < 0.5 * settings.quantum
        )
        if before is None or settled or abs(value - before) >= settings.deadband * full:
            published[r.address] = _quantize(value, settings.quantum)
        else:
            published[r.address] = before
        explain[r.address] = Explanation(
            utilization=round(u, 4), freshness=round(f, 3), target=round(target, 2),
            smoothed=round(value, 2),
        )
    endpoint_weights = dict(published)
    for r in pool.replicas:
        if r.state is not ReplicaState.READY:
            endpoint_weights[r.address] = 0
    used: dict[str, float] = {}
    room: dict[str, int] = {}
    for r in ready:
        full = capacity_weight(r)
        used[r.node] = used.get(r.node, 0.0) + (full - smoothed[r.address]) / SCALE
        room[r.node] = room.get(r.node, 0) + r.capacity
    return Decision(
        weights=_assemble(pool, endpoint_weights),
        memory=Memory(at=now, smoothed=smoothed, published=published),
        explain=explain,
        node_utilization={n: min(1.0, max(0.0, used[n] / room[n])) for n in room},
    )


def _damp(
    previous: float | None, target: float, dt: float | None, full: int, s: PolicySettings
) -> float:
    if previous is None or dt is None:
        return target
    value = target
    if s.smoothing_s > 0:
        value = previous + (target - previous) * (1.0 - math.exp(-dt / s.smoothing_s))
    if s.max_step_per_s > 0:
        bound = s.max_step_per_s * full * dt
        value = min(previous + bound, max(previous - bound, value))
    return value


def _quantize(value: float, quantum: int) -> int:
    return max(MIN_WEIGHT, round(value / quantum) * quantum)


def _assemble(pool: Pool, endpoints: dict[str, int]) -> Weights:
    localities: dict[str, int] = dict.fromkeys(pool.nodes, 0)
    for r in pool.replicas:
        if r.state is ReplicaState.READY:
            localities[r.node] += endpoints.get(r.address, 0)
    return Weights(
        endpoints=endpoints,
        localities={node: max(MIN_WEIGHT, w) for node, w in localities.items()},
    )
