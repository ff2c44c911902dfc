"""Envoy's External Processing service: protocol glue around `pick`.

It speaks the Gateway API Inference Extension's endpoint picker protocol v1.0
(docs/proposals/004-endpoint-picker-protocol in kubernetes-sigs/gateway-api-inference-extension):

- the pick and its fallbacks, in order, as `ip:port,ip:port,...` in the
  `x-gateway-destination-endpoint` header and under the same key in `envoy.lb` dynamic metadata
  (one value for both);
- the subset hint (`envoy.lb.subset_hint` filter metadata, key
  `x-gateway-destination-endpoint-subset`) restricts the candidates; an empty or ineligible
  subset is answered with an immediate 503;
- the endpoint the proxy reports as served (`envoy.lb` metadata
  `x-gateway-destination-endpoint-served`, on the response headers) is the one its pending pick
  is counted on;
- 429 when every candidate's queue is past `max_queue` (off by default);
- both body modes a gateway configures: BUFFERED (what this control plane pushes: Envoy holds
  the body, one answer to the headers, one to the body) and FULL_DUPLEX_STREAMED (GIE
  gateways: the headers are answered once the body is read, and every body chunk, both
  ways, is handed back in `streamed_response`).

Anything the picker cannot use (no body, not JSON, too large, no model, no pool) is answered
with "continue": the request then goes by the weights, and a counter says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xds_server.extproc.pick import (
    Candidate,
    Unreadable,
    all_queued,
    in_subset,
    least_loaded_rank,
    ranked,
    read_request,
)
from xds_server.extproc.state import PickerState, PrefixHolders
from xds_server.logsafe import clip
from xds_server.metrics import Metrics
from xds_server.settings import PickSettings
from xds_server.xds.resources import (
    DESTINATION_HEADER,
    LB_NS,
    PICKER_NODE_METADATA,
    RANK_HEADER,
    SERVED_KEY,
    SUBSET_KEY,
    SUBSET_NS,
)

log = logging.getLogger(__name__)

_STREAMED = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
#: A stream with no message for this long is ended: an Envoy's stream lives for one request.
STREAM_IDLE_S = 600.0


@dataclass(frozen=True)
class ServerLimits:
    """gRPC server options of the picker: dead peers and idle connections do not pile up."""

    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    #: A connection with no stream for this long is closed (Envoy reconnects on demand).
    idle_s: float = 300.0
    #: Connections are recycled after this long, letting streams finish for `age_grace_s`.
    max_age_s: float = 3600.0
    age_grace_s: float = 600.0

    def options(self) -> list[tuple[str, int]]:
        ms = 1000
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_s * ms)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * ms)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_idle_ms", int(self.idle_s * ms)),
            ("grpc.max_connection_age_ms", int(self.max_age_s * ms)),
            ("grpc.max_connection_age_grace_ms", int(self.age_grace_s * ms)),
        ]


class RareLog:
    """A warning at most once per interval; the next one says how many were held back."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._last = -interval_s
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        log.warning(message + " (%d more like it held back)", *args, held)


@dataclass
class StreamState:
    """What one request's stream has told the picker so far."""

    node: str
    content_type: str = ""
    asked_pool: str = ""
    subset: frozenset[str] | None = None
    #: FULL_DUPLEX_STREAMED: the picker holds the headers' answer and hands the body back.
    streamed_request: bool = False
    streamed_response: bool = False
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    #: Streamed and over the body limit: headers answered, chunks handed straight back.
    gave_up: bool = False
    #: Where the request went (the pick, or the fallback the proxy reports) and its rank.
    picked: str = ""
    rank: int | None = None
    #: The picked request's end was counted (its response trailers, else its stream's end).
    ended: bool = False


