"""The ADS protocol against an in-process server, driven by the light client over real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.bench.adsclient import AdsClient
from xds_server.metrics import Metrics
from xds_server.model import Load, Pool, Replica
from xds_server.policy.weights import PolicySettings
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import resources, types
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.server import REQUEST_BACKLOG, SERVICE, AdsServer
from xds_server.xds.snapshot import encode

A = Replica("10.0.0.1", 8000, "node-a")
B = Replica("10.0.0.2", 8000, "node-b")
C = Replica("10.0.0.3", 8000, "node-c")


@dataclass
class Plane:
    state: State
    publisher: Publisher
    metrics: Metrics
    target: str

    def set(self, *replicas: Replica) -> None:
        self.state.set_pools("test", [Pool("qwen3", replicas)])
        self.publisher.publish_now()


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(state=state, cache=cache, metrics=metrics, settings=EnvoySettings())
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdsServer(cache=cache, metrics=metrics).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    p = Plane(state, publisher, metrics, f"127.0.0.1:{port}")
    p.set(A, B)
    yield p
    await server.stop(0)


async def connect(client: AdsClient) -> asyncio.Task[None]:
    task = asyncio.create_task(client.run())
    await client.wait_until(lambda: types.ROUTE in client.held and types.ENDPOINT in client.held)
    return task


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_routes_name_new_clusters_after_their_endpoints_and_leave_old_ones_before_removal(
    plane: Plane, delta: bool
) -> None:
    client = AdsClient(target=plane.target, node_id="e1", node="node-a", delta=delta)
    task = await connect(client)  # CDS, EDS, LDS and RDS all subscribed from here on
    assert set(client.held[types.ENDPOINT]) == {"qwen3", "qwen3/node/node-a"}
    seen = len(client.received)
    plane.state.set_pools("test", [Pool("qwen3", (A, B)), Pool("other", (A,))])
    plane.publisher.publish_now()
    await client.wait_until(lambda: "other" in client.held[types.ENDPOINT]
                            and any(r.type_url == types.ROUTE for r in client.received[seen:]))
    added = [r.type_url for r in client.received[seen:]]
    # The new clusters, then their endpoints, then the routes that name them.
    assert added.index(types.CLUSTER) < added.index(types.ENDPOINT) < added.index(types.ROUTE)
    seen = len(client.received)
    plane.set(A, B)  # "other" goes
    await client.wait_until(lambda: "other" not in client.held[types.CLUSTER])
    after = client.received[seen:]
    route = next(i for i, r in enumerate(after) if r.type_url == types.ROUTE)
    removal = next(i for i, r in enumerate(after)
                   if r.type_url == types.CLUSTER and ("other" in r.removed or
                                                       (not delta and "other" not in r.names)))
    # The routes stop naming the pool before its clusters go (no 503 in between).
    assert route < removal
    task.cancel()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_only_changed_endpoints_are_sent(plane: Plane, delta: bool) -> None:
    client = AdsClient(target=plane.target, node_id="e1", node="node-b", delta=delta)
    task = await connect(client)
    seen = len(client.received)
    plane.set(A, B, Replica("10.0.0.4", 8000, "node-b"))
    await client.wait_until(lambda: any(r.type_url == types.ENDPOINT
                                        for r in client.received[seen:]))
    await asyncio.sleep(0.2)
    sent = [name for r in client.received[seen:] if r.type_url == types.ENDPOINT
            for name in r.names]
    assert sorted(sent) == ["qwen3", "qwen3/node/node-b"]  # node-a's did not change
    assert not any(r.type_url == types.CLUSTER for r in client.received[seen:])
    task.cancel()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nack_is_counted_recorded_and_not_resent(plane: Plane, delta: bool) -> None:
    client = AdsClient(
        target=plane.target, node_id="e1", node="node-c", delta=delta,
        reject=lambda t, names: "bad endpoint" if t == types.ENDPOINT and
        "qwen3/node/node-c" in names else None,
    )
    task = await connect(client)
    plane.set(A, B, C)
    await client.wait_until(lambda: "qwen3/node/node-c" in client.held.get(types.ENDPOINT, {}))
    # The server counts the NACK when it reads it: wait for that, then a while longer for
    # any (wrong) resend of the rejected config.
    async with asyncio.timeout(10):
        while plane.metrics.nacks.labels("EDS")._value.get() < 1:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    assert plane.metrics.nacks.labels("EDS")._value.get() == 1
    sends_of_c = sum("qwen3/node/node-c" in r.names for r in client.received
                     if r.type_url == types.ENDPOINT)
    assert sends_of_c == 1  # not answered with the same config again
    task.cancel()


async def test_delta_removal_and_reconnect_with_known_versions(plane: Plane) -> None:
    client = AdsClient(target=plane.target, node_id="e1", node="node-b", delta=True)
    task = await connect(client)
    seen = len(client.received)
    plane.set(A)
    await client.wait_until(lambda: "qwen3/node/node-b" not in client.held[types.CLUSTER])
    removed = {n for r in client.received[seen:] for n in r.removed}
    assert "qwen3/node/node-b" in removed
    task.cancel()

    # A reconnecting Envoy says what it has; nothing it already holds is sent again.
    channel = grpc.aio.insecure_channel(plane.target)
    call = channel.stream_stream(
        f"/{SERVICE}/DeltaAggregatedResources",
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )
    held = client.held[types.CLUSTER]

    async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        yield discovery_pb2.DeltaDiscoveryRequest(
            node={"id": "e1"}, type_url=types.CLUSTER, initial_resource_versions=held
        )
        await asyncio.sleep(5)

    stream = call(requests())
    response = await asyncio.wait_for(stream.read(), 5)
    assert list(response.resources) == []
    assert response.type_url == types.CLUSTER
    stream.cancel()
    await channel.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_new_cluster_gets_its_endpoints_and_old_ones_are_not_resent(
    plane: Plane, delta: bool
) -> None:
    client = AdsClient(target=plane.target, node_id="e1", node="node-c", delta=delta)
    task = await connect(client)
    seen = len(client.received)
    plane.set(A, B, C)
    await client.wait_until(lambda: "qwen3/node/node-c" in client.held.get(types.ENDPOINT, {}))
    await asyncio.sleep(0.2)
    sent = sorted(name for r in client.received[seen:] if r.type_url == types.ENDPOINT
                  for name in r.names)
    assert sent == ["qwen3", "qwen3/node/node-c"]
    task.cancel()


async def test_a_change_arriving_with_a_request_for_an_unserved_type_is_still_pushed(
    plane: Plane,
) -> None:
    """The change and the request are read together; the change must not wait for (or be
    lost behind) a request the server ignores."""
    server = AdsServer(cache=plane.publisher._cache, metrics=Metrics())
    outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            request = await outbox.get()
            if request.type_url.endswith("Secret"):
                # Once the ACK is handled, a change and this request arrive together.
                while not any(i.types[types.CLUSTER].acked_version
                              for i in server.streams.values()):
                    await asyncio.sleep(0.01)
                plane.state.set_pools("test", [Pool("qwen3", (A, B)), Pool("other", (A,))])
                plane.publisher.publish_now()  # wakes the stream before it reads the request
            yield request

    responses = server.stream_sotw(requests(), context=None)
    outbox.put_nowait(discovery_pb2.DiscoveryRequest(
        node={"id": "e1"}, type_url=types.CLUSTER))
    first = discovery_pb2.DiscoveryResponse.FromString(await anext(responses))
    outbox.put_nowait(discovery_pb2.DiscoveryRequest(
        type_url=types.CLUSTER, response_nonce=first.nonce, version_info=first.version_info))
    outbox.put_nowait(discovery_pb2.DiscoveryRequest(
        type_url="type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"))
    pushed = discovery_pb2.DiscoveryResponse.FromString(
        await asyncio.wait_for(anext(responses), 10))
    assert pushed.type_url == types.CLUSTER and len(pushed.resources) > len(first.resources)
    await responses.aclose()


async def test_an_envoy_that_connects_later_gets_the_current_keep_share() -> None:
    """node-c's keep share moves while no Envoy on node-c is connected, and no weight moves
    (inside the deadband): an Envoy on node-c that connects then must get the new share."""
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(state=state, cache=cache, metrics=metrics, settings=EnvoySettings(),
                          # The queue model: its keep share follows one reading at once.
                          policy=PolicySettings(model="queue", max_num_seqs=100, smoothing_s=0,
                                                max_step_per_s=0, deadband=0.9))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdsServer(cache=cache, metrics=metrics).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"

    def load(running_on_c: int) -> None:
        state.set_loads({A.address: Load(running=50, waiting=0, read_at=time.time()),
                         C.address: Load(running=running_on_c, waiting=0, read_at=time.time())})
        publisher.publish_now()

    state.set_pools("test", [Pool("qwen3", (A, C))])
    load(75)
    early = AdsClient(target=target, node_id="e-a", node="node-a")
    early_task = await connect(early)
    load(95)
    assert publisher.published.keep["qwen3"]["node-c"] == 150
    late = AdsClient(target=target, node_id="e-c", node="node-c", delta=True)  # held: versions
    late_task = await connect(late)
    route = resources.build_route_config(
        (resources.PoolRoute("qwen3", "node-c", 150),), EnvoySettings())
    assert late.held[types.ROUTE] == {resources.ROUTE_CONFIG_NAME: encode(route).version}
    early_task.cancel()
    late_task.cancel()
    await server.stop(0)


async def test_a_client_that_sends_without_reading_is_held_back_not_buffered(
    plane: Plane,
) -> None:
    """Requests are read into a bounded queue: while the stream does not get to serve them,
    the server stops reading (gRPC flow control then holds the client) instead of buffering
    whatever the client sends."""
    server = AdsServer(cache=plane.publisher._cache, metrics=Metrics())
    pulled = 0

    async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield discovery_pb2.DeltaDiscoveryRequest(
                node={"id": "e1"}, type_url=types.ENDPOINT, resource_names_subscribe=[f"n{i}"])

    responses = server.stream_delta(requests(), context=None)
    await anext(responses)  # the stream is now suspended on its first response
    for _ in range(100):  # the reader's turns on the loop (no time involved)
        await asyncio.sleep(0)
    # The batch the first response answered, plus one full queue (and the one in hand).
    assert pulled <= 2 * REQUEST_BACKLOG + 2
    await responses.aclose()
