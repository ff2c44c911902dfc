"""The one model of a replica's load that the weights, the keep shares and the picker share.

A replica of `capacity` ranks runs `slots` sequences per rank at once (vLLM's
`--max-num-seqs`, or fewer when the KV cache is the limit). Its load per slot,

    per_slot = (running + waiting + pending) / (capacity * slots)

is below 1 while some slot is free and past 1 when requests queue. `pending` corrects the
reading by what its sender saw since it was taken: requests sent there that no reading
includes yet, less (for the picker, which sees requests end) those that ended since; the
sum is never below 0. A NEW request waits behind the requests
that have no slot once it is counted too:

    ahead = running + waiting + pending + 1 - capacity * slots
    wait  = max(0, ahead) / (capacity * slots)

in units of one request's service time: 0 while a slot is free for it, and at exactly full
(`per_slot` = 1) a whole slot's turn, not 0.

`slots` is read from what vLLM reports rather than configured. A rank never runs more than
its room, so the most a rank has run is a floor on it, and the room is learnt as that, at
once. A rank with requests waiting suggests it is full, but vLLM takes its counts after a
step, when the requests that finished in it have left `running` and the waiting ones get
their slots only at the next schedule (and a server that counts a request arriving during a
step as waiting shows it beside free slots): such a reading only pulls the room down a
little at a time (`_SHRINK`), so that a room the KV cache lowers for good is learnt over
tens of readings while such a moment is not (it made replicas read 4x as full as they
were). A replica's first full reading starts its room at no less than the most any rank of
the pool runs or was learnt to hold, for the same reason. A server's own `--max-num-seqs`,
where its pod's args or the pools file say it, is its room from the first reading (and
lowered the same slow way). The control plane's `--max-num-seqs` only stands in until a
pool has been seen full once.

A replica's lasting speed is its decode speed, output tokens per second per running request
(read by the sources from vLLM's token counter); `relative_speeds` compares it with the
pool's typical rank, so that a slow GPU is seen as slow before its queue shows it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping

from xds_server.model import Load

#: Weight of a full reading that runs less than the room learnt: slots freed in the step just
#: taken look like a smaller room for one reading; a KV-cache limit keeps looking like it.
_SHRINK = 0.05


def per_slot(running: float, waiting: float, capacity: int, slots: float,
             pending: float = 0.0) -> float:
    """Load per slot: < 1 while a slot is free; past 1, the queue per slot (see above)."""
    return _busy(running, waiting, pending) / (max(1, capacity) * max(1.0, slots))


def _busy(running: float, waiting: float, pending: float) -> float:
    return max(0.0, max(0.0, running) + max(0.0, waiting) + pending)


def expected_wait(running: float, waiting: float, capacity: int, slots: float,
                  pending: float = 0.0) -> float:
    """What a request sent now waits, in service times, counting itself (see above: 0 while
    a slot is free for it), plus a hundredth of the load per slot so that among replicas
    with room the emptier wins."""
    return (queue_wait(running, waiting, capacity, slots, pending)
            + 0.01 * per_slot(running, waiting, capacity, slots, pending))


def queue_wait(running: float, waiting: float, capacity: int, slots: float,
               pending: float = 0.0) -> float:
    """`expected_wait` without the tie-break: 0 while a slot is free for a new request."""
    room = max(1, capacity) * max(1.0, slots)
    # From the counts, not the load per slot: a last free slot must read exactly 0.
    return max(0.0, _busy(running, waiting, pending) + 1.0 - room) / room


def observed_slots(load: Load, capacity: int) -> float | None:
    """Requests a rank runs when its scheduler is full (some waiting), or None if no rank
    was full in this reading."""
    if load.ranks:
        full = [r.running for r in load.ranks if r.waiting > 0 and r.running > 0]
        return sum(full) / len(full) if full else None
    if load.waiting > 0 and load.running > 0:
        return load.running / max(1, capacity)
    return None


def mean_wait(load: float, slots: float) -> float:
    """Mean wait of a request, in service times, at a steady load per slot `load` over
    `slots` slots serving one queue (Erlang C, M/M/n): what a node's own queue costs against
    the pool's. A small node waits longer than a big pool at the same load per slot, which
    is what keeping requests local costs; past a full load, 1 plus the queue per slot."""
    n = max(1, round(slots))
    if load >= 1.0:
        return 1.0 + (load - 1.0)
    offered = max(0.0, load) * n
    blocking = 1.0  # Erlang B by its recursion, stable for thousands of slots
    for k in range(1, n + 1):
        blocking = offered * blocking / (k + offered * blocking)
    waits = blocking / (1.0 - load * (1.0 - blocking))
    return min(1.0, waits / (n * (1.0 - load)))


def slots_now(readings: Iterable[tuple[float, float, int]], hint: int) -> float:
    """Room per rank from one moment's (running, waiting, ranks) readings, for a decider
    that keeps no history (the picker), read as `learn_slots` reads a pool's first full
    reading: once some reading has requests waiting, the most one rank runs (a rank never
    runs more than its room, and a full one runs less for a moment after requests finished
    in a step: their slots are filled by the next one); else `hint`."""
    busiest, full = 0.0, False
    for running, waiting, ranks in readings:
        busiest = max(busiest, running / max(1, ranks))
        full = full or (waiting > 0 and running > 0)
    return busiest if full else float(hint)


def busiest_rank(load: Load, capacity: int) -> float:
    """The most requests one rank runs in this reading (the mean where ranks are not
    reported): the room is at least this."""
    if load.ranks:
        return max(r.running for r in load.ranks)
    return load.running / max(1, capacity)


def learn_slots(previous: float | None, load: Load | None, capacity: int,
                pool_floor: float = 0.0, told: int | None = None) -> float | None:
    """A replica's room per rank: None until a reading shows it full; then at least what its
    busiest rank runs, and drawn slowly towards a full reading that runs less.

    The first full reading starts the room at no less than `pool_floor`, the most a rank of
    the pool runs or was learnt to hold (replicas of a pool run one configuration): that
    reading may show a full rank whose finished requests have just left it (see above), and
    a room started there reads the replica full below its load until a rank of its own runs
    more. A room the KV cache really lowers is still learnt, slowly, from there.

    `told`, the server's own `--max-num-seqs` where its pod or the pools file says it, is the
    room from the start, lowered the same way where the KV cache holds fewer."""
    if previous is None and told is not None:
        previous = float(told)
    if load is None:
        return previous
    seen = observed_slots(load, capacity)
    floor = busiest_rank(load, capacity)  # never below `seen`: the busiest of the full ranks
    if previous is None:
        return None if seen is None else max(floor, pool_floor)
    if floor > previous:
        return floor
    if seen is not None and seen < previous:
        return max(floor, previous + _SHRINK * (seen - previous))
    return previous


def pool_slots(learned: Mapping[str, float | None], addresses: Iterable[str],
               hint: int) -> dict[str, float]:
    """Each replica's room per rank: its own learnt one, else the pool's median (replicas of
    a pool run one configuration), else the configured hint."""
    known = [v for v in learned.values() if v is not None]
    fallback = statistics.median(known) if known else float(hint)
    return {a: (v if (v := learned.get(a)) is not None else fallback) for a in addresses}


def relative_speeds(speeds: Mapping[str, float], capacities: Mapping[str, int], *,
                    low: float, high: float) -> dict[str, float]:
    """Each replica's decode speed over the pool's typical one, clamped to [low, high].

    The typical speed is the capacity-weighted median (a rank's, not a replica's), taken
    from above: with two replicas, the faster one sets it, so a slow one loses weight
    rather than the others gaining it. A replica missing from `speeds` is absent here (it
    counts as typical); with no speed above zero anywhere, nothing is compared.
    """
    known = sorted((v, capacities.get(a, 1)) for a, v in speeds.items())
    half = sum(c for _v, c in known) / 2
    typical, seen = 0.0, 0
    for v, c in known:
        seen += c
        if seen > half:
            typical = v
            break
    if typical <= 0:
        return {}
    return {a: min(high, max(low, v / typical)) for a, v in speeds.items()}