class Picker:
    def __init__(
        self, *, state: PickerState, metrics: Metrics, settings: PickSettings,
        model_header: str = "x-model",
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._settings = settings
        self._model_header = model_header
        self._prefixes = PrefixHolders()
        self._malformed_log = RareLog()

    async def Process(
        self, requests: AsyncIterator[ep.ProcessingRequest | None], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        stream = StreamState(node=dict(context.invocation_metadata() or ()).get(
            PICKER_NODE_METADATA, ""))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(STREAM_IDLE_S) as idle:
                async for request in requests:
                    idle.reschedule(loop.time() + STREAM_IDLE_S)
                    if request is None:
                        self._count("malformed")
                        self._malformed_log.warning("a malformed ext_proc message from %s",
                                                    str(context.peer())[:80])
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "malformed ProcessingRequest")
                        return
                    for response in self._on_message(request, stream):
                        yield response
        except TimeoutError:
            self._count("idle_stream")
        finally:
            # Envoy closes a request's stream when the request ends (its response complete,
            # or failed); the filter's config asks for the trailers so that it stays open
            # that long (see resources._extproc_filter).
            self._ended(stream)

    def _ended(self, s: StreamState) -> None:
        if s.picked and not s.ended:
            s.ended = True
            self._state.note_done(s.picked, s.rank)
            self._count("ended")

    def _on_message(
        self, request: ep.ProcessingRequest, s: StreamState
    ) -> list[ep.ProcessingResponse]:
        kind = request.WhichOneof("request")
        if request.HasField("protocol_config"):  # the first message of a stream carries it
            s.streamed_request = request.protocol_config.request_body_mode == _STREAMED
            s.streamed_response = request.protocol_config.response_body_mode == _STREAMED
        if kind == "request_headers":
            headers = request.request_headers.headers
            s.content_type = _header(headers, "content-type")
            s.asked_pool = _header(headers, self._model_header)
            s.subset = _subset(request.metadata_context)
            if request.request_headers.end_of_stream:
                self._count("no_body")
                return [_headers_response()]
            if s.streamed_request:
                return []  # answered once the body is read
            return [_headers_response(mode=self._body_mode(_header(headers, "content-length")))]
        if kind == "request_body":
            return self._on_body(request.request_body, s)
        if kind == "response_headers":
            self._on_served(request.metadata_context, s)
            return [ep.ProcessingResponse(response_headers=ep.HeadersResponse())]
        if kind == "response_body":
            body = request.response_body
            if s.streamed_response:
                return [ep.ProcessingResponse(response_body=_streamed(body.body,
                                                                      body.end_of_stream))]
            return [ep.ProcessingResponse(response_body=ep.BodyResponse())]
        if kind == "request_trailers":
            out = []
            if s.streamed_request and not s.gave_up:
                # Trailers end a streamed body: decide on what came.
                out = self._decide(b"".join(s.chunks), s, end_of_stream=False)
            return [*out, ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]
        if kind == "response_trailers":  # from an upstream that sends them: the end
            self._ended(s)
        return [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]

    def _body_mode(self, content_length: str) -> processing_mode_pb2.ProcessingMode | None:
        """BUFFERED for a body known to fit, else Envoy's configured BUFFERED_PARTIAL.

        Both fail open on size (the partial mode hands over what fits); but Envoy 1.40
        re-selects the route (for the pool and the pick) reliably only in BUFFERED mode:
        in BUFFERED_PARTIAL, when the body completes after the headers were answered, it
        passes the body on before it clears the route cache, and the request keeps the
        route chosen before the pick.
        """
        try:
            length = int(content_length)
        except ValueError:
            return None
        if 0 <= length <= self._settings.max_body_bytes:
            return processing_mode_pb2.ProcessingMode(
                request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
                request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
                response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND,
            )
        return None

    def _on_body(self, body: ep.HttpBody, s: StreamState) -> list[ep.ProcessingResponse]:
        if not s.streamed_request:
            if not body.end_of_stream:
                # BUFFERED_PARTIAL hands over a body larger than Envoy's buffer in part.
                self._count("too_large")
                return [ep.ProcessingResponse(request_body=ep.BodyResponse())]
            return self._decide(body.body, s, end_of_stream=True)
        if s.gave_up:
            return [ep.ProcessingResponse(request_body=_streamed(body.body, body.end_of_stream))]
        s.chunks.append(body.body)
        s.size += len(body.body)
        if s.size > self._settings.max_body_bytes:
            # Too large to read: let it through unpicked rather than hold it all.
            self._count("too_large")
            s.gave_up = True
            held, s.chunks = b"".join(s.chunks), []
            return [_headers_response(),
                    ep.ProcessingResponse(request_body=_streamed(held, body.end_of_stream))]
        if not body.end_of_stream:
            return []
        return self._decide(b"".join(s.chunks), s, end_of_stream=True)

    def _decide(self, body: bytes, s: StreamState, *, end_of_stream: bool
                ) -> list[ep.ProcessingResponse]:
        """The answer to a complete body: the pick, a refusal, or "continue"."""
        started = time.perf_counter()
        mutation, refusal, metadata = self._choose(body, s)
        if refusal is not None:
            return [refusal]
        if s.streamed_request:
            # The held headers carry the pick; the body goes back as it came.
            return [
                ep.ProcessingResponse(
                    request_headers=ep.HeadersResponse(response=mutation or ep.CommonResponse()),
                    dynamic_metadata=metadata),
                ep.ProcessingResponse(request_body=_streamed(body, end_of_stream)),
            ]
        response = ep.ProcessingResponse(
            request_body=ep.BodyResponse(response=mutation or ep.CommonResponse()),
            dynamic_metadata=metadata)
        if mutation is not None:
            self._metrics.extproc_seconds.observe(time.perf_counter() - started)
        return [response]

    def _choose(
        self, body: bytes, s: StreamState
    ) -> tuple[ep.CommonResponse | None, ep.ProcessingResponse | None, struct_pb2.Struct | None]:
        """(header mutation, immediate response, dynamic metadata); all None: "continue"."""
        try:
            info = read_request(body, s.content_type, self._settings)
        except Unreadable as exc:
            self._count(exc.reason)
            log.debug("passing a request through: %s (%s)", exc.reason, clip(str(exc)))
            return None, None, None
        # The pool as the router would choose it: the header, else the model if a pool has
        # that name, else the first pool.
        pool = s.asked_pool or info.model
        candidates = self._state.candidates(pool) if pool else None
        if candidates is None and not s.asked_pool:
            pool = self._state.default_pool()
            candidates = self._state.candidates(pool) if pool else None
        if candidates is None:
            self._count("no_pool")
            return None, None, None
        if s.subset is not None:
            candidates = in_subset(candidates, s.subset)
            if not candidates:
                # The protocol: an empty or ineligible subset is a 503, never another endpoint.
                self._count("no_subset_endpoint")
                return None, _refuse(http_status_pb2.StatusCode.ServiceUnavailable,
                                     "no eligible endpoint in the subset"), None
        if all_queued(candidates, self._settings):
            self._count("queue_full")
            return None, _refuse(http_status_pb2.StatusCode.TooManyRequests,
                                 "every endpoint's queue is full"), None
        # After the 429 check: a full node is no reason to refuse while the pool has room.
        # Held while the node's pick queues no longer than the pool's (pick.py's docstring).
        held = self._state.keep(pool, s.node) > 0
        order = ranked(candidates, prefix_holders=self._prefixes.get(info.prefix),
                       settings=self._settings, held_on=s.node if held else "")
        if not order:
            self._count("no_candidate")
            return None, None, None
        chosen = order[0]
        rank = least_loaded_rank(chosen, self._settings)
        if rank is not None:
            # The rank index must exist on every endpoint the proxy may fall back to.
            order = [c for c in order if c is chosen or c.capacity > rank]
        self._state.note_pick(chosen.address, rank)
        self._prefixes.add(info.prefix, chosen.address)
        s.picked, s.rank = chosen.address, rank
        self._count("picked")
        return _pick_mutation(order, rank, pool, self._model_header), None, _lb_metadata(order)

    def _on_served(self, metadata: base_pb2.Metadata, s: StreamState) -> None:
        lb = metadata.filter_metadata.get(LB_NS)
        served = lb.fields.get(SERVED_KEY) if lb is not None else None
        if served is None or not s.picked:
            return
        address = served.string_value
        self._count("served")
        if address and address != s.picked:
            # The proxy went down the fallback list: the request waits there, not at the pick.
            self._state.note_served(s.picked, address, s.rank)
            s.picked = address
            self._count("served_by_fallback")

    def _count(self, outcome: str) -> None:
        self._metrics.extproc_requests.labels(outcome).inc()


def _subset(metadata: base_pb2.Metadata) -> frozenset[str] | None:
    hint = metadata.filter_metadata.get(SUBSET_NS)
    value = hint.fields.get(SUBSET_KEY) if hint is not None else None
    if value is None:
        return None
    if value.HasField("list_value"):
        return frozenset(v.string_value for v in value.list_value.values)
    # A comma-separated string, as some proxies write lists.
    return frozenset(a.strip() for a in value.string_value.split(",") if a.strip())


def _pick_mutation(order: list[Candidate], rank: int | None, pool: str,
                   model_header: str) -> ep.CommonResponse:
    headers = [_set(DESTINATION_HEADER, ",".join(c.address for c in order)),
               _set(model_header, pool)]
    if rank is not None:
        headers.append(_set(RANK_HEADER, str(rank)))
    return ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=headers),
        # The route was chosen before the body; the pool and pick change it.
        clear_route_cache=True,
    )


