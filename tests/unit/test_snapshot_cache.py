"""The snapshot cache: content versions, one encoding shared by all views, no-op publishes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from xds_server.model import Pool, Replica, View
from xds_server.policy.weights import capacity_weights
from xds_server.settings import EnvoySettings
from xds_server.xds import resources, types
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.snapshot import encode_all

SETTINGS = EnvoySettings()


def shared_for(*pools: Pool) -> dict[str, Sequence[Message]]:
    inputs = [resources.PoolInput(pool=p, weights=capacity_weights(p)) for p in pools]
    return {types.ENDPOINT: resources.build_endpoints(inputs)}


def per_view(view: View) -> Mapping[str, Sequence[Message]]:
    routes = (resources.PoolRoute(pool="qwen3", node=view.node, keep_per_mille=1000),)
    return {types.LISTENER: [resources.build_listener(view, SETTINGS)],
            types.ROUTE: [resources.build_route_config(routes, SETTINGS)]}


POOL = Pool("qwen3", (Replica("10.0.0.1", 8000, "a"), Replica("10.0.0.2", 8000, "b")))


def test_republishing_the_same_state_changes_nothing() -> None:
    cache = SnapshotCache()
    assert cache.publish(shared_for(POOL), per_view)
    cache.resources_for(View("a", 10001))
    assert not cache.publish(shared_for(POOL), per_view)
    assert cache.version == 1


def test_changed_endpoint_gets_a_new_version_others_keep_theirs() -> None:
    cache = SnapshotCache()
    cache.publish(shared_for(POOL), per_view)
    before = dict(cache.shared[types.ENDPOINT])
    grown = Pool("qwen3", (*POOL.replicas, Replica("10.0.0.3", 8000, "b")))
    assert cache.publish(shared_for(grown), per_view)
    after = cache.shared[types.ENDPOINT]
    assert after["qwen3/node/a"] is before["qwen3/node/a"]  # same encoded object, reused
    assert after["qwen3"].version != before["qwen3"].version
    assert after["qwen3/node/b"].version != before["qwen3/node/b"].version


def test_views_share_encoded_resources_and_differ_in_their_listener() -> None:
    cache = SnapshotCache()
    cache.publish(shared_for(POOL), per_view)
    one = cache.resources_for(View("a", 10001))
    two = cache.resources_for(View("b", 10002))
    assert one[types.ENDPOINT]["qwen3"] is two[types.ENDPOINT]["qwen3"]
    assert one[types.LISTENER]["hybridlb_http"].version != \
        two[types.LISTENER]["hybridlb_http"].version
    assert cache.resources_for(View("a", 10001)) is one


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
