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

That is the `queue` model. The default, `persistent` (see `decide_persistent`), weighs only
what lasts:

    weight     = SCALE * c * max(min_share, speed * exp(tilt))
    speed      = clamp(decode speed / pool's typical, min_share, MAX_SPEEDUP)   (load.py;
                 the decode speed smoothed over speed_window_s, 1 while unknown or
                 within SPEED_DEADBAND of 1)
    tilt       = the lasting excess of its load per slot over its node's, integrated
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from xds_server.model import Load, Pool, Replica, ReplicaState, Weights
from xds_server.options import option
from xds_server.policy.load import (
    busiest_rank,
    learn_slots,
    mean_wait,
    per_slot,
    pool_slots,
    relative_speeds,
)
from xds_server.policy.spill import plan_spill

#: Weight of one idle rank. Envoy needs integers >= 1 and a locality sum below 2**32.
SCALE = 100
#: Envoy requires every endpoint weight to be at least 1.
MIN_WEIGHT = 1
#: persistent: the most a replica's weight grows for being faster than the pool's typical.
MAX_SPEEDUP = 4.0
#: persistent: a relative speed this close to 1 counts as 1. Replicas of one model on one
#: GPU type read within it of each other (batch sizes differ; the readings are rates), and
#: weights that followed those differences moved traffic on noise.
SPEED_DEADBAND = 0.2


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
    #: `persistent` (the default): weights carry only lasting differences between replicas,
    #: Envoy's least-request the rest; `queue`: weights follow each reading's free room (the
    #: formula above). See `decide_persistent`.
    model: Literal["persistent", "queue"] = option(
        "persistent", "persistent: weights carry only lasting differences between replicas "
        "and Envoy's least-request the rest, local-first by queue; queue: weights follow each "
        "reading's free room, local-first by --room-threshold", flag="load-model")
    #: Persistent: what a weight may react to.
    balance_window_s: float = option(10.0, "persistent: seconds over which a replica's load "
                                     "per slot is averaged before a weight follows it",
                                     flag="balance-window-s")
    #: Persistent: per second, per unit of load per slot, on the log-weight.
    balance_gain_per_s: float = option(0.0, "persistent: how fast a replica's weight follows "
                                       "its lasting excess load per slot over its node's",
                                       flag="balance-gain-per-s")
    balance_memory_s: float = option(20.0, "persistent: time for a weight to return to "
                                     "capacity once the excess is gone",
                                     flag="balance-memory-s")
    #: Persistent, in service times: the wait worth keeping a request on its node.
    spill_margin: float = option(0.1, "persistent: a node keeps its requests while the mean "
                                 "wait at its replicas exceeds the rest of the pool's by less "
                                 "than this (service times: what a request kept local is "
                                 "worth, a hop and the bandwidth it saves)",
                                 flag="spill-margin")
    #: Persistent: both in proportion to the relative excess; alike, so that noise around the
    #: balance point moves the share neither way on average.
    spill_rate_per_s: float = option(0.05, "persistent: fastest fall of a kept share per "
                                     "second", flag="spill-rate-per-s")
    keep_recover_per_s: float = option(0.05, "persistent: fastest climb of a kept share per "
                                       "second", flag="keep-recover-per-s")
    load_smoothing_s: float = option(3.0, "persistent: time over which a replica's load per "
                                     "slot is averaged before the keep shares follow it",
                                     flag="load-smoothing-s")
    #: Persistent: a speed is the rate of a few readings; a slow GPU stays slow.
    speed_window_s: float = option(3.0, "persistent: time over which a replica's decode "
                                   "speed (output tokens per second per running request) is "
                                   "averaged before its weight follows it",
                                   flag="speed-window-s")

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
        if (self.balance_window_s <= 0 or self.spill_margin < 0 or self.spill_rate_per_s <= 0
                or self.load_smoothing_s <= 0 or self.balance_gain_per_s < 0
                or self.balance_memory_s <= 0 or self.keep_recover_per_s <= 0
                or self.speed_window_s <= 0):
            raise ValueError("spill_margin and balance_gain_per_s must be >= 0; the windows, "
                             "memories and spill_rate_per_s > 0")


