"""Envoy's External Processing service: protocol glue around `pick`.

Per request Envoy sends the headers, then the buffered body; the answer to the body names
the picked replica the way the Gateway API Inference Extension's endpoint picker does: the
`x-gateway-destination-endpoint` header and the same key in `envoy.lb` dynamic metadata, so
an Envoy configured for either works with this one. Anything the picker cannot use (no body,
not JSON, too large, no model, no pool) is answered with "continue": the request
then goes by the weights, and a counter says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from xds_server.extproc.pick import PickSettings, Unreadable, pick, read_request
from xds_server.extproc.state import PickerState, PrefixOwners
from xds_server.logsafe import clip
from xds_server.metrics import Metrics
from xds_server.xds.resources import DESTINATION_HEADER, LB_NS, PICKER_NODE_METADATA

log = logging.getLogger(__name__)



class Picker(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self, *, state: PickerState, metrics: Metrics, settings: PickSettings,
        model_header: str = "x-model",
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._settings = settings
        self._model_header = model_header
        self._prefixes = PrefixOwners()

    async def Process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[ep.ProcessingResponse]:
        node = dict(context.invocation_metadata() or ()).get(PICKER_NODE_METADATA, "")
        content_type = ""
        asked_pool = ""
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                headers = request.request_headers.headers
                content_type = _header(headers, "content-type")
                asked_pool = _header(headers, self._model_header)
                if request.request_headers.end_of_stream:
                    self._count("no_body")
                yield ep.ProcessingResponse(
                    request_headers=ep.HeadersResponse(),
                    mode_override=self._body_mode(_header(headers, "content-length")),
                )
            elif kind == "request_body":
                yield self._on_body(request.request_body, content_type, asked_pool, node)
            else:
                # Only headers and body are asked for; answer anything else with "continue".
                yield _continue(kind)

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
            )
        return None

    def _on_body(
        self, body: ep.HttpBody, content_type: str, asked_pool: str, node: str
    ) -> ep.ProcessingResponse:
        started = time.perf_counter()
        passthrough = ep.ProcessingResponse(request_body=ep.BodyResponse())
        if not body.end_of_stream:
            # BUFFERED_PARTIAL hands over a body larger than Envoy's buffer in part.
            self._count("too_large")
            return passthrough
        try:
            info = read_request(body.body, content_type, self._settings)
        except Unreadable as exc:
            self._count(exc.reason)
            log.debug("passing a request through: %s (%s)", exc.reason, clip(str(exc)))
            return passthrough
        # The pool as the router would choose it: the header, else the model if a pool has
        # that name, else the first pool.
        pool = asked_pool or (info.model if self._state.candidates(info.model) is not None
                              else self._state.default_pool())
        candidates = self._state.candidates(pool) if pool else None
        if candidates is None:
            self._count("no_pool")
            return passthrough
        chosen = pick(candidates, prefix_owner=self._prefixes.get(info.prefix),
                      envoy_node=node, settings=self._settings)
        if chosen is None:
            self._count("no_candidate")
            return passthrough
        self._state.note_pick(chosen.address)
        self._prefixes.set(info.prefix, chosen.address)
        self._count("picked")
        self._metrics.extproc_seconds.observe(time.perf_counter() - started)
        metadata = struct_pb2.Struct()
        metadata.update({LB_NS: {DESTINATION_HEADER: chosen.address}})
        return ep.ProcessingResponse(
            request_body=ep.BodyResponse(
                response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(set_headers=[
                        _set(DESTINATION_HEADER, chosen.address),
                        _set(self._model_header, pool),
                    ]),
                    # The route was chosen before the body; the pool and pick change it.
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=metadata,
        )

    def _count(self, outcome: str) -> None:
        self._metrics.extproc_requests.labels(outcome).inc()


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


def _continue(kind: str | None) -> ep.ProcessingResponse:
    if kind == "response_headers":
        return ep.ProcessingResponse(response_headers=ep.HeadersResponse())
    if kind == "response_body":
        return ep.ProcessingResponse(response_body=ep.BodyResponse())
    if kind == "request_trailers":
        return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def add_to_server(server: grpc.aio.Server, picker: Picker) -> None:
    ep_grpc.add_ExternalProcessorServicer_to_server(picker, server)
