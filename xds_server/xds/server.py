"""The ADS server: state-of-the-world and incremental (delta) xDS over one gRPC stream each.

It knows the protocol (subscriptions, nonces, ACK/NACK, push order) and nothing of pools:
what to send comes from the snapshot cache, per view. Responses are assembled from entries
encoded once in the cache, so serving N streams costs N byte joins, not N serializations.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.logsafe import LogLimiter, clip
from xds_server.metrics import Metrics
from xds_server.model import View
from xds_server.xds import types
from xds_server.xds.cache import CHANGED, SnapshotCache
from xds_server.xds.snapshot import Entry, set_version

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
#: Node metadata key an Envoy's bootstrap sets: {"hybridlb": {"node": ..., "listener_port": ...}}
NODE_METADATA_KEY = "hybridlb"


@dataclass
class TypeState:
    """One resource type on one stream."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    #: name -> version the client has (delta) or was last sent (SotW).
    sent: dict[str, str] = field(default_factory=dict)
    responded: bool = False
    last_nonce: str = ""
    last_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_message: str = ""
    # Nonce -> version of responses not yet answered by Envoy.
    in_flight: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamInfo:
    """What /debug/state shows of a connected Envoy."""

    id: str
    node_id: str = ""
    view: View = field(default_factory=View)
    protocol: str = "sotw"
    peer: str = ""
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "stream": self.id,
            "node": clip(self.view.node),
            "listener_port": self.view.listener_port,
            "protocol": self.protocol,
            "peer": self.peer,
            "connected_s": round(time.time() - self.connected_at, 1),
            "acked": {types.short(t): s.acked_version for t, s in self.types.items()},
            "nacked": {
                types.short(t): {"version": s.nacked_version, "error": s.nack_message}
                for t, s in self.types.items()
                if s.nacked_version
            },
        }


def view_from_node(node: base_pb2.Node, logs: LogLimiter | None = None) -> View:
    """Place an Envoy by its bootstrap node metadata; bad values fall back to the default
    (and are logged through `logs`, when given)."""
    meta = node.metadata.fields.get(NODE_METADATA_KEY)
    if meta is None or not meta.HasField("struct_value"):
        return View()
    fields = meta.struct_value.fields
    node_name = fields["node"].string_value if "node" in fields else ""
    port: int | None = None
    if "listener_port" in fields:
        raw = fields["listener_port"]
        value = raw.number_value if raw.HasField("number_value") else raw.string_value
        try:
            port = int(value)
            if not 0 < port < 65536:
                raise ValueError(value)
        except (TypeError, ValueError):
            if logs is not None:
                logs.log(log, logging.WARNING, "bad_listener_port",
                         "envoy %s: ignoring bad listener_port %r in node metadata",
                         clip(node.id), clip(str(value)))
            port = None
    return View(node=node_name, listener_port=port)


