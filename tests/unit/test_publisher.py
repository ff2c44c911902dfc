"""The publisher: what it builds, when, where, and what it refuses; loads that stop arriving
go stale on time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from xds_server.metrics import Metrics
from xds_server.model import IngressReport, Load, Pool, Replica, View
from xds_server.policy.views import HybridSettings
from xds_server.policy.weights import PolicySettings
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import resources
from xds_server.xds.cache import SnapshotCache

A = Replica("10.0.0.1", 8000, "node-a")
B = Replica("10.0.0.2", 8000, "node-b")


def test_a_reading_inside_the_deadband_builds_nothing_but_is_explained() -> None:
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings(),
                          policy=PolicySettings(max_num_seqs=100, smoothing_s=0,
                                                max_step_per_s=0, deadband=0.2,
                                                model="queue"))
    state.set_pools("test", [Pool("p", (A,))])
    state.set_loads({A.address: Load(running=10, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    version = cache.version
    state.set_loads({A.address: Load(running=12, waiting=0, read_at=time.time())})
    assert not publisher.publish_now()
    assert cache.version == version
    assert publisher.published.explain["p"][A.address].utilization == 0.12
    state.set_loads({A.address: Load(running=50, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    assert cache.version == version + 1


async def test_weights_go_to_capacity_and_the_age_grows_when_loads_stop_arriving() -> None:
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(
        state=state, cache=cache, metrics=metrics, settings=EnvoySettings(),
        # The queue model: its weight follows a reading at once, and stale ones at once too.
        policy=PolicySettings(model="queue", max_num_seqs=10, stale_after_s=0.3, smoothing_s=0,
                              max_step_per_s=0, deadband=0, decide_interval_s=0.05),
        debounce_s=0)
    busy = Replica("10.0.0.2", 8000, "node-b")
    state.set_pools("test", [Pool("p", (A, busy))])
    state.set_loads({A.address: Load(running=0, waiting=0, read_at=time.time()),
                     busy.address: Load(running=10, waiting=5, read_at=time.time())})
    task = asyncio.create_task(publisher.run())

    def weights() -> Mapping[str, int]:
        published = publisher.published.weights.get("p")
        return published.endpoints if published else {}

    def age() -> float:
        return metrics.registry.get_sample_value(
            "hybridlb_load_age_seconds", {"pool": "p", "replica": busy.address}) or 0.0

    try:
        await until(lambda: weights().get(busy.address) == 2, "the saturated replica's weight")
        # No reading arrives any more: past twice stale_after_s, no load is known and every
        # replica weighs its capacity; the exported age is the age now, not at the read.
        await until(lambda: weights() == {A.address: 100, busy.address: 100}, "equal weights")
        await until(lambda: age() > 0.6, "the load's age past twice stale_after_s")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait (without blocking the loop) until `predicate` holds; a bound, not an assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_snapshot_whose_route_names_a_missing_cluster_is_refused_and_the_last_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(state=state, cache=cache, metrics=metrics, settings=EnvoySettings())
    state.set_pools("test", [Pool("p", (A,))])
    assert publisher.publish_now()
    good = cache.snapshot_for(View())
    # A builder bug: the new pool's clusters are left out, its routes are not.
    real = resources.build_clusters
    monkeypatch.setattr(resources, "build_clusters", lambda inputs, node, settings: [
        c for c in real(inputs, node, settings) if not c.name.startswith("q")])
    state.set_pools("test", [Pool("p", (A,)), Pool("q", (B,))])
    assert not publisher.publish_now()
    assert metrics.registry.get_sample_value("hybridlb_snapshots_refused_total") == 1
    assert cache.version == 1 and cache.snapshot_for(View()) is good


async def test_a_build_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a (large) snapshot builds, the loop keeps serving: here, a task that the build
    waits for must be able to run."""
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings(),
                          debounce_s=0)
    state.set_pools("test", [Pool("p", (A,))])
    publisher.publish_now()
    building, loop_ran = threading.Event(), threading.Event()
    real = resources.build_endpoints
    saw_the_loop_run: list[bool] = []

    def slow(inputs: Sequence[resources.PoolInput]) -> Any:
        building.set()
        # On the loop, this would wait out the 10 s: the loop could not run `tick`.
        saw_the_loop_run.append(loop_ran.wait(10))
        return real(inputs)

    async def tick() -> None:
        while not building.is_set():
            await asyncio.sleep(0.01)
        loop_ran.set()

    monkeypatch.setattr(resources, "build_endpoints", slow)
    ticker = asyncio.create_task(tick())
    runner = asyncio.create_task(publisher.run())
    state.set_pools("test", [Pool("p", (A, B))])
    async with asyncio.timeout(30):
        while cache.version < 2:
            await asyncio.sleep(0.01)
    runner.cancel()
    await ticker
    assert saw_the_loop_run == [True]