UNDAMPED = PolicySettings(model="queue", smoothing_s=0.0, max_step_per_s=0.0, deadband=0.0)
"""The queue formula with no smoothing, step bound or deadband (a benchmark baseline)."""


@dataclass(frozen=True)
class Explanation:
    """Why a replica weighs what it does (shown in /debug/state)."""

    utilization: float
    freshness: float  # 1: fresh load, 0: unknown (pool mean used)
    target: float
    smoothed: float
    #: persistent: its decode speed against the pool's typical (1: typical or unknown).
    relative_speed: float = 1.0
    #: persistent: the room per rank its load is read against, learnt from vLLM (its own,
    #: else the pool's median); None while only --max-num-seqs stands in, so that the
    #: picker, which reads it, keeps its own reckoning until a room is learnt.
    slots: float | None = None


@dataclass(frozen=True)
class Memory:
    """What the policy remembers between decisions for one pool."""

    at: float | None = None
    smoothed: Mapping[str, float] = field(default_factory=dict)
    published: Mapping[str, int] = field(default_factory=dict)
    #: persistent: each replica's learnt room per rank (load.py) and averaged requests per
    #: rank, and each node's averaged load per slot.
    slots: Mapping[str, float] = field(default_factory=dict)
    balance: Mapping[str, float] = field(default_factory=dict)
    #: persistent: when the last reading each room was learnt from was taken: a reading
    #: counts once however many decisions it stays the latest for (a 5 s Prometheus scrape).
    slots_at: Mapping[str, float] = field(default_factory=dict)
    #: persistent: each replica's log-weight against its node's other replicas, and each
    #: node's integral of its waits that is added to its kept share (to the planned share,
    #: which it may only lower, or to 1 where none is planned).
    tilt: Mapping[str, float] = field(default_factory=dict)
    keep: Mapping[str, float] = field(default_factory=dict)
    #: persistent: requests per second entering each node's Envoys (gateways: ""), smoothed.
    ingress: Mapping[str, float] = field(default_factory=dict)
    replica_load: Mapping[str, float] = field(default_factory=dict)
    #: persistent: each node's log-share of the whole-pool cluster (0: its capacity's).
    locality: Mapping[str, float] = field(default_factory=dict)
    #: persistent: each replica's smoothed decode speed, and when its last one was read.
    speed: Mapping[str, float] = field(default_factory=dict)
    speed_at: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    weights: Weights
    memory: Memory
    explain: Mapping[str, Explanation]
    #: node -> capacity-weighted utilization of its ready replicas, from the smoothed values
    #: (what the hybrid views decide local-first on); nodes with no ready replica are absent.
    node_utilization: Mapping[str, float] = field(default_factory=dict)
    #: persistent: node -> share (0..1) of its Envoy's requests to keep there; absent under
    #: the queue model (views.keep_shares decides from node_utilization then).
    node_keep: Mapping[str, float] = field(default_factory=dict)


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
    ingress: Mapping[str, float] | None = None,
) -> Decision:
    """Endpoint and node weights for one pool; `memory` comes from the previous decision.
    `ingress`: requests per second entering the Envoys, by node, where they report it (the
    persistent model plans the keep shares from it; the queue model has no use for it)."""
    if settings.model == "persistent":
        return decide_persistent(pool, loads, memory, now, settings, ingress)
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


