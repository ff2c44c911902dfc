"""The endpoint picker's decision: no I/O, no protobuf.

What a request tells the picker (`read_request`) and which replica it goes to (`ranked`).
The score of a replica is its expected wait in service times, from the load model the
weight policy uses too (policy/load.py: the requests queued ahead of this one per slot, 0
while a slot is free, plus a hundredth of the load per slot), with the room per rank and
the decode speed against the pool's typical that the control plane's weights use for the
replica (`Candidate.slots`, `Candidate.speed`); where no room is learnt yet, the room is what
the busiest rank runs once some candidate has requests waiting (`max_num_seqs` only while
none has; `room_now`):

    wait     = expected_wait(running, waiting, capacity, slots, pending) / speed
    score    = wait
               - affinity_bonus   if the request's leading block was sent there before
                                  (its KV cache likely holds the prefix), that
                                  replica's wait is below room_threshold and it has at
                                  most one request per rank more than the emptiest

The counts are those of the rank the picker names there, where it names one
(`least_loaded_rank`): a pinned request queues for that rank's slots alone, and summed over
the server a full rank beside a free one read as room, a server with one rank free as full
as one with none. Else (ranks unknown, or `--extproc-pin-rank false`) the whole server's.

`pending` corrects the latest load reading by what the picker saw since it was taken: its
own picks sent there (vLLM's internal balancer counts its own picks the same way) less its
picked requests that ended there (Envoy hands the picker each response's end), and at least
its own requests there that the reading does not show (extproc/state.py's `PickLedger`). Lowest
score wins; ties go to the lexically first address, so that two pickers with the same state
agree.

Locality is a rule, not a score: a request from an Envoy on node N is held on N (picked
among N's candidates only; all candidates when N has none) while N's pick queues no longer
than the pool's (`queue_wait`): the picker sees each request, so keeping one local costs it
no wait, and a node spills exactly when and as much as its replicas are full. The keep share
says only whether N holds at all (above 0); its fraction is for Envoy's own route split when
no picker runs, which cannot see when a node is full (a fraction applied here sent requests
off a node with free slots). With `--local-first false` every keep share is 0: nothing is
held on its node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from xds_server.policy.load import expected_wait, per_slot, queue_wait, slots_now
from xds_server.settings import PickSettings


@dataclass(frozen=True)
class Candidate:
    address: str
    node: str
    capacity: int
    running: float
    waiting: float
    #: What the load reading misses (extproc/state.py's PickLedger.unread).
    pending: float = 0.0
    #: Per-rank loads behind a hybrid-mode server, by LOCAL rank index (0..capacity-1);
    #: empty where the server's engines are not known one by one.
    ranks: tuple[Rank, ...] = ()
    #: Its decode speed against the pool's typical (the control plane's, as in its weight;
    #: above 0, as the policy clamps it and state._parse checks it): a wait at a third of
    #: the speed lasts three times as long.
    speed: float = 1.0
    #: The room per rank its load is read against, as the control plane learnt it from
    #: vLLM (None: not yet learnt, the candidates' own reckoning, `slots_now`, stands in).
    slots: float | None = None


@dataclass(frozen=True)
class Rank:
    """One engine of a replica as the picker sees it: its local index and its load."""

    index: int
    running: float
    waiting: float
    pending: float = 0.0


@dataclass(frozen=True)
class RequestInfo:
    model: str
    prompt_chars: int
    #: Hash of the prompt's leading block; empty when the prompt is shorter than one block.
    prefix: str


class Unreadable(ValueError):
    """The body cannot be used; `reason` is the counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_request(body: bytes, content_type: str, settings: PickSettings) -> RequestInfo:
    """The model, the prompt's length and its leading block from an OpenAI-style body."""
    if "json" not in content_type.lower():
        raise Unreadable("not_json", f"content type {content_type!r}")
    if len(body) > settings.max_body_bytes:
        raise Unreadable("too_large", f"{len(body)} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise Unreadable("bad_json", str(exc)[:200]) from exc
    if not isinstance(doc, dict):
        raise Unreadable("bad_json", "the body is not a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise Unreadable("no_model", "no 'model' string")
    text = _prompt_text(doc)
    leading = text[: settings.prefix_chars]
    prefix = (
        hashlib.blake2b(leading.encode(errors="surrogatepass"), digest_size=8).hexdigest()
        if len(leading) == settings.prefix_chars
        else ""
    )
    return RequestInfo(model=model, prompt_chars=len(text), prefix=prefix)


def _prompt_text(doc: dict[str, object]) -> str:
    """Chat messages' text joined in order, or a completion's prompt."""
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: keep the text ones
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return ""


#: (running, waiting, ranks, pending) of the queue a new request joins at a candidate.
Queue = tuple[float, float, int, float]


def queue_of(c: Candidate, settings: PickSettings) -> Queue:
    """The queue a new request joins there: the rank the picker would name, where it names
    one, else the whole server's (the module docstring says why)."""
    k = _least_loaded(c, settings)
    if k is None:
        return c.running, c.waiting, c.capacity, c.pending
    return k.running, k.waiting, 1, k.pending


def queued(c: Candidate, q: Queue, slots: float) -> float:
    """The wait of a new request in queue `q` at `c`, without the tie-break; `slots` is the
    room where the control plane has not learnt the candidate's own."""
    running, waiting, ranks, pending = q
    return queue_wait(running, waiting, ranks, c.slots or slots, pending) / c.speed


def _wait(c: Candidate, q: Queue, slots: float) -> float:
    running, waiting, ranks, pending = q
    return expected_wait(running, waiting, ranks, c.slots or slots, pending) / c.speed


def _per_rank(c: Candidate) -> float:
    return per_slot(c.running, c.waiting, c.capacity, 1.0, c.pending)


def on_node(candidates: list[Candidate], node: str) -> list[Candidate]:
    """The candidates on `node`; all of them when none is there."""
    local = [c for c in candidates if c.node == node]
    return local or candidates


def pick(
    candidates: list[Candidate],
    *,
    prefix_holders: Collection[str],
    settings: PickSettings,
) -> Candidate | None:
    """The candidate with the lowest score (see the module docstring); None if none."""
    return _pick(candidates, {c.address: queue_of(c, settings) for c in candidates},
                 room_now(candidates, settings), prefix_holders, settings)


def room_now(candidates: list[Candidate], settings: PickSettings) -> float:
    """The room per rank of the candidates the control plane has learnt none for, from
    their readings now, rank by rank where they are known (a server's mean over its ranks
    reads a full rank beside an idle one as half full)."""
    def readings() -> Iterator[tuple[float, float, int]]:
        for c in candidates:
            if c.ranks:
                yield from ((r.running, r.waiting, 1) for r in c.ranks)
            else:
                yield c.running, c.waiting, c.capacity
    return slots_now(readings(), settings.max_num_seqs)


def _pick(candidates: list[Candidate], queues: dict[str, Queue], slots: float,
          prefix_holders: Collection[str], settings: PickSettings) -> Candidate | None:
    best: tuple[float, str] | None = None
    chosen: Candidate | None = None
    # A warm prefix is worth at most one request per rank more than the emptiest replica
    # has: the room per rank may still be the configured hint (no reading shows a queue
    # yet), and a bonus against that let the first holder of a shared prompt take nearly
    # every request for seconds.
    emptiest = min((_per_rank(c) for c in candidates), default=0.0)
    for c in candidates:
        w = _wait(c, queues[c.address], slots)
        score = w
        if (c.address in prefix_holders and w < settings.room_threshold
                and _per_rank(c) <= emptiest + 1):
            score -= settings.affinity_bonus
        key = (score, c.address)
        if best is None or key < best:
            best, chosen = key, c
    return chosen


def ranked(
    candidates: list[Candidate],
    *,
    prefix_holders: Collection[str],
    settings: PickSettings,
    held_on: str = "",
) -> list[Candidate]:
    """The pick first, then up to `settings.fallbacks` more, each the pick among the rest.
    `held_on` names the node a held request is picked on (see the module docstring); its
    fallbacks come from the whole pool, for a retry to find a replica where the node has none
    left."""
    # Once per request, not per pass: naming the rank costs a scan of each server's ranks.
    queues = {c.address: queue_of(c, settings) for c in candidates}
    slots = room_now(candidates, settings)
    left = list(candidates)
    out: list[Candidate] = []
    while left and len(out) <= settings.fallbacks:
        chosen = _pick(left, queues, slots, prefix_holders, settings)
        if held_on and not out and chosen is not None:
            local = _pick(on_node(left, held_on), queues, slots, prefix_holders, settings)
            if (local is not None and queued(local, queues[local.address], slots)
                    <= queued(chosen, queues[chosen.address], slots)):
                chosen = local
        if chosen is None:
            break
        out.append(chosen)
        left.remove(chosen)
    return out


def in_subset(candidates: list[Candidate], subset: frozenset[str]) -> list[Candidate]:
    """The candidates the proxy allows (the protocol's subset hint)."""
    return [c for c in candidates if c.address in subset]


def all_queued(candidates: list[Candidate], settings: PickSettings) -> bool:
    """True when every candidate has more than `max_queue` waiting (and the bound is on)."""
    return settings.max_queue > 0 and all(c.waiting > settings.max_queue for c in candidates)


def least_loaded_rank(c: Candidate, settings: PickSettings) -> int | None:
    """The local index of the replica's rank with the fewest requests (the one with a free
    slot, if any has), among equals the one with fewer waiting (vLLM's balancer weighs a
    waiting request more), then the lowest index; None when its ranks are not known one by
    one or the rank choice is off."""
    best = _least_loaded(c, settings)
    return None if best is None else best.index


def _least_loaded(c: Candidate, settings: PickSettings) -> Rank | None:
    if not c.ranks or not settings.pin_rank:
        return None
    factor = settings.waiting_factor
    # Readings are never below 0 (the sources drop such); the ledger's pending may be.
    return min(c.ranks, key=lambda r: (max(0.0, r.running + r.waiting + r.pending),
                                       r.running + factor * r.waiting + r.pending, r.index))
