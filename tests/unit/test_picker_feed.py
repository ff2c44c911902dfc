"""/picker/state: the lean, versioned feed a picker in its own process follows."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from xds_server import admin
from xds_server.extproc.state import RemoteState, _parse
from xds_server.metrics import Metrics
from xds_server.model import Load, Pool, RankLoad, Replica, ReplicaState
from xds_server.policy.weights import Explanation, PolicySettings
from xds_server.publisher import Publisher
from xds_server.settings import (
    EnvoySettings,
    ExtprocSettings,
    PickSettings,
    Settings,
    TlsSettings,
    XdsSettings,
)
from xds_server.state import State
from xds_server.xds.cache import SnapshotCache

A, B = Replica("10.0.0.1", 8000, "n1", capacity=2, dp_rank=4), Replica("10.0.0.2", 8000, "n2")


def _hub() -> State:
    state = State()
    state.set_pools("file", [Pool("m", (A, B))])
    state.set_loads({A.address: Load(3, 1, read_at=100.0, ranks=(
        RankLoad("4", 2, 0), RankLoad("5", 1, 1)))})
    return state


def frozen_clock() -> float:
    """The feed's clock for tests that read each change at once: no rate limit, and a render
    takes no time, so its cost (real time on a loaded machine) never holds the next one."""
    return 0.0


@pytest.fixture
async def served() -> AsyncIterator[tuple[State, admin.PickerFeed, TestClient]]:
    state = _hub()
    feed = admin.PickerFeed(state, min_interval_s=0, clock=frozen_clock)
    app = admin.build_app(metrics=Metrics(), ready=lambda: True, state=dict,
                          picker_feed=feed)
    async with TestClient(TestServer(app)) as client:
        yield state, feed, client


async def test_feed_holds_what_the_picker_reads(
    served: tuple[State, admin.PickerFeed, TestClient]
) -> None:
    state, _, client = served
    response = await client.get("/picker/state")
    assert response.status == 200
    assert abs(float(response.headers["X-Hybridlb-Time"]) - time.time()) < 60
    doc = await response.json()
    assert doc["version"] == state.version
    [pool] = doc["pools"]
    assert pool["name"] == "m"
    rows = [dict(zip(doc["fields"], row, strict=True)) for row in pool["replicas"]]
    assert rows[0] == {
        "address": "10.0.0.1:8000", "node": "n1", "capacity": 2, "dp_rank": 4,
        "state": "ready", "running": 3, "waiting": 1, "read_at": 100.0,
        "ranks": [["4", 2, 0], ["5", 1, 1]], "speed": 1.0, "slots": None}
    assert (rows[1]["address"], rows[1]["running"], rows[1]["read_at"]) == (
        B.address, None, None)


def test_rows_carry_each_replicas_speed_and_room_and_old_rows_read_as_typical() -> None:
    judged = {B.address: Explanation(0.5, 1.0, 25.0, 25.0, relative_speed=0.25, slots=6.0)}
    doc = admin.picker_state(_hub(), judged=lambda pool, address: judged.get(address))
    [pool] = doc["pools"]
    assert [row[-2:] for row in pool["replicas"]] == [[1.0, None], [0.25, 6.0]]
    assert doc["fields"][-2:] == ("speed", "slots")
    parsed = _parse(pool["replicas"], skew=0.0)
    assert [(c.speed, c.slots) for c, _ in parsed] == [(1.0, None), (0.25, 6.0)]
    # Ten columns, as a control plane from before rooms sends them; nine, from before speeds.
    assert [(c.speed, c.slots) for c, _ in _parse([row[:10] for row in pool["replicas"]],
                                                  0.0)] == [(1.0, None), (0.25, None)]
    assert [c.speed for c, _ in _parse([row[:9] for row in pool["replicas"]], 0.0)] == [1.0, 1.0]
    # A room that cannot be one is left to the picker's own reckoning.
    bad = [[*pool["replicas"][1][:10], room] for room in (0.5, float("nan"), float("inf"))]
    assert [c.slots for c, _ in _parse(bad, 0.0)] == [None, None, None]


async def test_unchanged_state_answers_304_without_rendering_again(
    served: tuple[State, admin.PickerFeed, TestClient]
) -> None:
    _, feed, client = served
    first = await client.get("/picker/state")
    etag = first.headers["ETag"]
    renders = feed.renders
    again = await client.get("/picker/state", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert again.headers["ETag"] == etag
    # A long poll that sees no change ends with the same 304.
    waited = await client.get("/picker/state", params={"wait_s": "0.05"},
                              headers={"If-None-Match": etag})
    assert waited.status == 304
    assert feed.renders == renders


async def test_a_state_change_gives_a_new_version(
    served: tuple[State, admin.PickerFeed, TestClient]
) -> None:
    state, _, client = served
    first = await client.get("/picker/state")
    etag = first.headers["ETag"]
    state.set_loads({B.address: Load(7, 0, read_at=200.0)})
    second = await client.get("/picker/state", headers={"If-None-Match": etag})
    assert second.status == 200
    assert second.headers["ETag"] != etag
    doc = await second.json()
    assert doc["version"] == state.version
    assert doc["pools"][0]["replicas"][1][doc["fields"].index("running")] == 7


async def test_a_long_poll_answers_when_the_state_changes(
    served: tuple[State, admin.PickerFeed, TestClient]
) -> None:
    state, feed, client = served
    etag = (await client.get("/picker/state")).headers["ETag"]
    poll = asyncio.create_task(client.get(
        "/picker/state", params={"wait_s": "30"}, headers={"If-None-Match": etag}))

    async def waiting() -> None:
        while feed.waiting != 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(waiting(), 10)
    assert not poll.done()
    state.set_pools("file", [Pool("m", (A,))])
    response = await poll
    assert response.status == 200
    assert [r[0] for r in (await response.json())["pools"][0]["replicas"]] == [A.address]


async def test_a_restarted_control_plane_is_not_mistaken_for_the_same_version() -> None:
    """Both count versions from the same start; the ETags still differ."""
    one, two = admin.PickerFeed(_hub()), admin.PickerFeed(_hub())
    assert one.current()[0] != two.current()[0]


async def test_remote_state_follows_the_feed(
    served: tuple[State, admin.PickerFeed, TestClient]
) -> None:
    state, _, client = served
    remote = RemoteState(str(client.make_url("/")), interval_s=0)
    follow = asyncio.create_task(remote.run())
    try:
        await asyncio.wait_for(remote.ready.wait(), 10)
        [a, b] = remote.candidates("m") or []
        assert (a.address, a.node, a.running, a.waiting) == (A.address, "n1", 3, 1)
        # Ranks by local index (global rank - dp_rank).
        assert [(k.index, k.running, k.waiting) for k in a.ranks] == [(0, 2, 0), (1, 1, 1)]
        assert b.running == 0
        # Corrected by what the picker saw since the readings: its picks, its requests' ends.
        remote.note_pick(B.address)
        remote.note_done(A.address, 1)
        [a, b] = remote.candidates("m") or []
        assert (a.pending, b.pending) == (-1, 1)
        assert [k.pending for k in a.ranks] == [0, -1]
        state.set_pools("file", [Pool("m", (A, Replica("10.0.0.2", 8000, "n2",
                                                      state=ReplicaState.DRAINING)))])

        async def drained() -> None:
            while len(remote.candidates("m") or []) != 1:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(drained(), 10)
    finally:
        follow.cancel()


KEEP = tuple[State, Publisher, admin.PickerFeed, TestClient]


@pytest.fixture
async def with_keep() -> AsyncIterator[KEEP]:
    """A feed of a hub whose publisher decides keep shares from each reading at once."""
    state = State()
    state.set_pools("file", [Pool("m", (Replica("10.0.0.1", 8000, "n1"),
                                        Replica("10.0.0.2", 8000, "n2")))])
    idle = Load(0, 0, read_at=time.time())
    state.set_loads({"10.0.0.1:8000": idle, "10.0.0.2:8000": idle})
    publisher = Publisher(state=state, cache=SnapshotCache(), metrics=Metrics(),
                          settings=EnvoySettings(), policy=PolicySettings(
                              model="queue", max_num_seqs=10, smoothing_s=0, max_step_per_s=0,
                              deadband=0))
    publisher.publish_now()
    feed = admin.PickerFeed(state, keep=publisher, min_interval_s=0, clock=frozen_clock)
    app = admin.build_app(metrics=Metrics(), ready=lambda: True, state=dict,
                          picker_feed=feed)
    async with TestClient(TestServer(app)) as client:
        yield state, publisher, feed, client


def keep_of(doc: dict[str, Any]) -> dict[str, int]:
    [pool] = doc["pools"]
    shares: dict[str, int] = pool["keep"]
    return shares


async def test_the_feed_carries_the_published_keep_shares_and_wakes_on_their_change(
    with_keep: KEEP
) -> None:
    state, publisher, feed, client = with_keep
    first = await client.get("/picker/state")
    assert keep_of(await first.json()) == {"n1": 1000, "n2": 1000}
    # n1 fills up: the hub changes at once, the keep shares when the publisher has decided.
    state.set_loads({"10.0.0.1:8000": Load(10, 5, read_at=time.time())})
    second = await client.get("/picker/state", headers={"If-None-Match": first.headers["ETag"]})
    assert second.status == 200 and keep_of(await second.json()) == {"n1": 1000, "n2": 1000}
    poll = asyncio.create_task(client.get("/picker/state", params={"wait_s": "30"}, headers={
        "If-None-Match": second.headers["ETag"]}))

    async def waiting() -> None:
        while feed.waiting != 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(waiting(), 10)
    publisher.publish_now()  # no change to the hub: the keep shares alone wake the reader
    third = await asyncio.wait_for(poll, 10)
    assert third.status == 200
    assert keep_of(await third.json()) == {"n1": 50, "n2": 1000}


async def test_a_node_that_keeps_nothing_is_left_out_of_the_feed() -> None:
    state = _hub()
    feed = admin.PickerFeed(state, min_interval_s=0)
    assert keep_of(json.loads(feed.current()[1])) == {}
    doc = admin.picker_state(state, {"m": {"n1": 0, "n2": 350}})
    assert keep_of(doc) == {"n2": 350}


async def test_remote_state_reads_keep_shares_and_none_from_an_older_control_plane(
    with_keep: KEEP
) -> None:
    _, _, _, client = with_keep
    remote = RemoteState(str(client.make_url("/")), interval_s=0)
    follow = asyncio.create_task(remote.run())
    try:
        await asyncio.wait_for(remote.ready.wait(), 10)
        assert (remote.keep("m", "n1"), remote.keep("m", "n2")) == (1000, 1000)
        assert (remote.keep("m", "n3"), remote.keep("other", "n1")) == (0, 0)
    finally:
        follow.cancel()
    old = {"version": 1, "fields": admin.PICKER_STATE_FIELDS, "pools": [
        {"name": "m", "replicas": [["10.0.0.1:8000", "n1", 1, 0, "ready", 0, 0, None, []]]}]}

    async def older_feed(request: web.Request) -> web.Response:
        return web.json_response(old, headers={"X-Hybridlb-Time": repr(time.time())})

    app = web.Application()
    app.router.add_get("/picker/state", older_feed)
    async with TestClient(TestServer(app)) as older:
        remote = RemoteState(str(older.make_url("/")), interval_s=0)
        follow = asyncio.create_task(remote.run())
        try:
            await asyncio.wait_for(remote.ready.wait(), 10)
            assert [c.address for c in remote.candidates("m") or []] == ["10.0.0.1:8000"]
            assert remote.keep("m", "n1") == 0
        finally:
            follow.cancel()


def test_serves_picker_gets_serves_certificate_and_pick_settings() -> None:
    from xds_server.extproc.child import picker_args

    tls = TlsSettings(cert=Path("c.pem"), key=Path("k.pem"), client_ca=Path("ca.pem"))
    settings = Settings(xds=XdsSettings(tls=tls), extproc=ExtprocSettings(
        host="10.1.2.3", port=9002,
        pick=PickSettings(max_num_seqs=64, fallbacks=1, pin_rank=False)))
    args = picker_args(settings, "http://127.0.0.1:4242")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--control-plane"] == "http://127.0.0.1:4242"
    assert (flags["--host"], flags["--port"]) == ("10.1.2.3", "9002")
    assert (flags["--tls-cert"], flags["--tls-key"], flags["--tls-client-ca"]) == (
        "c.pem", "k.pem", "ca.pem")
    assert (flags["--max-num-seqs"], flags["--fallbacks"]) == ("64", "1")
    # `hybridlb extproc` reads them back as the same pick settings.
    from xds_server import options
    from xds_server.commands import extproc
    from xds_server.settings import PickerSettings

    parser = argparse.ArgumentParser()
    extproc.add_arguments(parser)
    parsed = options.build(PickerSettings, options.from_args(parser.parse_args(args),
                                                             extproc.OPTIONS), extproc.OPTIONS)
    assert parsed.pick == settings.extproc.pick
