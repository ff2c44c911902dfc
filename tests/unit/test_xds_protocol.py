"""The xDS protocol as a table: one row per rule of the spec, for SotW and delta.

The client here is written from the spec (envoyproxy.io, "xDS REST and gRPC protocol"), not
the benchmark's `bench/adsclient.py`, so the server is not checked against its own reading.
It speaks real gRPC to the real `AdsServer` fed by the real publisher.

Proving that a response did *not* come uses a barrier instead of a sleep: the server handles
a stream's requests in order and pushes in CDS, EDS, LDS, RDS order, so after a request that
must be answered with RDS, any response the earlier requests caused arrives first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica, View
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import resources, types
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.server import SERVICE, AdsServer

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE
A = Replica("10.0.0.1", 8000, "node-a")
B = Replica("10.0.0.2", 8000, "node-b")
ROUTE_NAME = resources.ROUTE_CONFIG_NAME


@dataclass
class Reply:
    type_url: str
    nonce: str
    version: str
    names: list[str]
    removed: list[str] = field(default_factory=list)


class SpecClient:
    """One ADS stream; requests are built by hand, responses read one at a time."""

    def __init__(self, channel: grpc.aio.Channel, delta: bool) -> None:
        self.delta = delta
        request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        response = (discovery_pb2.DeltaDiscoveryResponse if delta
                    else discovery_pb2.DiscoveryResponse)
        method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._call = channel.stream_stream(
            f"/{SERVICE}/{method}", request_serializer=request.SerializeToString,
            response_deserializer=response.FromString)(self._requests())
        self._request = request
        self._node_sent = False
        #: type -> the last nonce received (what an ACK names).
        self.nonce: dict[str, str] = {}

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            yield await self._outbox.get()

    def send(self, type_url: str, *, nonce: str = "", error: str = "", **fields: Any) -> None:
        """A request; the node goes on the first one only, as Envoy does."""
        message = self._request(type_url=type_url, response_nonce=nonce, **fields)
        if not self._node_sent:
            message.node.id = "spec-client"
            message.node.metadata.update({"hybridlb": {"node": "node-a"}})
            self._node_sent = True
        if error:
            message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(message)

    def subscribe(self, type_url: str, names: list[str], *, nonce: str = "",
                  unsubscribe: list[str] | None = None, **fields: Any) -> None:
        if self.delta:
            self.send(type_url, nonce=nonce, resource_names_subscribe=names,
                      resource_names_unsubscribe=unsubscribe or [], **fields)
        else:
            self.send(type_url, nonce=nonce, resource_names=names, **fields)

    def ack(self, reply: Reply, names: list[str] | None = None, error: str = "") -> None:
        """ACK (or NACK, with `error`) a response; SotW repeats the subscription."""
        if self.delta:
            self.send(reply.type_url, nonce=reply.nonce, error=error)
        else:
            self.send(reply.type_url, nonce=reply.nonce, error=error,
                      version_info="" if error else reply.version, resource_names=names or [])

    async def recv(self) -> Reply:
        response = await asyncio.wait_for(self._call.read(), 10)
        assert response is not grpc.aio.EOF
        if self.delta:
            reply = Reply(response.type_url, response.nonce, response.system_version_info,
                          [r.name for r in response.resources], list(response.removed_resources))
        else:
            reply = Reply(response.type_url, response.nonce, response.version_info,
                          [_name(r) for r in response.resources])
        self.nonce[reply.type_url] = reply.nonce
        return reply

    async def barrier(self) -> Reply:
        """Subscribe to the route configuration; return the first response (see module doc).
        Where RDS is subscribed already, a first EDS subscription serves for types before it."""
        self.subscribe(RDS, [ROUTE_NAME])
        return await self.recv()

    async def until(self, type_url: str) -> list[Reply]:
        """Every response up to the first of `type_url`, ACKing the others."""
        replies = [await self.recv()]
        while replies[-1].type_url != type_url:
            self.ack(replies[-1], names=[ROUTE_NAME] if replies[-1].type_url == RDS else None)
            replies.append(await self.recv())
        return replies

    def close(self) -> None:
        self._call.cancel()


def _name(packed: Any) -> str:
    messages: tuple[Any, ...] = (cluster_pb2.Cluster(), endpoint_pb2.ClusterLoadAssignment(),
                                 listener_pb2.Listener(), route_pb2.RouteConfiguration())
    for message in messages:
        if packed.Is(message.DESCRIPTOR):
            packed.Unpack(message)
            return str(getattr(message, "cluster_name", "") or message.name)
    raise AssertionError(packed.type_url)


@dataclass
class Plane:
    state: State
    publisher: Publisher
    metrics: Metrics
    cache: SnapshotCache
    server: AdsServer
    channel: grpc.aio.Channel

    def set(self, *replicas: Replica) -> None:
        self.state.set_pools("test", [Pool("qwen3", replicas)])
        self.publisher.publish_now()

    def pools(self, *names: str) -> None:
        """Pools of A and B by these names: the clusters every view holds change."""
        self.state.set_pools("test", [Pool(name, (A, B)) for name in names])
        self.publisher.publish_now()

    def nacks(self, short: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "hybridlb_xds_nacks_total", {"type": short})
        return value or 0.0


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(state=state, cache=cache, metrics=metrics, settings=EnvoySettings())
    ads = AdsServer(cache=cache, metrics=metrics)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ads.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    p = Plane(state, publisher, metrics, cache, ads, channel)
    p.set(A, B)
    yield p
    await channel.close()
    await server.stop(0)


POOL_CLUSTERS = {"qwen3", "qwen3/pinned", "qwen3/affinity"}
NODE_A_CLUSTERS = {"qwen3/node/node-a", "qwen3/prefer/node-a"}


async def initial_request(plane: Plane, c: SpecClient) -> None:
    """The first request for a type is answered with what exists."""
    c.subscribe(CDS, [])
    reply = await c.recv()
    assert reply.type_url == CDS and set(reply.names) == POOL_CLUSTERS | NODE_A_CLUSTERS


async def ack_sends_nothing_again(plane: Plane, c: SpecClient) -> None:
    c.subscribe(CDS, [])
    c.ack(await c.recv())
    assert (await c.barrier()).type_url == RDS


async def nack_then_ack(plane: Plane, c: SpecClient) -> None:
    """A NACK is recorded and not answered with the same config; a later ACK clears it."""
    c.subscribe(CDS, [])
    c.ack(await c.recv(), error="bad cluster")
    assert (await c.barrier()).type_url == RDS
    (info,) = plane.server.streams.values()
    assert info.as_dict()["nacked"]["CDS"]["error"] == "bad cluster"
    assert plane.nacks("CDS") == 1
    plane.pools("qwen3", "extra")  # the clusters change: a new version comes
    reply = await c.recv()
    assert reply.type_url == CDS
    c.ack(reply)
    c.subscribe(EDS, ["qwen3"])  # answered after the ACK: the ACK has been read
    assert (await c.recv()).type_url == EDS
    assert info.as_dict()["nacked"] == {}


async def stale_nonce_is_ignored(plane: Plane, c: SpecClient) -> None:
    """A request naming a response older than the latest sent of its type is not an
    ACK/NACK of the latest, and in SotW is ignored altogether (the spec's DiscoveryResponse
    `nonce`: the server may ignore requests until one bears the latest nonce)."""
    c.subscribe(EDS, ["qwen3"])
    first = await c.recv()
    c.ack(first, names=["qwen3"])
    plane.set(A, B, Replica("10.0.0.3", 8000, "node-b"))  # qwen3's assignment changes
    latest = await c.recv()
    assert latest.type_url == EDS
    c.ack(first, names=["qwen3", "qwen3/node/node-a"], error="late NACK of an old response")
    if c.delta:
        c.ack(latest)
    else:
        c.ack(latest, names=["qwen3"])
    c.subscribe(RDS, [ROUTE_NAME])  # the barrier
    replies = await c.until(RDS)
    assert plane.nacks("EDS") == 0
    if not c.delta:  # the stale request's subscription was not taken either
        assert all("qwen3/node/node-a" not in r.names for r in replies)


async def unsubscribe(plane: Plane, c: SpecClient) -> None:
    """After unsubscribing, changes to a resource are not sent."""
    c.subscribe(EDS, ["qwen3", "qwen3/node/node-a"])
    reply = await c.recv()
    assert set(reply.names) == {"qwen3", "qwen3/node/node-a"}
    if c.delta:
        c.ack(reply)
        c.subscribe(EDS, [], unsubscribe=["qwen3/node/node-a"])
    else:
        c.ack(reply, names=["qwen3"])
    plane.set(A, B, Replica("10.0.0.3", 8000, "node-b"))  # qwen3 changes, node-a's not
    reply = await c.recv()
    assert reply.type_url == EDS and reply.names == ["qwen3"]
    c.ack(reply, names=["qwen3"])
    plane.set(B)  # node-a's assignment empties: unsubscribed, not sent
    reply = await c.recv()
    assert reply.names == ["qwen3"]


async def wildcard_and_its_exit(plane: Plane, c: SpecClient) -> None:
    """No name on the first request is the (legacy) wildcard; naming resources leaves it."""
    c.subscribe(CDS, [])
    reply = await c.recv()
    assert len(reply.names) == 5
    if c.delta:
        c.ack(reply)
        c.subscribe(CDS, ["qwen3"])  # names a resource: the legacy wildcard ends
        c.ack(await c.barrier())  # the server has read the subscription
    else:
        c.ack(reply, names=["qwen3"])
        reply = await c.recv()
        assert reply.names == ["qwen3"]  # SotW CDS: all that is subscribed, nothing more
        c.ack(reply, names=["qwen3"])
    plane.pools("qwen3", "extra")  # not subscribed: not sent
    if not c.delta:
        # Empty again after naming resources is no subscription at all, not the wildcard.
        c.ack(reply, names=[])
        reply = await c.recv()
        assert reply.type_url == CDS and reply.names == []
    c.subscribe(EDS, ["qwen3"])
    before = [r.type_url for r in await c.until(EDS)]
    assert CDS not in before  # "extra"'s clusters were not sent (its route was: RDS)


async def removal(plane: Plane, c: SpecClient) -> None:
    """A resource that goes is removed: omitted (SotW CDS) or in removed_resources."""
    c.subscribe(CDS, [])
    c.ack(await c.recv())
    plane.state.set_pools("test", [Pool("qwen3", (A, B)), Pool("gone", (A,))])
    plane.publisher.publish_now()
    reply = await c.recv()
    assert "gone" in reply.names
    c.ack(reply)
    plane.set(A, B)
    reply = await c.recv()
    if c.delta:
        assert "gone" in reply.removed and "gone/pinned" in reply.removed
    else:
        assert "gone" not in reply.names and "qwen3" in reply.names


async def reconnect_with_known_versions(plane: Plane, c: SpecClient) -> None:
    """Delta: what the client says it holds is not sent again; what is gone is removed."""
    c.subscribe(CDS, [])
    held = {name: "" for name in (await c.recv()).names}
    c.close()
    again = SpecClient(plane.channel, delta=True)
    try:
        versions = {n: v for n, v in _versions(plane).items() if n in held}
        versions["qwen3/node/node-old"] = "0123"
        again.subscribe(CDS, [], initial_resource_versions=versions)
        reply = await again.recv()
        assert reply.names == [] and reply.removed == []
        again.ack(reply)  # removals follow the answered additions
        reply = await again.recv()
        assert reply.names == [] and reply.removed == ["qwen3/node/node-old"]
    finally:
        again.close()


def _versions(plane: Plane) -> dict[str, str]:
    snapshot = plane.cache.snapshot_for(View("node-a"))  # what a client was sent
    assert snapshot is not None
    return {n: e.version for n, e in snapshot.resources[CDS].items()}


async def unknown_type(plane: Plane, c: SpecClient) -> None:
    """A type the server does not serve is not answered, and changes nothing for the rest."""
    c.subscribe(CDS, [])
    c.ack(await c.recv())
    c.subscribe("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", [])
    plane.pools("qwen3", "extra")
    reply = await c.recv()
    assert reply.type_url == CDS


async def type_before_its_dependency(plane: Plane, c: SpecClient) -> None:
    """Endpoints asked before any cluster, routes before any listener: answered."""
    c.subscribe(EDS, ["qwen3"])
    assert (await c.recv()).type_url == EDS
    assert (await c.barrier()).names == [ROUTE_NAME]


async def absent_name(plane: Plane, c: SpecClient) -> None:
    """Delta: a subscribed name that does not exist is listed in removed_resources."""
    c.subscribe(EDS, ["qwen3", "no-such-cluster"])
    reply = await c.recv()
    assert reply.names == ["qwen3"] and reply.removed == ["no-such-cluster"]


async def one_response_in_flight_per_type(plane: Plane, c: SpecClient) -> None:
    """Until a response is answered no other of its type is sent; then the latest state."""
    c.subscribe(CDS, [])
    first = await c.recv()
    plane.pools("qwen3", "one")
    c.subscribe(EDS, ["qwen3"])  # answered; the new clusters wait for the ACK
    endpoints = await c.recv()
    assert endpoints.type_url == EDS
    c.ack(endpoints, names=["qwen3"])
    plane.pools("qwen3", "one", "two")
    c.ack(first)
    reply = await c.recv()
    assert reply.type_url == CDS and "two" in reply.names
    c.ack(reply)
    c.subscribe(EDS, ["qwen3", "two"])  # the barrier (routes would wait for every assignment)
    assert [r.type_url for r in await c.until(EDS)] == [EDS]  # one CDS response for both


Row = Callable[[Plane, SpecClient], Awaitable[None]]
BOTH, SOTW, DELTA = (False, True), (False,), (True,)
TABLE: list[tuple[Row, tuple[bool, ...]]] = [
    (initial_request, BOTH),
    (ack_sends_nothing_again, BOTH),
    (nack_then_ack, BOTH),
    (stale_nonce_is_ignored, BOTH),
    (unsubscribe, BOTH),
    (wildcard_and_its_exit, BOTH),
    (removal, BOTH),
    (reconnect_with_known_versions, DELTA),
    (unknown_type, BOTH),
    (type_before_its_dependency, BOTH),
    (absent_name, DELTA),
    (one_response_in_flight_per_type, BOTH),
]


@pytest.mark.parametrize(
    ("row", "delta"),
    [(row, delta) for row, protocols in TABLE for delta in protocols],
    ids=[f"{row.__name__}-{'delta' if d else 'sotw'}" for row, ps in TABLE for d in ps],
)
async def test_xds_rule(plane: Plane, row: Row, delta: bool) -> None:
    client = SpecClient(plane.channel, delta)
    try:
        await row(plane, client)
    finally:
        client.close()
