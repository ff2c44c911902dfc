"""The ADS protocol against an in-process server, driven by the light client over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.bench.adsclient import AdsClient
from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import types
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.server import SERVICE, AdsServer

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
async def test_push_order_is_clusters_endpoints_listeners_routes(
    plane: Plane, delta: bool
) -> None:
    client = AdsClient(target=plane.target, node_id="e1", node="node-a", delta=delta)
    task = await connect(client)
    firsts: list[str] = []
    for r in client.received:
        if r.type_url not in firsts:
            firsts.append(r.type_url)
    # The client asks for CDS and LDS at once; endpoints follow clusters, routes listeners.
    assert firsts.index(types.ENDPOINT) > firsts.index(types.CLUSTER)
    assert firsts.index(types.ROUTE) > firsts.index(types.LISTENER)
    # Its own node's assignment and the pool's; not another node's (it has no cluster for it).
    assert set(client.held[types.ENDPOINT]) == {"qwen3", "qwen3/node/node-a"}
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