def _lb_metadata(order: list[Candidate]) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({LB_NS: {DESTINATION_HEADER: ",".join(c.address for c in order)}})
    return metadata


def _refuse(code: int, why: str) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=code),
        body=f"hybridlb picker: {why}\n".encode(), details=why.replace(" ", "_")))


def _headers_response(
    mode: processing_mode_pb2.ProcessingMode | None = None,
) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(), mode_override=mode)


def _streamed(chunk: bytes, end_of_stream: bool) -> ep.BodyResponse:
    return ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(
        streamed_response=ep.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream))))


def _header(headers: base_pb2.HeaderMap, name: str) -> str:
    for h in headers.headers:
        if h.key.lower() == name:
            return h.raw_value.decode(errors="replace") if h.raw_value else str(h.value)
    return ""


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _parse_request(data: bytes) -> ep.ProcessingRequest | None:
    """A message, or None when it does not parse (the stream then ends, counted)."""
    try:
        return ep.ProcessingRequest.FromString(data)
    except DecodeError:
        return None


def add_to_server(server: grpc.aio.Server, picker: Picker) -> None:
    """Serves `picker` as envoy.service.ext_proc.v3.ExternalProcessor, with a parser that
    turns a malformed message into a counted end of stream instead of a traceback."""
    serialize: Callable[[ep.ProcessingResponse], bytes] = ep.ProcessingResponse.SerializeToString
    handler = grpc.stream_stream_rpc_method_handler(
        picker.Process, request_deserializer=_parse_request, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        _SERVICE, {"Process": handler}),))


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The gRPC health checks the protocol asks of a picker: `liveness` (the process answers),
    `readiness` and the ext_proc service itself (it has a view of the replicas)."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Any) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service == "liveness":
            return status(status=status.SERVING)
        if request.service in ("", "readiness", _SERVICE):
            return status(status=status.SERVING if self._ready() else status.NOT_SERVING)
        await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        raise AssertionError("abort returns only by raising")


def add_health(server: grpc.aio.Server, ready: Callable[[], bool]) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(Health(ready), server)


def new_server(limits: ServerLimits | None = None) -> grpc.aio.Server:
    return grpc.aio.server(options=(limits or ServerLimits()).options())
