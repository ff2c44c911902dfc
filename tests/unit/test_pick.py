"""The picker's decision and its reading of request bodies."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from xds_server.extproc.pick import (
    Candidate,
    Rank,
    Unreadable,
    least_loaded_rank,
    pick,
    queue_of,
    queued,
    ranked,
    read_request,
    room_now,
)
from xds_server.extproc.state import LocalState, PendingPicks, PickLedger, PrefixHolders
from xds_server.model import Load, Pool, Replica
from xds_server.policy.load import expected_wait
from xds_server.policy.weights import Explanation
from xds_server.settings import PickSettings
from xds_server.state import State

S = PickSettings(max_num_seqs=10)
IDLE = Candidate("10.0.0.1:8000", "a", 1, 0, 0)
BUSY = Candidate("10.0.0.2:8000", "b", 1, 5, 1)
BIG = Candidate("10.0.0.3:8000", "b", 2, 5, 1)


def test_least_expected_wait_wins() -> None:
    assert pick([BUSY, IDLE], prefix_holders=(), settings=S) == IDLE


def test_capacity_divides_the_wait() -> None:
    # 5 running + 1 waiting over two ranks is less load per slot than over one.
    assert pick([BUSY, BIG], prefix_holders=(), settings=S) == BIG


def test_pending_picks_count_against_a_replica() -> None:
    crowded = Candidate("10.0.0.1:8000", "a", 1, 0, 0, pending=10)
    assert pick([crowded, BUSY], prefix_holders=(), settings=S) == BUSY


def test_prefix_affinity_breaks_near_ties_but_not_a_queue() -> None:
    slightly_busy = Candidate("10.0.0.4:8000", "a", 1, 1, 0)
    assert pick([IDLE, slightly_busy], prefix_holders={slightly_busy.address},
                settings=S) == slightly_busy
    full = Candidate("10.0.0.5:8000", "a", 1, 10, 8)  # a queue past the room threshold
    assert pick([IDLE, full], prefix_holders={full.address}, settings=S) == IDLE


def test_ties_go_to_the_lexically_first_address() -> None:
    twin = Candidate("10.0.0.9:8000", "b", 1, 0, 0)
    assert pick([twin, IDLE], prefix_holders=(), settings=S) == IDLE


def test_no_candidates_no_pick() -> None:
    assert pick([], prefix_holders=(), settings=S) is None


def body(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_chat_and_completion_bodies_are_read() -> None:
    long = "x" * 300
    chat = read_request(body(model="m", messages=[{"role": "user", "content": long}]),
                        "application/json", S)
    completion = read_request(body(model="m", prompt=long), "application/json; charset=utf-8", S)
    assert chat.model == "m" and chat.prompt_chars == 300
    assert chat.prefix == completion.prefix != ""
    short = read_request(body(model="m", prompt="hi"), "application/json", S)
    assert short.prefix == ""  # shorter than one block: no affinity


@pytest.mark.parametrize(
    ("raw", "content_type", "reason"),
    [
        (b"{", "application/json", "bad_json"),
        (b"[1]", "application/json", "bad_json"),
        (body(prompt="x"), "application/json", "no_model"),
        (body(model=3), "application/json", "no_model"),
        (body(model="m"), "text/plain", "not_json"),
        (b" " * 1_000_001, "application/json", "too_large"),
    ],
)
def test_unreadable_bodies_name_their_reason(raw: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(Unreadable) as caught:
        read_request(raw, content_type, S)
    assert caught.value.reason == reason


def test_prefix_holders_are_bounded() -> None:
    holders = PrefixHolders(capacity=2)
    for i in range(3):
        holders.add(f"p{i}", f"r{i}")
    assert holders.get("p0") == frozenset() and holders.get("p2") == {"r2"}


def test_a_prefix_holder_is_favoured_by_at_most_one_request_per_rank() -> None:
    """With the room still at its hint (no queue seen), a holder's wait reads ~0 however
    many requests it has: the bonus stops one request per rank past the emptiest."""
    roomy = PickSettings(max_num_seqs=256)
    holder = Candidate("10.0.0.2:8000", "b", 2, 2, 0)  # one per rank more than IDLE
    assert pick([IDLE, holder], prefix_holders={holder.address}, settings=roomy) == holder
    piled = replace(holder, running=3)  # 1.5 per rank more
    assert pick([IDLE, piled], prefix_holders={piled.address}, settings=roomy) == IDLE


def test_every_replica_a_prefix_went_to_holds_it() -> None:
    holders = PrefixHolders()
    for address in ("r1", "r2", "r1"):
        holders.add("system prompt", address)
    assert holders.get("system prompt") == {"r1", "r2"}
    assert holders.get("") == frozenset()


def test_a_prefix_every_replica_holds_does_not_pile_requests_on_one() -> None:
    """A shared system prompt: once every replica has taken it, the least loaded wins again
    (with the last taker alone favoured, the whole pool's traffic went to one replica)."""
    a = Candidate("10.0.0.1:8000", "a", 1, 1, 0)
    b = Candidate("10.0.0.2:8000", "b", 1, 0, 0)
    assert pick([a, b], prefix_holders={a.address}, settings=S) == a
    assert pick([a, b], prefix_holders={a.address, b.address}, settings=S) == b


def test_pending_counts_only_picks_after_the_reading() -> None:
    pending = PendingPicks(horizon_s=300)
    pending.add("r", now=100.0)
    pending.add("r", now=200.0)
    assert pending.since("r", read_at=150.0, now=201.0) == 1
    assert pending.since("r", read_at=50.0, now=201.0) == 2
    assert pending.since("r", read_at=50.0, now=1000.0) == 0  # past the horizon


def test_own_requests_a_reading_does_not_show_yet_still_count() -> None:
    """vLLM counts a request once its front end hands it to the engine: a reading taken
    just after three picks shows none of them, and the picks made since it are none."""
    ledger = PickLedger()
    for _ in range(3):
        ledger.pick("r")
    read_at = time.time() + 1  # taken after the picks
    assert ledger.unread("r", read_at, shown=0) == 3
    assert ledger.unread("r", read_at, shown=2) == 1  # two of them are in it now
    assert ledger.unread("r", read_at, shown=5) == 0  # others' requests: the picks since
    ledger.done("r")
    assert ledger.unread("r", read_at, shown=0) == 2
    # An end with no pick seen (the picker restarted) makes nothing negative.
    for _ in range(4):
        ledger.done("r")
    ledger.pick("r")
    assert ledger.unread("r", time.time() + 1, shown=0) == 1


def test_a_fallback_moves_the_own_request_with_its_rank() -> None:
    ledger = PickLedger()
    ledger.pick("a", rank=1)
    ledger.served("a", "b", rank=1)
    later = time.time() + 1
    assert [ledger.unread(k, later, shown=0) for k in ("a", "a#1", "b", "b#1")] == [0, 0, 1, 1]
    ledger.done("b", rank=1)
    assert [ledger.unread(k, later, shown=0) for k in ("b", "b#1")] == [0, 0]


def test_a_reading_that_misses_the_own_requests_reads_full() -> None:
    """Both replicas read 3 of 4 slots busy; the first also has two picks of the picker's
    own that its reading does not show yet: it is full, the second is not."""
    state = State()
    state.set_pools("file", [Pool("m", (Replica("10.0.0.1", 8000, "n1"),
                                        Replica("10.0.0.2", 8000, "n2")))])
    local = LocalState(state)
    local.note_pick("10.0.0.1:8000")
    local.note_pick("10.0.0.1:8000")
    now = time.time() + 1
    state.set_loads({"10.0.0.1:8000": Load(3, 0, read_at=now),
                     "10.0.0.2:8000": Load(3, 0, read_at=now)})
    four = PickSettings(max_num_seqs=4)
    candidates = local.candidates("m") or []
    assert [c.pending for c in candidates] == [0.0, 0.0]  # the reading shows 3 >= 2 own
    state.set_loads({"10.0.0.1:8000": Load(0, 0, read_at=now),
                     "10.0.0.2:8000": Load(3, 0, read_at=now)})
    candidates = local.candidates("m") or []
    assert [c.pending for c in candidates] == [2.0, 0.0]
    chosen = pick(candidates, prefix_holders=(), settings=four)
    assert chosen is not None and chosen.address == "10.0.0.1:8000"  # 2 of 4 < 3 of 4
    state.set_loads({"10.0.0.1:8000": Load(3, 0, read_at=now),
                     "10.0.0.2:8000": Load(2, 0, read_at=now)})
    local.note_pick("10.0.0.1:8000")
    local.note_pick("10.0.0.1:8000")
    chosen = pick(local.candidates("m") or [], prefix_holders=(), settings=four)
    assert chosen is not None and chosen.address == "10.0.0.2:8000"  # 4 own: full


def test_requests_ended_since_the_reading_come_off_its_count() -> None:
    state = State()
    state.set_pools("file", [Pool("m", (Replica("10.0.0.1", 8000, "n1"),
                                        Replica("10.0.0.2", 8000, "n2")))])
    read_at = time.time() - 5
    state.set_loads({"10.0.0.1:8000": Load(3, 1, read_at=read_at),
                     "10.0.0.2:8000": Load(2, 0, read_at=read_at)})
    local = LocalState(state)
    for _ in range(2):
        local.note_pick("10.0.0.2:8000")
    for _ in range(3):
        local.note_done("10.0.0.1:8000")  # picked before the reading, ended after it
    pending = {c.address: c.pending for c in local.candidates("m") or []}
    assert pending == {"10.0.0.1:8000": -3, "10.0.0.2:8000": 2}
    # The picker now sees 1 request at the first replica and 4 at the second.
    chosen = pick(local.candidates("m") or [], prefix_holders=(), settings=S)
    assert chosen is not None and chosen.address == "10.0.0.1:8000"
    # A reading taken after them includes them both ways.
    state.set_loads({"10.0.0.1:8000": Load(1, 0, read_at=time.time() + 1),
                     "10.0.0.2:8000": Load(4, 0, read_at=time.time() + 1)})
    assert {c.address: c.pending for c in local.candidates("m") or []} == {
        "10.0.0.1:8000": 0, "10.0.0.2:8000": 0}
    # The control plane's relative speeds and learnt rooms come with them.
    judged = {"10.0.0.2:8000": Explanation(0.5, 1.0, 100.0, 100.0, relative_speed=0.5,
                                           slots=4.0)}
    slow = LocalState(state, judged=lambda pool, address: judged.get(address))
    assert [(c.speed, c.slots) for c in slow.candidates("m") or []] == [(1.0, None), (0.5, 4.0)]


def test_a_slow_replica_waits_longer_for_the_same_queue() -> None:
    """Its decode speed stretches its wait: a third of the speed, three times the wait."""
    four = PickSettings(max_num_seqs=4)
    slow = Candidate("10.0.0.1:8000", "a", 1, 4, 1, speed=1 / 3)  # 2 ahead, at a third
    fast = Candidate("10.0.0.2:8000", "b", 1, 4, 3)  # 4 ahead at full speed
    assert pick([slow, fast], prefix_holders=(), settings=four) == fast
    assert pick([slow, replace(fast, speed=1 / 3)], prefix_holders=(), settings=four) == slow


def test_a_learnt_room_outweighs_the_configured_hint() -> None:
    """With no reading of a queue, the hint (256) reads every replica as free; the room the
    control plane learnt from vLLM does not: 3 running at a room of 3 is full."""
    full = Candidate("10.0.0.1:8000", "a", 1, 3, 0, slots=3.0)
    half = Candidate("10.0.0.2:8000", "b", 1, 2, 0, slots=3.0)
    assert queued(full, queue_of(full, S), 256) > 0 == queued(half, queue_of(half, S), 256)
    assert pick([full, half], prefix_holders={full.address}, settings=S) == half
    # Without it, both read free and the prefix holder wins.
    assert pick([replace(full, slots=None), replace(half, slots=None)],
                prefix_holders={full.address}, settings=S).address == full.address


def test_more_ended_than_read_counts_as_idle_not_below() -> None:
    assert expected_wait(1, 0, 1, 4, pending=-3) == expected_wait(0, 0, 1, 4)


def test_a_queue_loses_to_a_free_slot_whatever_the_configured_room() -> None:
    # The replicas run 4 per rank (read from the one with requests waiting), not 256.
    queued = Candidate("10.0.0.6:8000", "a", 1, 4, 3)
    roomy = PickSettings(max_num_seqs=256)
    assert pick([IDLE_B, queued], prefix_holders=(), settings=roomy) == IDLE_B


IDLE_B = Candidate("10.0.0.7:8000", "b", 1, 1, 0)


def test_a_full_replica_is_a_wait_for_the_new_request() -> None:
    """Every slot busy: the new request queues behind them, which a warm prefix cache is not
    worth while another replica has a slot free, nor is a longer list over more slots."""
    four = PickSettings(max_num_seqs=4)
    full = Candidate("10.0.0.1:8000", "a", 1, 4, 0)  # 4 of 4 slots busy
    free = Candidate("10.0.0.2:8000", "b", 1, 3, 0)  # one slot free
    assert pick([full, free], prefix_holders={full.address}, settings=four) == free
    big = Candidate("10.0.0.3:8000", "b", 8, 32, 1)  # 2 ahead of it over 32 slots
    assert pick([full, big], prefix_holders=(), settings=four) == big


def test_a_held_request_is_picked_on_its_node_and_its_fallbacks_from_the_pool() -> None:
    local = Candidate("10.0.0.6:8000", "c", 1, 8, 0)  # the fullest, alone on node c
    order = ranked([IDLE, IDLE_B, local], prefix_holders=(), settings=S, held_on="c")
    assert order == [local, IDLE, IDLE_B]
    assert ranked([IDLE, IDLE_B, local], prefix_holders=(), settings=S)[0] == IDLE


def test_a_held_request_goes_to_the_pool_when_its_node_has_no_candidate() -> None:
    order = ranked([IDLE_B, IDLE], prefix_holders=(), settings=S, held_on="d")
    assert order == [IDLE, IDLE_B]


FOUR = PickSettings(max_num_seqs=4)
#: Two servers of two ranks at a room of 4 per rank, 8 requests each: the first has both
#: ranks full, the second one rank with a queue and one with a free slot.
BOTH_FULL = Candidate("10.0.0.1:8000", "a", 2, 8, 0, slots=4.0,
                      ranks=(Rank(0, 4, 0), Rank(1, 4, 0)))
ONE_FREE = Candidate("10.0.0.2:8000", "b", 2, 5, 1, pending=2, slots=4.0,
                     ranks=(Rank(0, 4, 1), Rank(1, 1, 0, pending=2)))


def test_a_pinned_request_waits_in_its_rank_not_in_the_server_sum() -> None:
    """Summed over the server both read full (8 of 8) and the tie went to the first
    address, a full rank; the picker names the rank, so the second server's free slot is
    what the request gets."""
    assert pick([BOTH_FULL, ONE_FREE], prefix_holders=(), settings=FOUR) == ONE_FREE
    assert least_loaded_rank(ONE_FREE, FOUR) == 1
    assert queued(ONE_FREE, queue_of(ONE_FREE, FOUR), 4) == 0 < queued(
        BOTH_FULL, queue_of(BOTH_FULL, FOUR), 4)
    # Without the rank choice, the server's own balancer spreads: its sum is the queue.
    no_pin = replace(FOUR, pin_rank=False)
    assert queued(ONE_FREE, queue_of(ONE_FREE, no_pin), 4) == queued(
        BOTH_FULL, queue_of(BOTH_FULL, no_pin), 4) > 0
    assert pick([BOTH_FULL, ONE_FREE], prefix_holders=(), settings=no_pin) == BOTH_FULL


def test_a_node_whose_ranks_are_all_full_does_not_hold_a_request_beside_a_free_rank() -> None:
    """Four full ranks read, summed, as a queue of a sixteenth against the other server's
    eighth: the node held the request on a full rank. Rank by rank it queues, and the
    request goes to the free slot."""
    big_full = Candidate("10.0.0.3:8000", "c", 4, 16, 0, slots=4.0,
                         ranks=tuple(Rank(i, 4, 0) for i in range(4)))
    assert ranked([big_full, ONE_FREE], prefix_holders=(), settings=FOUR,
                  held_on="c")[0] == ONE_FREE
    # With a free slot of its own the node still holds it.
    roomy = replace(big_full, running=15, ranks=(*big_full.ranks[:3], Rank(3, 3, 0)))
    assert ranked([roomy, ONE_FREE], prefix_holders=(), settings=FOUR,
                  held_on="c")[0] == roomy


def test_the_rank_named_has_a_free_slot_before_one_with_fewer_waiting() -> None:
    """vLLM's weighting of a waiting request (4x) named a full rank (4 running) over one
    with 3 requests, 2 of them waiting for the next scheduler step."""
    lagging = Candidate("10.0.0.4:8000", "a", 2, 5, 2, slots=4.0,
                        ranks=(Rank(0, 1, 2), Rank(1, 4, 0)))
    assert least_loaded_rank(lagging, FOUR) == 0
    # Among ranks with as many requests, the one with fewer waiting.
    even = replace(lagging, ranks=(Rank(0, 1, 2), Rank(1, 3, 0)))
    assert least_loaded_rank(even, FOUR) == 1


def test_a_room_not_yet_learnt_is_what_the_busiest_rank_runs() -> None:
    """Before the control plane has learnt a room, the picker reads one from the ranks now.
    Averaged over a server, one full rank (4 running, 1 waiting) beside an idle one read 2
    per rank, so the node's own rank with 3 requests read full and the request left a node
    with a free slot."""
    lopsided = Candidate("10.0.0.1:8000", "b", 2, 4, 1, ranks=(Rank(0, 4, 1), Rank(1, 0, 0)))
    local = Candidate("10.0.0.2:8000", "a", 1, 3, 0, ranks=(Rank(0, 3, 0),))
    assert room_now([lopsided, local], S) == 4
    assert ranked([lopsided, local], prefix_holders=(), settings=S, held_on="a")[0] == local
    # With no rank full anywhere, nothing is read and the configured hint stands in.
    assert room_now([local], S) == S.max_num_seqs
