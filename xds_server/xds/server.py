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
from xds_server.xds.cache import Snapshot, SnapshotCache
from xds_server.xds.snapshot import Entry, set_version

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
#: Node metadata key an Envoy's bootstrap sets: {"hybridlb": {"node": ..., "listener_port": ...}}
NODE_METADATA_KEY = "hybridlb"


@dataclass
class TypeState:
    """One resource type on one stream."""

    #: Names the client subscribed to ("*" included when it asked for it by name).
    names: set[str] = field(default_factory=set)
    #: Whether the client ever named a resource: until then an empty request is the legacy
    #: wildcard; after, it unsubscribes from everything (xDS spec, "How the client specifies
    #: what resources to return").
    explicit: bool = False
    wildcard: bool = False
    #: name -> version the client holds (delta: as it told us on reconnect, or we sent).
    sent: dict[str, str] = field(default_factory=dict)
    #: SotW CDS/LDS: the entries of the last response, so that a removal can be held back.
    held: dict[str, Entry] = field(default_factory=dict)
    #: Delta: subscribed names already reported absent in `removed_resources`.
    told_absent: set[str] = field(default_factory=set)
    responded: bool = False
    #: Something to send may have changed since the last response.
    dirty: bool = True
    #: The client holds resources the snapshot no longer has: removed once the additions
    #: are answered (make-before-break).
    removals: bool = False
    last_nonce: str = ""
    #: The one response of this type awaiting an ACK/NACK, and its version.
    in_flight: str = ""
    in_flight_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_message: str = ""


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
                    response_serializer=pre_encoded,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=pre_encoded,
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
        """Read requests and wake on snapshots; after either, send what is due.

        Nothing is deferred in a flag that one path could skip: every wake-up ends in
        `_flush`, which compares what each type's client holds with the current snapshot.
        Requests are read into a bounded queue (a client that sends faster than it is served
        is pushed back by gRPC flow control), and are all applied before the flush, so a
        burst of them costs one flush.
        """
        info = StreamInfo(id=str(next(self._ids)), protocol=protocol, peer=clip(_peer(context)))
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=REQUEST_BACKLOG)
        wake = asyncio.Event()

        def changed() -> None:
            for state in info.types.values():
                state.dirty = True
            wake.set()

        reader = asyncio.create_task(_read(requests, queue, wake))
        self._cache.subscribe(changed)
        self._metrics.streams.labels(protocol).inc()
        self._streams[info.id] = info
        attached: View | None = None
        try:
            while True:
                await wake.wait()
                wake.clear()
                ended = False
                while not queue.empty():
                    item = queue.get_nowait()
                    if item is _EOF:
                        ended = True
                        break
                    if isinstance(item, BaseException):
                        self._logs.log(log, logging.INFO, "stream_ended",
                                       "stream %s (%s) ended: %s", info.id, info.node_id,
                                       clip(str(item)))
                        ended = True
                        break
                    self._on_request(info, item)
                if ended:
                    break
                if attached is None and info.node_id:
                    attached = info.view
                    self._cache.attach(attached)
                for response in self._flush(info):
                    yield response
        finally:
            reader.cancel()
            if attached is not None:
                self._cache.detach(attached)
            self._cache.unsubscribe(changed)
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

    def _on_request(self, info: StreamInfo, request: Any) -> None:
        """The prologue both protocols share: who asks, for what, answering which response."""
        self._identify(info, request.node)
        type_url = str(request.type_url)
        if type_url not in types.PUSH_ORDER:
            self._logs.log(log, logging.WARNING, "unsupported_type",
                           "envoy %s asked for unsupported type %s", info.node_id,
                           clip(type_url))
            return
        first = type_url not in info.types
        state = info.types.setdefault(type_url, TypeState())
        nonce = str(request.response_nonce)
        # A nonce other than the latest sent answers a response the client has since been
        # sent a newer one of: the spec lets the server ignore such a request. In SotW the
        # newer response's ACK will carry the whole subscription again; a delta request's
        # (un)subscriptions are not repeated, so only its ACK/NACK is ignored.
        stale = not first and nonce != state.last_nonce and bool(nonce)
        if stale and info.protocol == "sotw":
            log.debug("envoy %s: ignoring %s request with stale nonce %s",
                      info.node_id, types.short(type_url), clip(nonce))
            return
        if not stale and nonce:
            self._on_reply(info, type_url, state, nonce, request.error_detail)
        if info.protocol == "sotw":
            self._subscribe_sotw(type_url, state, request)
        else:
            self._subscribe_delta(type_url, state, request, first)

    @staticmethod
    def _subscribe_sotw(
        type_url: str, state: TypeState, request: discovery_pb2.DiscoveryRequest
    ) -> None:
        names = set(request.resource_names)
        state.explicit = state.explicit or bool(names)
        wildcard = type_url in types.FULL_STATE_TYPES and (
            "*" in names or not state.explicit
        )
        if names == state.names and wildcard == state.wildcard:
            return  # an ACK: nothing new is asked for
        if type_url not in types.FULL_STATE_TYPES:
            # Asked again later, it is sent again (the spec: a newly requested resource is
            # resent). CDS and LDS responses carry everything anyway.
            for gone in state.names - names:
                state.sent.pop(gone, None)
        state.names, state.wildcard, state.dirty = names, wildcard, True

    @staticmethod
    def _subscribe_delta(
        type_url: str,
        state: TypeState,
        request: discovery_pb2.DeltaDiscoveryRequest,
        first: bool,
    ) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if first:
            state.sent.update(request.initial_resource_versions)
        if not subscribe and not unsubscribe and not first:
            return  # an ACK
        state.explicit = state.explicit or bool(subscribe)
        state.names = (state.names | subscribe) - unsubscribe
        was_wildcard = state.wildcard
        state.wildcard = type_url in types.FULL_STATE_TYPES and (
            "*" in state.names or not state.explicit
        )
        for name in unsubscribe:
            state.sent.pop(name, None)
            state.told_absent.discard(name)
        if was_wildcard and not state.wildcard:
            # Leaving the wildcard: the client drops what it holds only through it.
            state.sent = {n: v for n, v in state.sent.items() if n in state.names}
        state.dirty = True

    def _on_reply(
        self, info: StreamInfo, type_url: str, state: TypeState, nonce: str, error: Any
    ) -> None:
        if nonce != state.in_flight:
            return  # answered already: a request that only changes the subscription
        version, state.in_flight = state.in_flight_version, ""
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
            state.nacked_version = state.nack_message = ""
            self._metrics.acks.labels(types.short(type_url)).inc()

    def _flush(self, info: StreamInfo) -> list[bytes]:
        """What is due now, in push order: clusters before their endpoints, listeners
        and routes once new clusters have their endpoints (`_warming`); at most one
        unanswered response per type (go-control-plane's rule: the next one carries the
        latest state once the last is answered). Removals go last, in reverse order, once
        every addition is answered (make-before-break)."""
        snapshot = self._cache.snapshot_for(info.view) if info.node_id else None
        if snapshot is None:
            return []
        responses = []
        for type_url in types.PUSH_ORDER:
            state = info.types.get(type_url)
            if state is None or not state.dirty or state.in_flight:
                continue
            if type_url in _ROUTING_TYPES and _warming(info, snapshot):
                continue  # stays dirty: sent once the new clusters have their endpoints
            response = self._push(info, type_url, snapshot, remove=False)
            if response is not None:
                responses.append(response)
        if any(s.in_flight or s.dirty for s in info.types.values()):
            return responses
        for type_url in reversed(types.PUSH_ORDER):
            state = info.types.get(type_url)
            if state is not None and state.removals:
                response = self._push(info, type_url, snapshot, remove=True)
                if response is not None:
                    responses.append(response)
        return responses

    def _push(
        self, info: StreamInfo, type_url: str, snapshot: Snapshot, *, remove: bool
    ) -> bytes | None:
        state = info.types[type_url]
        state.dirty = False
        available = snapshot.resources.get(type_url, {})
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
            response = self._sotw_response(type_url, state, desired, available, remove)
        else:
            response = self._delta_response(type_url, state, desired, available, remove)
        if response is None:
            return None
        if resend_endpoints:
            # A (re)sent cluster warms until its endpoints arrive: always resend them.
            endpoints = info.types[types.ENDPOINT]
            for name, entry in desired.items():
                if sent_before.get(name) != entry.version:
                    endpoints.sent.pop(name, None)
                    endpoints.dirty = True
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

    def _sent(self, state: TypeState, version: str) -> str:
        nonce = str(next(self._nonces))
        state.responded = True
        state.last_nonce = state.in_flight = nonce
        state.in_flight_version = version
        return nonce

    def _sotw_response(
        self,
        type_url: str,
        state: TypeState,
        desired: Mapping[str, Entry],
        available: Mapping[str, Entry],
        remove: bool,
    ) -> bytes | None:
        if type_url in types.FULL_STATE_TYPES:
            # Omitting a cluster or listener removes it: until the additions are answered,
            # keep sending the ones the snapshot dropped.
            kept = {} if remove else {
                n: e for n, e in state.held.items()
                if n not in desired and (state.wildcard or n in state.names)
            }
            state.removals = bool(kept)
            version = (set_version([*kept.values(), *desired.values()]) if kept
                       else self._set_version(type_url, desired, available))
            if kept:
                desired = {**kept, **desired}
            current = {n: e.version for n, e in desired.items()}
            if state.responded and current == state.sent:
                return None
            send = list(desired.values())
            state.sent = current
            state.held = dict(desired)
        else:
            # Other types are removed by their parents no longer naming them.
            send = [e for n, e in desired.items() if state.sent.get(n) != e.version]
            if not send:
                return None
            state.sent.update({e.name: e.version for e in send})
            version = self._set_version(type_url, desired, available)
        nonce = self._sent(state, version)
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
        remove: bool,
    ) -> bytes | None:
        send = [e for n, e in desired.items() if state.sent.get(n) != e.version]
        gone = list(state.sent.keys() - desired.keys())
        state.removals = bool(gone) and not remove
        removed = gone if remove else []
        # A subscribed name the snapshot lacks is said to be absent, once (xDS spec,
        # "Knowing When a Requested Resource Does Not Exist"); nothing held goes with it.
        absent = [
            n for n in state.names - state.told_absent - state.sent.keys()
            if n != "*" and n not in available
        ]
        if not send and not removed and not absent and (state.responded or not state.wildcard):
            return None
        for name in removed:
            del state.sent[name]
            if name in state.names:
                state.told_absent.add(name)
        state.told_absent.update(absent)
        state.told_absent.difference_update(e.name for e in send)
        state.sent.update({e.name: e.version for e in send})
        version = self._set_version(type_url, desired, available)
        nonce = self._sent(state, version)
        head: bytes = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=nonce,
            removed_resources=[*removed, *absent],
        ).SerializeToString()
        return b"".join([head, *(e.delta for e in send)])


