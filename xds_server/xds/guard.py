"""Who may hold an xDS stream (ADS, or load reports), and how a stream that may not ends.

Wraps the ADS server's handler, or the load-report (LRS) server's, so the protocol code stays
about the protocol:

- streams are capped in total and per peer address: one client cannot hold the server's
  memory with stream after stream (RESOURCE_EXHAUSTED);
- with mutual TLS, the client certificate must name the node whose view the Envoy asks for
  (a URI SAN such as `spiffe://<trust domain>/ns/<namespace>/node/<node>`): a certificate
  stolen from one node does not read another's view (PERMISSION_DENIED). An Envoy that
  names no node (a gateway) gets the view every Envoy may have;
- a request that does not parse ends the stream with INVALID_ARGUMENT, not OK;
- a request naming more resources than `max_resource_names` ends it with
  RESOURCE_EXHAUSTED: the server's work on a request is linear in the names (a delta
  reconnect's made-up versions are each diffed and removed, on the event loop), and a real
  Envoy names a few per pool (6 at 10,000 replicas on 1,250 nodes). A load report's clusters
  count as its names: the server reads each.

Each refusal is counted (`hybridlb_xds_refused_streams_total{reason}`) and logged a few
times per interval at most.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf.message import DecodeError

from xds_server.logsafe import LogLimiter, clip
from xds_server.metrics import Metrics
from xds_server.xds.server import view_from_node

log = logging.getLogger(__name__)

#: The default `--tls-node-san`: a SPIFFE id in the Kubernetes shape, any trust domain and
#: namespace (the client CA decides who issues them).
DEFAULT_NODE_SAN = "spiffe://*/ns/*/node/{node}"

Behavior = Callable[[AsyncIterator[Any], Any], AsyncIterator[bytes]]


class NodeSan:
    """A URI SAN pattern naming a node: `{node}` is the node, `*` any one path segment."""

    def __init__(self, pattern: str) -> None:
        if pattern.count("{node}") != 1:
            raise ValueError(f"{pattern!r} must contain {{node}} once")
        parts = [re.escape(p).replace(r"\*", "[^/]+") for p in pattern.split("{node}")]
        self._regex = re.compile(f"{parts[0]}(?P<node>[^/]+){parts[1]}")

    def nodes(self, uris: list[str]) -> set[str]:
        """The nodes a certificate with these URI SANs may ask for."""
        return {m["node"] for u in uris if (m := self._regex.fullmatch(u)) is not None}


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.reason = reason


class AdsGuard:
    """A gRPC generic handler (it has `service`) around the ADS or LRS server's. Each guard
    counts only the streams it wraps."""

    def __init__(self, inner: grpc.GenericRpcHandler, *, metrics: Metrics, max_streams: int,
                 max_streams_per_peer: int, max_resource_names: int,
                 node_san: NodeSan | None) -> None:
        """`node_san`: the pattern client certificates must match (mutual TLS), or None."""
        self._inner = inner
        self._metrics = metrics
        self._max_streams = max_streams
        self._max_per_peer = max_streams_per_peer
        self._max_names = max_resource_names
        self._node_san = node_san
        self._per_peer: Counter[str] = Counter()
        self._total = 0
        self._logs = LogLimiter(metrics.log_suppressed)

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None or handler.stream_stream is None:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            self._guarded(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded(self, behavior: Behavior) -> Behavior:
        async def guarded(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
            peer = _peer_host(context)
            if self._total >= self._max_streams:
                await self._refuse(context, peer, _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_streams",
                    f"the control plane holds its maximum of {self._max_streams} streams"))
            if self._per_peer[peer] >= self._max_per_peer:
                await self._refuse(context, peer, _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_from_peer",
                    f"{self._max_per_peer} streams from this address already"))
            self._per_peer[peer] += 1
            self._total += 1
            refused: list[_Refused] = []
            try:
                async for response in behavior(self._checked(requests, context, refused),
                                               context):
                    yield response
            finally:
                self._total -= 1
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]
            if refused:
                await self._refuse(context, peer, refused[0])

        return guarded

    async def _checked(self, requests: AsyncIterator[Any], context: Any,
                       refused: list[_Refused]) -> AsyncIterator[Any]:
        """The requests, ending (with the reason in `refused`) at one that may not pass."""
        allowed = self._allowed_nodes(context)
        try:
            async for request in requests:
                names = _names(request)
                if names > self._max_names:
                    refused.append(_Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_names",
                        f"a request names {names} resources; at most {self._max_names}"))
                    return
                if allowed is not None and request.HasField("node"):
                    # Unlogged: the server logs a bad listener port when it places the Envoy.
                    node = view_from_node(request.node).node
                    if node and node not in allowed:
                        refused.append(_Refused(
                            grpc.StatusCode.PERMISSION_DENIED, "node_not_in_certificate",
                            f"the client certificate does not name node {clip(node)!r}"))
                        return
                yield request
        except DecodeError:
            refused.append(_Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                    "a request does not parse"))

    def _allowed_nodes(self, context: Any) -> set[str] | None:
        if self._node_san is None:
            return None
        uris = [u.decode(errors="replace") for u in context.auth_context().get("peer_uri", [])]
        return self._node_san.nodes(uris)

    async def _refuse(self, context: Any, peer: str, refused: _Refused) -> None:
        self._metrics.refused_streams.labels(refused.reason).inc()
        self._logs.log(log, logging.WARNING, f"refused_{refused.reason}",
                       "xDS stream from %s refused (%s): %s", clip(peer), refused.reason,
                       refused)
        await context.abort(refused.code, str(refused))


def _names(request: Any) -> int:
    """How many resource names a SotW or delta request carries (a load report: clusters)."""
    if isinstance(request, discovery_pb2.DiscoveryRequest):
        return len(request.resource_names)
    if isinstance(request, lrs_pb2.LoadStatsRequest):
        return len(request.cluster_stats)
    return (len(request.resource_names_subscribe) + len(request.resource_names_unsubscribe)
            + len(request.initial_resource_versions))


def _peer_host(context: Any) -> str:
    """`ipv4:10.0.0.1:5000` -> `ipv4:10.0.0.1`: streams count per address, not connection."""
    try:
        peer = str(context.peer())
    except Exception:
        return ""
    return peer.rsplit(":", 1)[0]
