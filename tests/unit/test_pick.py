"""The picker's decision and its reading of request bodies."""

from __future__ import annotations

import json

import pytest

from xds_server.extproc.pick import (
    Candidate,
    KeepCredits,
    Unreadable,
    pick,
    ranked,
    read_request,
)
from xds_server.extproc.state import PendingPicks, PrefixOwners
from xds_server.settings import PickSettings

S = PickSettings(max_num_seqs=10)
IDLE = Candidate("10.0.0.1:8000", "a", 1, 0, 0)
BUSY = Candidate("10.0.0.2:8000", "b", 1, 5, 1)
BIG = Candidate("10.0.0.3:8000", "b", 2, 5, 1)


def test_least_expected_wait_wins() -> None:
    assert pick([BUSY, IDLE], prefix_owner=None, settings=S) == IDLE


def test_capacity_divides_the_wait() -> None:
    # 5 running + 1 waiting over two ranks is less load per slot than over one.
    assert pick([BUSY, BIG], prefix_owner=None, settings=S) == BIG


def test_pending_picks_count_against_a_replica() -> None:
    crowded = Candidate("10.0.0.1:8000", "a", 1, 0, 0, pending=10)
    assert pick([crowded, BUSY], prefix_owner=None, settings=S) == BUSY


def test_prefix_affinity_breaks_near_ties_but_not_a_queue() -> None:
    slightly_busy = Candidate("10.0.0.4:8000", "a", 1, 1, 0)
    assert pick([IDLE, slightly_busy], prefix_owner=slightly_busy.address,
                settings=S) == slightly_busy
    full = Candidate("10.0.0.5:8000", "a", 1, 10, 8)  # a queue past the room threshold
    assert pick([IDLE, full], prefix_owner=full.address, settings=S) == IDLE


def test_ties_go_to_the_lexically_first_address() -> None:
    twin = Candidate("10.0.0.9:8000", "b", 1, 0, 0)
    assert pick([twin, IDLE], prefix_owner=None, settings=S) == IDLE


def test_no_candidates_no_pick() -> None:
    assert pick([], prefix_owner=None, settings=S) is None


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


def test_prefix_owners_are_bounded() -> None:
    owners = PrefixOwners(capacity=2)
    for i in range(3):
        owners.set(f"p{i}", f"r{i}")
    assert owners.get("p0") is None and owners.get("p2") == "r2"


def test_pending_counts_only_picks_after_the_reading() -> None:
    pending = PendingPicks(horizon_s=300)
    pending.add("r", now=100.0)
    pending.add("r", now=200.0)
    assert pending.since("r", read_at=150.0, now=201.0) == 1
    assert pending.since("r", read_at=50.0, now=201.0) == 2
    assert pending.since("r", read_at=50.0, now=1000.0) == 0  # past the horizon


def test_a_queue_loses_to_a_free_slot_whatever_the_configured_room() -> None:
    # The replicas run 4 per rank (read from the one with requests waiting), not 256.
    queued = Candidate("10.0.0.6:8000", "a", 1, 4, 3)
    roomy = PickSettings(max_num_seqs=256)
    assert pick([IDLE_B, queued], prefix_owner=None, settings=roomy) == IDLE_B


IDLE_B = Candidate("10.0.0.7:8000", "b", 1, 1, 0)


def test_a_full_replica_is_a_wait_for_the_new_request() -> None:
    """Every slot busy: the new request queues behind them, which a warm prefix cache is not
    worth while another replica has a slot free, nor is a longer list over more slots."""
    four = PickSettings(max_num_seqs=4)
    full = Candidate("10.0.0.1:8000", "a", 1, 4, 0)  # 4 of 4 slots busy
    free = Candidate("10.0.0.2:8000", "b", 1, 3, 0)  # one slot free
    assert pick([full, free], prefix_owner=full.address, settings=four) == free
    big = Candidate("10.0.0.3:8000", "b", 8, 32, 1)  # 2 ahead of it over 32 slots
    assert pick([full, big], prefix_owner=None, settings=four) == big


def test_a_held_request_is_picked_on_its_node_and_its_fallbacks_from_the_pool() -> None:
    local = Candidate("10.0.0.6:8000", "c", 1, 8, 0)  # the fullest, alone on node c
    order = ranked([IDLE, IDLE_B, local], prefix_owner=None, settings=S, held_on="c")
    assert order == [local, IDLE, IDLE_B]
    assert ranked([IDLE, IDLE_B, local], prefix_owner=None, settings=S)[0] == IDLE


def test_a_held_request_goes_to_the_pool_when_its_node_has_no_candidate() -> None:
    order = ranked([IDLE_B, IDLE], prefix_owner=None, settings=S, held_on="d")
    assert order == [IDLE, IDLE_B]


def credits_held(keep: int, requests: int) -> list[bool]:
    credits = KeepCredits()
    return [credits.hold("m", "a", keep) for _ in range(requests)]


def test_keep_credits_hold_exactly_the_keep_share_evenly() -> None:
    assert credits_held(1000, 8) == [True] * 8
    assert credits_held(0, 8) == [False] * 8
    assert credits_held(250, 8) == [False, False, False, True] * 2
    assert sum(credits_held(700, 1000)) == 700


def test_keep_credits_count_each_pool_and_node_apart() -> None:
    credits = KeepCredits()
    held = [(credits.hold("m", "a", 500), credits.hold("m", "b", 500),
             credits.hold("n", "a", 500)) for _ in range(2)]
    assert held == [(False, False, False), (True, True, True)]
    assert not any(credits.hold("m", "", 1000) for _ in range(3))  # no node: nothing held