_ROUTING_TYPES = (types.LISTENER, types.ROUTE)


def _warming(info: StreamInfo, snapshot: Snapshot) -> bool:
    """Whether a cluster this Envoy was (or is being) sent still waits for its endpoints.

    Envoy keeps a new cluster warming, out of reach of routes (503, "cluster not found"),
    until its assignment arrives; it asks for the assignment only after taking the cluster.
    So routes that may name a new cluster wait for: the clusters answered, and every
    assignment they name sent and answered. Not after a NACK of clusters: Envoy did not
    take them and will not ask for their endpoints.
    """
    clusters, endpoints = info.types.get(types.CLUSTER), info.types.get(types.ENDPOINT)
    if clusters is None or endpoints is None:
        return False  # a client that does not use both: nothing to wait for
    if clusters.in_flight or endpoints.in_flight:
        return True
    if clusters.nacked_version:
        return False
    return not snapshot.assignments_needed <= endpoints.sent.keys()


#: Requests read ahead of the stream's loop; beyond it gRPC flow control holds the client.
REQUEST_BACKLOG = 16

_EOF = object()


async def _read(
    requests: AsyncIterator[Any], queue: asyncio.Queue[object], wake: asyncio.Event
) -> None:
    try:
        async for request in requests:
            await queue.put(request)
            wake.set()
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        await queue.put(exc)
        wake.set()
        return
    except Exception as exc:  # the stream broke: end this stream, never the server
        await queue.put(exc)
        wake.set()
        return
    await queue.put(_EOF)
    wake.set()


def pre_encoded(data: bytes) -> bytes:
    """The response serializer of a handler whose responses are already bytes."""
    return data


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return ""