def decide_persistent(
    pool: Pool,
    loads: Mapping[str, Load],
    memory: Memory,
    now: float,
    settings: PolicySettings,
    ingress: Mapping[str, float] | None = None,
) -> Decision:
    """Weights that carry only lasting differences; Envoy's least-request does the rest.

    Envoy's least-request already balances each Envoy's own requests by their in-flight
    counts, at every request; weights that follow each 1 s reading fight it with noise and
    herd (issue 15). So each replica's load per slot (load.py) is first averaged over
    `balance_window_s`, and then:

    - a replica's endpoint weight is its capacity weight times its relative speed: its decode
      speed (output tokens per second per running request, smoothed over speed_window_s)
      over the capacity-weighted median of the ready replicas', clamped to
      [min_share, MAX_SPEEDUP]. That is a slow GPU measured directly, within a few readings,
      and it comes back as quickly once the replica is fast again. Without a speed (none
      read yet, idle, or its last one older than twice stale_after_s) it is 1;
    - times exp(m), for what the speed does not show (KV-cache pressure, long prompts),
      where m integrates how far its average stays above its own
      node's (and leaks back to 0 over balance_memory_s):
      dm/dt = -balance_gain_per_s * (avg - node_avg) - m / memory_s. Within a node the
      weights do decide the split (a node's Envoy balances over its replicas by them), so
      this converges: a KV-bound replica ends up as full as its neighbours, not with as
      long a queue at a fraction of the speed. Off by default (balance_gain_per_s 0): on
      a healthy fleet it drifted (a replica's weight fell to 2/3 of its capacity's within
      25 s at 85% load in the routing bench) and the speed carries the slow replica;
    - a node's locality weight (how the whole-pool cluster, the central Envoy's requests and
      the spilled ones, splits between nodes) is the sum of its replicas' times its `fill`
      (the share of its fair part the whole-pool cluster must bring it, spill.py, from the
      Envoys' ingress; 1 while no Envoy reports one) times exp(l), where l integrates how
      far the mean wait at its replicas exceeds the pool's (relative, as the keep shares
      below): dl/dt = -0.05 * excess, the largest l held at 0 (capacity) and the others no
      lower than log(min_share). Integral, because much of a node's load is its own Envoy's
      traffic, which no locality weight moves: what the ingress plan misses (no reports,
      longer requests at one entry) is made up until the waits match.

    A doubted or unknown reading counts as the pool's average, so with stale loads the
    weights drift back to capacity, never to zero or to idle; a doubted speed is held, and
    forgotten at twice stale_after_s.

    A node keeps a share k of its Envoy's requests: the share planned from the Envoys'
    ingress (spill.py: just the node's fair part of the pool's traffic, by effective
    capacity), less an integral, never above the plan, of how far the mean wait at its
    replicas exceeds the mean wait at the rest of the pool's (traffic the reports do not
    show); where no Envoy reports an ingress (nothing enters, or Envoys bootstrapped without
    load reports), 1 plus that integral, free in both directions
    (load.mean_wait: Erlang C per replica, on the slots read from vLLM, at each replica's
    load per slot averaged over load_smoothing_s; node and rest weigh their replicas by
    capacity):

        excess = (wait(node) - wait(rest) - spill_margin)
                 / (wait(node) + wait(rest) + spill_margin)          (in -1..1)
        dk/dt  = -rate * excess * (1 + 4 excess²)   (rate: spill_rate_per_s while the
                                                     excess is positive, keep_recover_per_s
                                                     below; held where k is 0 or 1)

    Each replica is a queue of its own (Envoy picks the replica), so keeping requests on a
    node costs nothing while its replicas are no fuller than the others: a node keeps
    everything then (at any load, when the ingress matches the capacity), gives up just
    enough that its replicas wait no longer than the pool's (an uneven ingress, a slow
    replica), and takes it back as room returns: at once where nobody waits, slowly near the
    balance point, so that the loop through Envoy settles rather than swings. No
    utilization threshold.
    """
    ready = [r for r in pool.replicas if r.state is ReplicaState.READY]
    dt = None if memory.at is None else max(0.0, now - memory.at)
    fresh = {r.address: freshness(loads.get(r.address), now, settings) for r in ready}
    read = {r.address: load for r in ready
            if fresh[r.address] > 0 and (load := loads.get(r.address)) is not None}
    new = {a: load for a, load in read.items()
           if load.read_at > memory.slots_at.get(a, -math.inf)}
    room_floor = max([busiest_rank(read[r.address], r.capacity) for r in ready
                      if r.address in read] + list(memory.slots.values()), default=0.0)
    learned = {
        r.address: learn_slots(memory.slots.get(r.address), new.get(r.address), r.capacity,
                               pool_floor=room_floor, told=r.max_num_seqs)
        for r in ready
    }
    slots = pool_slots(learned, (r.address for r in ready), settings.max_num_seqs)
    room_learnt = any(v is not None for v in learned.values())
    occupancy: dict[str, float] = {}
    per_rank: dict[str, float] = {}  # requests in the replica per rank: what is averaged
    for r in ready:
        if (load := read.get(r.address)) is None:
            continue
        occupancy[r.address] = per_slot(load.running, load.waiting, r.capacity, slots[r.address])
        per_rank[r.address] = occupancy[r.address] * slots[r.address]
    known = [r for r in ready if r.address in occupancy]
    weight_sum = sum(r.capacity * fresh[r.address] for r in known)
    pool_occupancy = (sum(occupancy[r.address] * r.capacity * fresh[r.address] for r in known)
                      / weight_sum if weight_sum else 0.0)
    alpha = 1.0 if not dt else 1.0 - math.exp(-dt / settings.balance_window_s)
    remembered = [memory.balance[r.address] / slots[r.address]
                  for r in ready if r.address in memory.balance]
    pool_before = (sum(remembered) / len(remembered) if remembered else pool_occupancy)
    # Averaged per rank, not per slot, so that learning the room re-scales the history
    # instead of comparing readings taken against different rooms.
    average: dict[str, float] = {}
    for r in ready:
        before = memory.balance.get(r.address)
        # A doubted reading counts in proportion; an unknown load reads as the pool's, so
        # with stale metrics the weights drift back to capacity, never to zero or to idle.
        f = fresh[r.address]
        reading = (f * per_rank.get(r.address, 0.0)
                   + (1.0 - f) * pool_before * slots[r.address])
        average[r.address] = reading if before is None else before + alpha * (reading - before)
    per_slot_average = {a: v / slots[a] for a, v in average.items()}
    node_room: dict[str, float] = {}
    node_busy: dict[str, float] = {}
    for r in ready:
        node_room[r.node] = node_room.get(r.node, 0.0) + r.capacity
        node_busy[r.node] = node_busy.get(r.node, 0.0) + per_slot_average[r.address] * r.capacity
    node_average = {n: node_busy[n] / node_room[n] for n in node_room}
    floor = math.log(settings.min_share)
    speed, speed_at = _speeds(ready, loads, fresh, memory, now, dt, settings)
    relative = {a: v if abs(v - 1.0) >= SPEED_DEADBAND else 1.0
                for a, v in relative_speeds(speed, {r.address: r.capacity for r in ready},
                                            low=settings.min_share, high=MAX_SPEEDUP).items()}
    tilt: dict[str, float] = {}
    smoothed: dict[str, float] = {}
    published: dict[str, int] = {}
    explain: dict[str, Explanation] = {}
    for r in ready:
        m = memory.tilt.get(r.address, 0.0)
        if dt:
            # Only as much as the reading is believed: a doubted one lets the weight leak back.
            excess = fresh[r.address] * (per_slot_average[r.address] - node_average[r.node])
            m += dt * (-settings.balance_gain_per_s * excess - m / settings.balance_memory_s)
            m = min(0.0, max(floor, m))
        tilt[r.address] = m
        full = capacity_weight(r)
        fast = relative.get(r.address, 1.0)
        value = full * max(settings.min_share, fast * math.exp(m))
        smoothed[r.address] = value
        before = memory.published.get(r.address)
        if before is None or abs(value - before) >= settings.deadband * full:
            published[r.address] = _quantize(value, settings.quantum)
        else:
            published[r.address] = before
        explain[r.address] = Explanation(
            utilization=round(per_slot_average[r.address], 4),
            freshness=round(fresh[r.address], 3), target=round(value, 2),
            smoothed=round(value, 2), relative_speed=round(fast, 3),
            slots=round(slots[r.address], 2) if room_learnt else None,
        )
    endpoint_weights = dict(published)
    for r in pool.replicas:
        if r.state is not ReplicaState.READY:
            endpoint_weights[r.address] = 0
    replica_load = _smoothed_loads(ready, occupancy, memory, dt, settings)
    waits, capacity = _node_waits(ready, replica_load, slots)
    entering = _smoothed_ingress(ingress or {}, memory, dt, settings)
    effective: dict[str, float] = {}
    for r in ready:
        effective[r.node] = effective.get(r.node, 0.0) + r.capacity * relative.get(r.address, 1.0)
    spill = plan_spill(entering, effective)
    keep, trim = _keep(ready, waits, capacity, spill.keep if spill else {}, memory, dt,
                       settings)
    locality = _localities(ready, waits, capacity, memory, dt, settings)
    fill = spill.fill if spill else {}
    node_share = {n: max(settings.min_share, fill.get(n, 1.0)) * math.exp(v)
                  for n, v in locality.items()}
    busy: dict[str, float] = {}
    for r in ready:
        if r.address in replica_load:
            busy[r.node] = busy.get(r.node, 0.0) + replica_load[r.address] * r.capacity
    return Decision(
        weights=_assemble(pool, endpoint_weights, node_share),
        memory=Memory(at=now, smoothed=smoothed, published=published,
                      slots={a: v for a, v in learned.items() if v is not None},
                      slots_at={**{a: t for a, t in memory.slots_at.items() if a in learned},
                                **{a: load.read_at for a, load in new.items()}},
                      balance=average, tilt=tilt, replica_load=replica_load, keep=trim,
                      locality=locality, ingress=entering,
                      speed=speed, speed_at=speed_at),
        explain=explain,
        node_utilization={n: round(busy[n] / capacity[n], 4) for n in capacity},
        node_keep=keep,
    )