class AdsServer:
    def __init__(self, *, cache: SnapshotCache, metrics: Metrics) -> None:
        self._cache = cache
        self._metrics = metrics
        self._streams: dict[str, StreamInfo] = {}
        # What a client can repeat at will (connect, ask, NACK) is logged a few times a while.
        self._logs = LogLimiter(metrics.log_suppressed)
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        # type URL -> (a resource mapping, its set version). Streams that want every resource
        # of a type share the cache's mapping, so its version is hashed once per snapshot,
        # not once per stream. Holding the mapping keeps the identity check sound.
        self._set_versions: dict[str, tuple[Mapping[str, Entry], str]] = {}

    @property
    def streams(self) -> Mapping[str, StreamInfo]:
        return self._streams

    def handler(self) -> grpc.GenericRpcHandler:
        # Responses are pre-assembled bytes; requests are parsed normally.
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )

    async def stream_sotw(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[bytes]:
        async for response in self._serve(requests, context, "sotw"):
            yield response

    async def stream_delta(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any
    ) -> AsyncIterator[bytes]:
        async for response in self._serve(requests, context, "delta"):
            yield response

    async def _serve(
        self, requests: AsyncIterator[Any], context: Any, protocol: str
    ) -> AsyncIterator[bytes]:
        info = StreamInfo(id=str(next(self._ids)), protocol=protocol, peer=clip(_peer(context)))
        queue: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(_read(requests, queue))
        self._cache.subscribe(queue)
        self._metrics.streams.labels(protocol).inc()
        self._streams[info.id] = info
        pending_change = False
        try:
            while True:
                item = await queue.get()
                if item is _EOF:
                    break
                if isinstance(item, BaseException):
                    self._logs.log(log, logging.INFO, "stream_ended", "stream %s (%s) ended: %s",
                                   info.id, info.node_id, clip(str(item)))
                    break
                if item is CHANGED:
                    pending_change = True
                    if not queue.empty():
                        continue  # coalesce: serve queued requests first, push once
                    if info.node_id or info.types:
                        for response in self._push_all(info):
                            yield response
                    pending_change = False
                    continue
                if protocol == "sotw":
                    type_url = self._on_sotw_request(info, item)
                else:
                    type_url = self._on_delta_request(info, item)
                if type_url is None:
                    continue
                if pending_change and queue.empty():
                    pending_change = False
                    for response in self._push_all(info):
                        yield response
                else:
                    single = self._push(info, type_url)
                    if single is not None:
                        yield single
        finally:
            reader.cancel()
            self._cache.unsubscribe(queue)
            self._metrics.streams.labels(protocol).dec()
            self._streams.pop(info.id, None)
            self._logs.log(log, logging.INFO, "disconnect", "envoy %s (node %r) disconnected",
                           info.node_id, clip(info.view.node))

    def _identify(self, info: StreamInfo, node: base_pb2.Node) -> None:
        if info.node_id or not node.id:
            return
        info.node_id = clip(node.id)
        info.view = view_from_node(node, self._logs)
        self._logs.log(
            log, logging.INFO, "connect",
            "envoy %s connected (%s, node %r, listener port %s, peer %s)",
            info.node_id, info.protocol, clip(info.view.node), info.view.listener_port,
            info.peer,
        )

    # --- state of the world -------------------------------------------------------------

    def _type_url(self, info: StreamInfo, request: Any) -> str | None:
        """Identify the Envoy on its first request; the type asked for, if we serve it."""
        self._identify(info, request.node)
        type_url = str(request.type_url)
        if type_url not in types.PUSH_ORDER:
            self._logs.log(log, logging.WARNING, "unsupported_type",
                           "envoy %s asked for unsupported type %s", info.node_id,
                           clip(type_url))
            return None
        return type_url

    def _on_sotw_request(
        self, info: StreamInfo, request: discovery_pb2.DiscoveryRequest
    ) -> str | None:
        type_url = self._type_url(info, request)
        if type_url is None:
            return None
        state = info.types.setdefault(type_url, TypeState())
        names = set(request.resource_names)
        state.wildcard = type_url in types.FULL_STATE_TYPES and (not names or "*" in names)
        for gone in set(state.sent) - names:
            if not state.wildcard:
                state.sent.pop(gone, None)
        state.names = names
        self._on_reply(info, type_url, state, request.response_nonce, request.error_detail)
        return type_url

    # --- incremental --------------------------------------------------------------------

    def _on_delta_request(
        self, info: StreamInfo, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> str | None:
        type_url = self._type_url(info, request)
        if type_url is None:
            return None
        first = type_url not in info.types
        state = info.types.setdefault(type_url, TypeState())
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if first:
            # Legacy wildcard: a first request naming nothing for a wildcard-capable type.
            state.wildcard = type_url in types.FULL_STATE_TYPES and not subscribe
            state.sent.update(request.initial_resource_versions)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        state.names |= subscribe - {"*"}
        state.names -= unsubscribe
        for name in unsubscribe:
            state.sent.pop(name, None)
        self._on_reply(info, type_url, state, request.response_nonce, request.error_detail)
        return type_url

    # --- both ---------------------------------------------------------------------------

    def _on_reply(
        self, info: StreamInfo, type_url: str, state: TypeState, nonce: str, error: Any
    ) -> None:
        if not nonce:
            return
        version = state.in_flight.pop(nonce, None)
        if version is None:
            return  # a reply to an older response: only its subscription counts
        if error.code or error.message:
            state.nacked_version = version
            state.nack_message = clip(error.message)
            self._metrics.nacks.labels(types.short(type_url)).inc()
            # Not resent: Envoy keeps its last good config; the next change pushes again.
            self._logs.log(
                log, logging.ERROR, "nack", "envoy %s (node %r) rejected %s version %s: %s",
                info.node_id, clip(info.view.node), types.short(type_url), version,
                state.nack_message,
            )
        else:
            state.acked_version = version
            self._metrics.acks.labels(types.short(type_url)).inc()
        # Nonces answered out of order are moot once a newer one is answered.
        state.in_flight = {n: v for n, v in state.in_flight.items() if int(n) > int(nonce)}

    def _push_all(self, info: StreamInfo) -> list[bytes]:
        responses = []
        for type_url in types.PUSH_ORDER:
            if type_url in info.types:
                response = self._push(info, type_url)
                if response is not None:
                    responses.append(response)
        return responses

    def _push(self, info: StreamInfo, type_url: str) -> bytes | None:
        state = info.types[type_url]
        available = self._cache.resources_for(info.view).get(type_url, {})
        if state.wildcard or available.keys() <= state.names:
            # Everything there is (the usual EDS subscription): no per-stream copy to build.
            desired: Mapping[str, Entry] = available
        else:
            desired = {n: available[n] for n in state.names if n in available}
        resend_endpoints = type_url == types.CLUSTER and types.ENDPOINT in info.types
        # What this stream held before, for the cluster case below; a C-level copy, so an
        # update that changes no cluster costs no per-cluster Python loop here.
        sent_before = dict(state.sent) if resend_endpoints else {}
        if info.protocol == "sotw":
            response = self._sotw_response(type_url, state, desired, available)
        else:
            response = self._delta_response(type_url, state, desired, available)
        if response is None:
            return None
        if resend_endpoints:
            # A (re)sent cluster warms until its endpoints arrive: always resend them.
            endpoints = info.types[types.ENDPOINT]
            for name, entry in desired.items():
                if sent_before.get(name) != entry.version:
                    endpoints.sent.pop(name, None)
        self._metrics.pushes.labels(types.short(type_url), info.protocol).inc()
        self._metrics.push_bytes.labels(types.short(type_url)).inc(len(response))
        return response

    def _set_version(
        self, type_url: str, desired: Mapping[str, Entry], available: Mapping[str, Entry]
    ) -> str:
        """`set_version(desired)`; `desired` is drawn from `available`, so when it is as
        long it holds the same entries and the shared, once-hashed version applies."""
        if len(desired) != len(available):
            return set_version(desired.values())
        cached = self._set_versions.get(type_url)
        if cached is not None and cached[0] is available:
            return cached[1]
        version = set_version(available.values())
        self._set_versions[type_url] = (available, version)
        return version

    def _sotw_response(
        self,
        type_url: str,
        state: TypeState,
        desired: Mapping[str, Entry],
        available: Mapping[str, Entry],
    ) -> bytes | None:
        current = {n: e.version for n, e in desired.items()}
        if type_url in types.FULL_STATE_TYPES:
            if state.responded and current == state.sent:
                return None
            send = list(desired.values())
        else:
            send = [e for n, e in desired.items() if state.sent.get(n) != e.version]
            if not send:
                return None
        version = self._set_version(type_url, desired, available)
        nonce = str(next(self._nonces))
        state.sent.update({e.name: e.version for e in send})
        if type_url in types.FULL_STATE_TYPES:
            state.sent = current
        state.responded = True
        state.last_nonce = nonce
        state.last_version = version
        state.in_flight[nonce] = version
        head: bytes = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce
        ).SerializeToString()
        # One join, one allocation: `head + b"".join(...)` would copy every byte twice.
        return b"".join([head, *(e.sotw for e in send)])

    def _delta_response(
        self,
        type_url: str,
        state: TypeState,
        desired: Mapping[str, Entry],
        available: Mapping[str, Entry],
    ) -> bytes | None:
        send = [e for n, e in desired.items() if state.sent.get(n) != e.version]
        gone = state.sent.keys() - desired.keys()
        removed = [
            n for n in state.sent if n in gone and (state.wildcard or n in state.names)
        ] if gone else []
        if not send and not removed and (state.responded or not state.wildcard):
            return None
        version = self._set_version(type_url, desired, available)
        nonce = str(next(self._nonces))
        for name in removed:
            del state.sent[name]
        state.sent.update({e.name: e.version for e in send})
        state.responded = True
        state.last_nonce = nonce
        state.last_version = version
        state.in_flight[nonce] = version
        head: bytes = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=nonce,
            removed_resources=removed,
        ).SerializeToString()
        return b"".join([head, *(e.delta for e in send)])


_EOF = object()


async def _read(requests: AsyncIterator[Any], queue: asyncio.Queue[object]) -> None:
    try:
        async for request in requests:
            queue.put_nowait(request)
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        queue.put_nowait(exc)
        return
    except Exception as exc:  # the stream broke: end this stream, never the server
        queue.put_nowait(exc)
        return
    queue.put_nowait(_EOF)


def _identity(data: bytes) -> bytes:
    return data


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return ""
