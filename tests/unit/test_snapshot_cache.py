"""The snapshot cache: views as plain data, content versions, one encoding shared by views."""

from __future__ import annotations

from xds_server.model import Pool, Replica, View
from xds_server.policy.weights import capacity_weights
from xds_server.publisher import Plan, build_view
from xds_server.settings import EnvoySettings
from xds_server.xds import resources, types
from xds_server.xds.cache import Snapshot, SnapshotCache
from xds_server.xds.snapshot import encode_all

SETTINGS = EnvoySettings()
POOL = Pool("qwen3", (Replica("10.0.0.1", 8000, "a"), Replica("10.0.0.2", 8000, "b")))


def plan_for(pool: Pool, keep_a: int = 1000) -> Plan:
    inputs = (resources.PoolInput(pool=pool, weights=capacity_weights(pool)),)
    return Plan(inputs=inputs, keep={pool.name: {"a": keep_a, "b": 1000}},
                nodes=frozenset(pool.nodes),
                endpoints=encode_all(resources.build_endpoints(inputs)))


def views_of(plan: Plan, *views: View) -> dict[View, Snapshot]:
    return {v: build_view(plan, v, SETTINGS) for v in (View(), *views)}


def test_publishing_snapshots_equal_in_content_wakes_no_stream() -> None:
    cache, woken = SnapshotCache(), []
    cache.subscribe(lambda: woken.append(1))
    cache.attach(View("a", 10001))
    assert cache.set_snapshots(frozenset("ab"), views_of(plan_for(POOL), View("a", 10001)))
    # A new plan object, built anew: same content, so no version and no wake-up.
    assert not cache.set_snapshots(frozenset("ab"), views_of(plan_for(POOL), View("a", 10001)))
    assert cache.version == 1 and woken == [1]
    # A changed keep share in an attached view is a change.
    assert cache.set_snapshots(frozenset("ab"),
                               views_of(plan_for(POOL, keep_a=500), View("a", 10001)))
    assert cache.version == 2 and woken == [1, 1]


def test_a_claimed_node_without_replicas_shares_the_no_node_view_of_its_port() -> None:
    cache = SnapshotCache()
    cache.set_snapshots(frozenset("ab"), views_of(plan_for(POOL), View("", 10001)))
    made_up = cache.snapshot_for(View("no-such-node", 10001))
    assert made_up is cache.snapshot_for(View("", 10001)) is not None
    # 20,000 made-up nodes on one port are one view to keep and rebuild.
    for i in range(20_000):
        cache.attach(View(f"made-up-{i}", 10001))
    assert cache.views_in_use(frozenset("ab")) == {View(), View("", 10001)}


def test_changed_endpoint_gets_a_new_version_others_keep_theirs() -> None:
    before = plan_for(POOL).endpoints
    grown = Pool("qwen3", (*POOL.replicas, Replica("10.0.0.3", 8000, "b")))
    inputs = (resources.PoolInput(pool=grown, weights=capacity_weights(grown)),)
    after = encode_all(resources.build_endpoints(inputs), before)
    assert after["qwen3/node/a"] is before["qwen3/node/a"]  # same encoded object, reused
    assert after["qwen3"].version != before["qwen3"].version
    assert after["qwen3/node/b"].version != before["qwen3/node/b"].version


def test_views_share_encoded_endpoints_and_differ_in_their_listener() -> None:
    plan = plan_for(POOL)
    one = build_view(plan, View("a", 10001), SETTINGS).resources
    two = build_view(plan, View("b", 10002), SETTINGS).resources
    assert one[types.ENDPOINT]["qwen3"] is two[types.ENDPOINT]["qwen3"]
    assert one[types.LISTENER]["hybridlb_http"].version != \
        two[types.LISTENER]["hybridlb_http"].version


def test_a_message_object_met_again_is_not_encoded_again() -> None:
    listener = resources.build_listener(View("a", 10001), SETTINGS)
    once = encode_all([listener], by_identity=True)["hybridlb_http"]
    assert encode_all([listener], by_identity=True)["hybridlb_http"] is once
    # An equal message that is another object is encoded anew, to the same version; and
    # without by_identity every call encodes.
    twin = resources.build_listener.__wrapped__(View("a", 10001), SETTINGS)
    fresh = encode_all([twin], by_identity=True)["hybridlb_http"]
    assert fresh is not once and fresh.version == once.version
    assert encode_all([listener])["hybridlb_http"] is not once


def test_a_view_no_stream_uses_any_more_is_not_kept() -> None:
    cache = SnapshotCache()
    plan = plan_for(POOL)

    class Source:
        def build_view(self, view: View) -> Snapshot:
            return build_view(plan, view, SETTINGS)

    cache.set_source(Source())
    cache.set_snapshots(frozenset("ab"), views_of(plan))
    for port in range(20000, 20100):  # streams that come and go, each claiming a new port
        cache.attach(View("made-up", port))
        assert cache.snapshot_for(View("made-up", port)) is not None
        cache.detach(View("made-up", port))
    assert set(cache.views) == {View()}