def _smoothed_loads(ready: list[Replica], occupancy: Mapping[str, float], memory: Memory,
                    dt: float | None, s: PolicySettings) -> dict[str, float]:
    """Each replica's load per slot smoothed over a few readings: the queue a share causes
    is a mean."""
    alpha = 1.0 if not dt else 1.0 - math.exp(-dt / s.load_smoothing_s)
    load: dict[str, float] = {}
    for r in ready:
        if r.address not in occupancy:
            continue
        before = memory.replica_load.get(r.address)
        now = occupancy[r.address]
        load[r.address] = now if before is None else before + alpha * (now - before)
    return load


def _node_waits(ready: list[Replica], load: Mapping[str, float], slots: Mapping[str, float]
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Each node's mean wait (load.mean_wait, by capacity) and its ranks with a reading.

    Envoy picks a replica and vLLM a slot inside it: each replica is a queue of its own, so
    a node's wait is the mean of its replicas', not a pooled queue's, and two nodes as full
    as each other wait alike however many replicas each has."""
    waits: dict[str, float] = {}
    capacity: dict[str, float] = {}
    for r in ready:
        if r.address in load:
            wait = mean_wait(load[r.address], r.capacity * slots[r.address])
            waits[r.node] = waits.get(r.node, 0.0) + r.capacity * wait
            capacity[r.node] = capacity.get(r.node, 0.0) + r.capacity
    return {n: w / capacity[n] for n, w in waits.items()}, capacity


def _excess(here: float, there: float, s: PolicySettings) -> float:
    """How much longer a wait is than another, less a hop's worth, relative to the waits at
    stake (in -1..1): moves in proportion near the balance point, at once where nobody
    waits, never all-or-nothing (which swung the shares around the balance point)."""
    return (here - there - s.spill_margin) / max(1e-9, here + there + s.spill_margin)


def _smoothed_ingress(ingress: Mapping[str, float], memory: Memory, dt: float | None,
                      s: PolicySettings) -> dict[str, float]:
    """Each node's Envoy ingress averaged over load_smoothing_s: a report is a second's
    count of random arrivals. A node whose Envoys stopped reporting is forgotten."""
    alpha = 1.0 if not dt else 1.0 - math.exp(-dt / s.load_smoothing_s)
    smoothed: dict[str, float] = {}
    for node, rate in ingress.items():
        before = memory.ingress.get(node)
        now = max(0.0, rate)
        smoothed[node] = now if before is None else before + alpha * (now - before)
    return smoothed


def _keep(ready: list[Replica], waits: Mapping[str, float], capacity: Mapping[str, float],
          planned: Mapping[str, float], memory: Memory, dt: float | None, s: PolicySettings
          ) -> tuple[dict[str, float], dict[str, float]]:
    """Each node's kept share and the integral behind it (see decide_persistent): the
    planned share (1 where none) plus the integral, held where the sum is 0 or 1.

    Over a plan the integral only lowers the share: a node's replicas wait less than the
    rest's exactly when the plan steers the gateways' traffic away from it, so an integral
    free to rise wound up to keeping all (+0.3-0.4 in the routing bench) and held a burst
    at its entry on the node for seconds."""
    total_wait = sum(waits[n] * capacity[n] for n in waits)
    total_capacity = sum(capacity.values())
    keep: dict[str, float] = {}
    trims: dict[str, float] = {}
    for node in sorted({r.node for r in ready}):
        base = planned.get(node, 1.0)
        trim = memory.keep.get(node, 0.0)
        rest_capacity = total_capacity - capacity.get(node, 0.0)
        if node in planned and (rest_capacity <= 0 or node not in waits):
            # The plan counts every ready replica, read or not.
            keep[node], trims[node] = planned[node], 0.0
            continue
        if rest_capacity <= 0:  # nowhere else to go (that has a reading)
            keep[node], trims[node] = 1.0, 0.0
            continue
        if node in waits and dt:  # without a fresh reading the trim is held
            rest = (total_wait - waits[node] * capacity[node]) / rest_capacity
            excess = _excess(waits[node], rest, s)
            rate = s.spill_rate_per_s if excess > 0 else s.keep_recover_per_s
            # Up to 5x quicker far from the balance point, gentle near it, where the loop's
            # lag (service times and smoothing) made a quicker share swing between all and
            # nothing.
            trim -= dt * rate * excess * (1.0 + 4.0 * excess * excess)
        # Below a plan only: queues the reports do not explain (traffic that reaches the
        # replicas past the reporting Envoys) spill more, never keep more than planned.
        trim = min(0.0 if node in planned else 1.0 - base, max(-base, trim))
        keep[node], trims[node] = base + trim, trim
    return keep, trims


def _localities(ready: list[Replica], waits: Mapping[str, float],
                capacity: Mapping[str, float], memory: Memory, dt: float | None,
                s: PolicySettings) -> dict[str, float]:
    """Each node's log-share of the whole-pool cluster (see decide_persistent); a node with
    no ready replica is forgotten, as its keep share is."""
    total_capacity = sum(capacity.values())
    pool = sum(waits[n] * capacity[n] for n in waits) / total_capacity if total_capacity else 0.0
    share = {n: memory.locality.get(n, 0.0) for n in {r.node for r in ready}}
    for node, wait in waits.items():
        share[node] = share.get(node, 0.0)
        if dt:
            share[node] -= dt * _LOCALITY_GAIN_PER_S * _excess(wait, pool, s)
    top = max(share.values(), default=0.0)
    floor = math.log(s.min_share)
    return {n: max(floor, v - top) for n, v in share.items()}


#: How fast (per second, on the log-share) a node's locality weight follows its excess wait.
_LOCALITY_GAIN_PER_S = 0.05


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


def _speeds(
    ready: list[Replica],
    loads: Mapping[str, Load],
    fresh: Mapping[str, float],
    memory: Memory,
    now: float,
    dt: float | None,
    s: PolicySettings,
) -> tuple[dict[str, float], dict[str, float]]:
    """Each ready replica's decode speed smoothed over speed_window_s, and when the last
    one was read. A fresh speed moves it; without one it is held until twice stale_after_s
    after that reading (an idle replica reads none), then forgotten."""
    alpha = 1.0 if not dt else 1.0 - math.exp(-dt / s.speed_window_s)
    speed: dict[str, float] = {}
    speed_at: dict[str, float] = {}
    for r in ready:
        a = r.address
        load = loads.get(a)
        before = memory.speed.get(a)
        if load is not None and load.decode_speed is not None and fresh[a] >= 1.0:
            reading = load.decode_speed
            speed[a] = reading if before is None else before + alpha * (reading - before)
            speed_at[a] = load.read_at
        elif before is not None and now - memory.speed_at.get(a, now) < 2 * s.stale_after_s:
            speed[a] = before
            speed_at[a] = memory.speed_at[a]
    return speed, speed_at


def _assemble(pool: Pool, endpoints: dict[str, int],
              node_share: Mapping[str, float] | None = None) -> Weights:
    """Locality weights: the sums of their ready replicas' weights (times the node's share,
    where the policy weighs nodes apart from replicas)."""
    localities: dict[str, int] = dict.fromkeys(pool.nodes, 0)
    for r in pool.replicas:
        if r.state is ReplicaState.READY:
            localities[r.node] += endpoints.get(r.address, 0)
    share = node_share or {}
    return Weights(
        endpoints=endpoints,
        localities={node: max(MIN_WEIGHT, round(w * share.get(node, 1.0)))
                    for node, w in localities.items()},
    )
