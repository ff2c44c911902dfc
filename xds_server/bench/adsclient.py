"""A light ADS client that subscribes and ACKs like Envoy does: for tests and benchmarks.

It subscribes to clusters and listeners by wildcard, then to the endpoints of every cluster
and the routes its listener names, ACKs every response (or NACKs what `reject` picks), and
keeps the resources it holds as raw bytes: parsing a 10,000-endpoint assignment per stream
would measure the client, not the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from xds_server.xds import types
from xds_server.xds.server import NODE_METADATA_KEY, SERVICE


@dataclass
class Received:
    type_url: str
    version: str
    nonce: str
    names: list[str]
    removed: list[str]
    nbytes: int
    at: float


@dataclass
class AdsClient:
    target: str
    node_id: str
    node: str = ""
    listener_port: int | None = None
    delta: bool = False
    #: (type_url, resource names) -> error message to NACK with, or None to ACK.
    reject: Callable[[str, list[str]], str | None] = lambda type_url, names: None
    #: name -> version (delta) or resource bytes' length (SotW), per type.
    held: dict[str, dict[str, str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    keep_history: bool = True
    on_response: Callable[[Received], None] | None = None
    _queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _subscribed: dict[str, list[str]] = field(default_factory=dict)
    _acked_versions: dict[str, str] = field(default_factory=dict)

    def _node(self) -> base_pb2.Node:
        meta: dict[str, Any] = {"node": self.node}
        if self.listener_port is not None:
            meta["listener_port"] = self.listener_port
        metadata = struct_pb2.Struct()
        metadata.update({NODE_METADATA_KEY: meta})
        return base_pb2.Node(id=self.node_id, cluster="bench", metadata=metadata)

    async def run(self, channel: grpc.aio.Channel | None = None) -> None:
        """Stream until cancelled or the server ends the stream."""
        own = channel is None
        channel = channel or grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            # Receive windows as large as Envoy's (its HTTP/2 initial_stream_window_size
            # defaults to 256 MiB); gRPC's 64 KiB default would make the server wait for
            # window updates from this one busy client process, which Envoy never does.
            ("grpc.http2.lookahead_bytes", 256 * 1024 * 1024),
        ])
        method = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        request_type: Any = (
            discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        )
        response_type: Any = (
            discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        )
        call = channel.stream_stream(
            f"/{SERVICE}/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(self._requests())
        try:
            first = True
            for type_url in (types.CLUSTER, types.LISTENER):
                self._send_subscribe(type_url, [], node=first)
                first = False
            async for response in call:
                self._on_response(response)
        finally:
            call.cancel()
            if own:
                await channel.close()

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self._queue.get()
            yield item

    def _send_subscribe(self, type_url: str, names: list[str], *, node: bool = False) -> None:
        if self.delta:
            self._queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                node=self._node() if node else None, type_url=type_url,
                resource_names_subscribe=names,
            ))
        else:
            self._queue.put_nowait(discovery_pb2.DiscoveryRequest(
                node=self._node() if node else None, type_url=type_url, resource_names=names,
            ))

    def _on_response(self, response: Any) -> None:
        type_url = response.type_url
        held = self.held.setdefault(type_url, {})
        names: list[str] = []
        removed: list[str] = []
        new_clusters: list[str] = []
        route_names: list[str] = []
        if self.delta:
            for resource in response.resources:
                names.append(resource.name)
                held[resource.name] = resource.version
            removed = list(response.removed_resources)
            for name in removed:
                held.pop(name, None)
            version = response.system_version_info
            payloads = [r.resource for r in response.resources]
        else:
            payloads = list(response.resources)
            version = response.version_info
        if type_url in (types.CLUSTER, types.LISTENER) or not self.delta:
            for packed in payloads:
                name = self._name_of(type_url, packed, route_names)
                if not self.delta:
                    names.append(name)
                    held[name] = version
            if not self.delta and type_url in types.FULL_STATE_TYPES:
                for gone in set(held) - set(names):
                    del held[gone]
        if type_url == types.CLUSTER:
            new_clusters = sorted(self.held.get(types.CLUSTER, {}))
        received = Received(
            type_url=type_url, version=version, nonce=response.nonce, names=names,
            removed=removed, nbytes=response.ByteSize(), at=time.perf_counter(),
        )
        if self.keep_history:
            self.received.append(received)
        error = self.reject(type_url, names)
        self._ack(type_url, version, response.nonce, error)
        if type_url == types.CLUSTER:
            self._resubscribe(types.ENDPOINT, new_clusters)
        if route_names:
            self._resubscribe(types.ROUTE, route_names)
        if self.on_response is not None:
            self.on_response(received)
        self._changed.set()
        self._changed = asyncio.Event()

    def _name_of(self, type_url: str, packed: Any, route_names: list[str]) -> str:
        if type_url == types.CLUSTER:
            return str(cluster_pb2.Cluster.FromString(packed.value).name)
        if type_url == types.LISTENER:
            listener = listener_pb2.Listener.FromString(packed.value)
            for chain in listener.filter_chains:
                for f in chain.filters:
                    manager = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    route_names.append(manager.rds.route_config_name)
            return str(listener.name)
        return _leading_name(packed.value)

    def _ack(self, type_url: str, version: str, nonce: str, error: str | None) -> None:
        detail = status_pb2.Status(code=3, message=error) if error else None
        if self.delta:
            self._queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=nonce, error_detail=detail,
            ))
        else:
            acked = self._acked_versions.get(type_url, "") if error else version
            if not error:
                self._acked_versions[type_url] = version
            self._queue.put_nowait(discovery_pb2.DiscoveryRequest(
                type_url=type_url, version_info=acked, response_nonce=nonce,
                resource_names=self._subscribed.get(type_url, []), error_detail=detail,
            ))

    def _resubscribe(self, type_url: str, names: list[str]) -> None:
        old = self._subscribed.get(type_url)
        if old == names:
            return
        self._subscribed[type_url] = names
        if self.delta:
            gone = sorted(set(old or []) - set(names))
            self._queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=sorted(set(names) - set(old or [])),
                resource_names_unsubscribe=gone,
            ))
        else:
            self._queue.put_nowait(discovery_pb2.DiscoveryRequest(
                type_url=type_url, version_info=self._acked_versions.get(type_url, ""),
                resource_names=names,
            ))

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds after some response (or now)."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()


def _leading_name(payload: bytes) -> str:
    """Field 1 of a ClusterLoadAssignment or RouteConfiguration is its name, and protobuf
    writes fields in number order: read it without parsing thousands of endpoints."""
    if not payload or payload[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        byte = payload[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    return payload[i : i + length].decode()