def test_the_feed_version_moves_with_the_keep_shares_not_with_every_snapshot() -> None:
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings(),
                          policy=PolicySettings(max_num_seqs=10, smoothing_s=0,
                                                max_step_per_s=0, deadband=0, model="queue"))
    state.set_pools("test", [Pool("p", (A, B))])
    state.set_loads({A.address: Load(running=0, waiting=0, read_at=time.time()),
                     B.address: Load(running=0, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    assert (publisher.feed_version, publisher.published.keep) == (
        1, {"p": {"node-a": 1000, "node-b": 1000}})
    # Other weights, the same keep shares (node-a still has room).
    state.set_loads({A.address: Load(running=5, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    assert publisher.feed_version == 1
    state.set_loads({A.address: Load(running=10, waiting=5, read_at=time.time())})
    assert publisher.publish_now()
    assert publisher.feed_version == 2 and publisher.published.keep["p"]["node-a"] < 1000


def test_the_feed_version_moves_with_a_judgement_the_picker_reads() -> None:
    """A replica's room or speed can change while the keep shares do not; the picker feed
    must still render it (its ETag follows this version and the hub's)."""
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings())
    state.set_pools("test", [Pool("p", (A, B))])
    state.set_loads({A.address: Load(running=1, waiting=0, read_at=time.time()),
                     B.address: Load(running=1, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    seen, keep = publisher.feed_version, publisher.published.keep
    # A full reading teaches the room; node-a still keeps everything.
    state.set_loads({A.address: Load(running=4, waiting=1, read_at=time.time())})
    publisher.publish_now()  # the weights are damped: Envoy may get no new snapshot
    judged = publisher.published.judged("p", A.address)
    assert judged is not None and judged.slots == 4
    assert publisher.published.keep == keep
    assert publisher.feed_version == seen + 1


@pytest.mark.parametrize("local_first", [True, False])
def test_the_ingress_plans_the_localities_only_where_envoys_keep_requests_local(
    local_first: bool,
) -> None:
    """node-a's Envoy brings the whole of its node's part: with local-first on, the whole-pool
    cluster sends node-a (almost) nothing; with it off, node-a's Envoy sends all through that
    cluster too, so it weighs by capacity like node-b."""
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings(),
                          policy=PolicySettings(), hybrid=HybridSettings(local_first=local_first))
    state.set_pools("test", [Pool("p", (A, B))])
    now = time.time()
    state.set_loads({r.address: Load(running=0, waiting=0, read_at=now) for r in (A, B)})
    state.set_ingress("s", IngressReport(node="node-a", rates={"p": 5.0}, at=now,
                                         interval_s=1.0))
    state.set_ingress("g", IngressReport(node="", rates={"p": 5.0}, at=now, interval_s=1.0))
    assert publisher.publish_now()
    localities = publisher.published.weights["p"].localities
    if local_first:
        assert localities["node-a"] < 0.05 * localities["node-b"]
    else:
        assert localities["node-a"] == localities["node-b"]
