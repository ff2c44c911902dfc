"""The ADS guard in front of an in-process server, over real gRPC: stream caps, malformed
requests, and NACK text and node ids as logs and /debug/state see them.

(The certificate-names-the-node check needs TLS: tests/reliability/test_tls.py.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.bench.adsclient import AdsClient
from xds_server.logsafe import MAX_CHARS
from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import types
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.guard import AdsGuard
from xds_server.xds.server import SERVICE, AdsServer

A = Replica("10.0.0.1", 8000, "node-a")


@dataclass
class Plane:
    metrics: Metrics
    ads: AdsServer
    target: str

    def refused(self, reason: str) -> float:
        return float(self.metrics.refused_streams.labels(reason)._value.get())


async def _plane(max_streams: int, per_peer: int) -> tuple[Plane, grpc.aio.Server]:
    state, cache, metrics = State(), SnapshotCache(), Metrics()
    publisher = Publisher(state=state, cache=cache, metrics=metrics, settings=EnvoySettings())
    ads = AdsServer(cache=cache, metrics=metrics)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdsGuard(ads.handler(), metrics=metrics,
                                              max_streams=max_streams,
                                              max_streams_per_peer=per_peer,
                                              max_resource_names=100, node_san=None),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.set_pools("test", [Pool("qwen3", (A,))])
    publisher.publish_now()
    return Plane(metrics, ads, f"127.0.0.1:{port}"), server


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    p, server = await _plane(max_streams=3, per_peer=64)
    yield p
    await server.stop(0)


async def _held(plane: Plane, n: int) -> list[asyncio.Task[None]]:
    clients = [AdsClient(target=plane.target, node_id=f"e{i}") for i in range(n)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    for c in clients:
        await c.wait_until(lambda c=c: types.CLUSTER in c.held)
    return tasks


async def _refused_with(target: str) -> grpc.StatusCode:
    """The status of a stream that sends nothing: a client still writing when the server
    refuses it may see its own write fail first (Python gRPC's 'Internal error from Core')."""
    async def nothing() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/StreamAggregatedResources",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(nothing())
        code: grpc.StatusCode = await asyncio.wait_for(call.code(), 10)
    return code


async def test_streams_over_the_total_cap_are_refused_and_counted(plane: Plane) -> None:
    tasks = await _held(plane, 3)
    assert await _refused_with(plane.target) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert plane.refused("too_many_streams") == 1
    tasks.pop().cancel()  # a stream that ends frees its place
    await asyncio.sleep(0)
    await asyncio.wait_for(_wait(lambda: len(plane.ads.streams) == 2), 10)
    tasks += await _held(plane, 1)
    for t in tasks:
        t.cancel()


async def test_streams_over_the_per_peer_cap_are_refused_and_counted() -> None:
    plane, server = await _plane(max_streams=100, per_peer=2)
    try:
        tasks = await _held(plane, 2)
        assert await _refused_with(plane.target) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert plane.refused("too_many_from_peer") == 1
        assert plane.refused("too_many_streams") == 0
        for t in tasks:
            t.cancel()
    finally:
        await server.stop(0)


async def _wait(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("method", ["StreamAggregatedResources", "DeltaAggregatedResources"])
async def test_a_malformed_request_ends_the_stream_with_invalid_argument(
    plane: Plane, method: str
) -> None:
    async with grpc.aio.insecure_channel(plane.target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/{method}",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(
            iter([b"\xff\xff\xff not a discovery request"]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plane.refused("malformed") == 1
    assert plane.ads.streams == {}  # and the server forgot it


@pytest.mark.parametrize(("method", "request_"), [
    ("StreamAggregatedResources", discovery_pb2.DiscoveryRequest(
        type_url=types.ENDPOINT, resource_names=[f"c{i}" for i in range(101)])),
    ("DeltaAggregatedResources", discovery_pb2.DeltaDiscoveryRequest(
        type_url=types.CLUSTER, initial_resource_versions={f"c{i}": "1" for i in range(61)},
        resource_names_subscribe=[f"s{i}" for i in range(40)])),
], ids=["sotw", "delta"])
async def test_a_request_naming_too_many_resources_ends_the_stream(
    plane: Plane, method: str, request_: Any
) -> None:
    """The plane allows 100 names per request: 101 end the stream, counted."""
    async def one() -> AsyncIterator[bytes]:
        yield request_.SerializeToString()
        await asyncio.Event().wait()

    async with grpc.aio.insecure_channel(plane.target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(one())
        assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert plane.refused("too_many_names") == 1


async def test_nack_text_and_node_ids_are_capped_and_on_one_line(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "bad\n2026-01-01 00:00:00,000 ERROR xds_server.app: forged " + "x" * 100_000
    client = AdsClient(target=plane.target, node_id="id\n" + "n" * 1_000_000,
                       reject=lambda type_url, names: forged)
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(_wait(lambda: plane.metrics.nacks.labels("CDS")._value.get()),
                               10)
        (info,) = plane.ads.streams.values()
        doc = info.as_dict()
        task.cancel()
    assert len(doc["id"]) < MAX_CHARS + 30 and "\n" not in doc["id"]
    errors = [e["error"] for e in doc["nacked"].values()]
    assert errors and all(len(e) < MAX_CHARS + 30 and "\n" not in e for e in errors)
    assert errors[0].startswith("bad\\n2026")
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and len(text) < 4 * MAX_CHARS, text[:300]
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_the_guard_passes_unknown_methods_through() -> None:
    ads = AdsServer(cache=SnapshotCache(), metrics=Metrics())
    guard = AdsGuard(ads.handler(), metrics=Metrics(), max_streams=1, max_streams_per_peer=1,
                     max_resource_names=1, node_san=None)

    @dataclass
    class Details:
        method: str

    assert guard.service(Details("/other.Service/Method")) is None
    assert guard.service(Details(f"/{SERVICE}/StreamAggregatedResources")) is not None
    assert discovery_pb2.DiscoveryRequest  # the request type the handler parses


async def test_what_a_reconnecting_client_repeats_is_logged_a_few_times_and_counted(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    """30 streams in turn, each with a bad listener port: each connect, disconnect and bad
    port would be a line; 10 of each kind get through per interval, the rest are counted."""
    with caplog.at_level(logging.INFO):
        for i in range(30):
            client = AdsClient(target=plane.target, node_id=f"e{i}",
                               listener_port="x" * 10_000)  # type: ignore[arg-type]
            task = asyncio.create_task(client.run())
            await client.wait_until(lambda c=client: types.CLUSTER in c.held)
            task.cancel()
            await asyncio.wait_for(_wait(lambda: not plane.ads.streams), 10)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("bad listener_port" in line for line in lines) == 10
    assert sum(" connected (" in line for line in lines) == 10
    suppressed = plane.metrics.log_suppressed
    assert suppressed.labels("bad_listener_port")._value.get() == 20
    assert suppressed.labels("connect")._value.get() == 20
    assert all(len(line) < 4 * MAX_CHARS for line in lines)
