"""Envoy's Load Reporting Service (LRS): how many requests enter each Envoy, per pool.

Every Envoy the project bootstraps opens one `StreamLoadStats` stream to the control plane
(`cluster_manager.load_stats_config`) and sends its node first. The one answer asks for every
cluster it knows (`send_all_clusters`), every `--load-report-interval-s`. From then on each
report says, per cluster, the requests this Envoy issued upstream since its last report
(`total_issued_requests`, per locality that had any) and the interval it actually measured
(`load_report_interval`). A pool's clusters added up, over that interval, are the requests a
second that enter this Envoy for the pool: `State.set_ingress`, which the hybrid policy reads
to decide keep shares and locality weights from what arrives rather than from queues it
caused. Issued requests include Envoy's retries.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import duration_pb2

from xds_server.logsafe import LogLimiter, clip
from xds_server.metrics import Metrics
from xds_server.model import IngressReport, Pool
from xds_server.xds import resources
from xds_server.xds.server import pre_encoded, view_from_node

log = logging.getLogger(__name__)

SERVICE = "envoy.service.load_stats.v3.LoadReportingService"

#: More requests a second than this through one cluster is no Envoy's report (one Envoy
#: forwards tens of thousands at most): the report is left out rather than believed.
MAX_RATE = 1_000_000.0


class IngressSink(Protocol):
    """What the server reads and writes of the state."""

    @property
    def pools(self) -> tuple[Pool, ...]: ...

    def set_ingress(self, stream: str, report: IngressReport) -> None: ...

    def drop_ingress(self, stream: str) -> None: ...


@dataclass(frozen=True)
class Reading:
    """What one report says: requests a second per pool (a pool whose clusters were reported
    with nothing issued: 0), the longest interval measured among them (None: no pool cluster
    was reported), and one reason per cluster left out."""

    rates: dict[str, float]
    interval_s: float | None
    rejected: tuple[str, ...] = ()


def read_report(request: lrs_pb2.LoadStatsRequest, pools: Container[str]) -> Reading:
    """The rates in a report, for the pools in `pools`; other clusters (the bootstrap's
    static ones, the picker's, a departed pool's) are not ingress and are skipped. A pool
    with any cluster left out is left out whole: part of its clusters would understate it."""
    rates: dict[str, float] = {}
    bad_pools: set[str] = set()
    rejected: list[str] = []
    longest: float | None = None
    for stats in request.cluster_stats:
        pool = resources.pool_of_cluster(stats.cluster_name, pools)
        if pool is None:
            continue
        interval = stats.load_report_interval.ToNanoseconds() / 1e9  # absent: 0
        if not interval > 0:
            rejected.append("bad_interval")
            bad_pools.add(pool)
            continue
        issued = sum(locality.total_issued_requests
                     for locality in stats.upstream_locality_stats)
        rate = issued / interval
        if rate > MAX_RATE:
            rejected.append("implausible_rate")
            bad_pools.add(pool)
            continue
        rates[pool] = rates.get(pool, 0.0) + rate
        longest = interval if longest is None else max(longest, interval)
    for pool in bad_pools:
        rates.pop(pool, None)
    return Reading(rates=rates, interval_s=longest, rejected=tuple(rejected))


class LoadReportServer:
    """The LRS gRPC service: one stream per Envoy, its latest reading in the state."""

    def __init__(self, *, state: IngressSink, metrics: Metrics, interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._metrics = metrics
        self._interval_s = interval_s
        self._clock = clock
        self._logs = LogLimiter(metrics.log_suppressed)
        self._ids = itertools.count(1)
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(interval_s * 1e9))
        # The same answer for every Envoy: sent once per stream, serialized once.
        self._response = lrs_pb2.LoadStatsResponse(
            send_all_clusters=True, load_reporting_interval=interval
        ).SerializeToString()
        self._pools: tuple[Pool, ...] = ()
        self._names: frozenset[str] = frozenset()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamLoadStats": grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=lrs_pb2.LoadStatsRequest.FromString,
                response_serializer=pre_encoded,
            ),
        })

    async def stream(self, requests: AsyncIterator[lrs_pb2.LoadStatsRequest],
                     context: Any) -> AsyncIterator[bytes]:
        stream_id = f"lrs-{next(self._ids)}"
        node: str | None = None
        envoy = ""
        self._metrics.lrs_streams.inc()
        try:
            async for request in requests:
                if node is None:
                    if not request.HasField("node"):
                        self._reject("no_node", "load-report stream %s: the first message "
                                     "names no Envoy (node); ending it", stream_id)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "the first LoadStatsRequest must carry the node")
                    node = view_from_node(request.node, self._logs).node
                    envoy = clip(request.node.id)
                    self._logs.log(log, logging.INFO, "lrs_connect",
                                   "envoy %s (node %r) reports its load", envoy, clip(node))
                    yield self._response
                    if not request.cluster_stats:
                        continue  # Envoy's first message: it has measured nothing yet
                self._record(stream_id, node, envoy, request)
        finally:
            self._metrics.lrs_streams.dec()
            self._state.drop_ingress(stream_id)

    def _record(self, stream_id: str, node: str, envoy: str,
                request: lrs_pb2.LoadStatsRequest) -> None:
        self._metrics.lrs_reports.inc()
        reading = read_report(request, self._pool_names())
        for reason in reading.rejected:
            self._reject(reason, "envoy %s (node %r): a cluster's load report left out (%s)",
                         envoy, clip(node), reason)
        self._state.set_ingress(stream_id, IngressReport(
            node=node, rates=reading.rates, at=self._clock(),
            interval_s=reading.interval_s or self._interval_s,
        ))

    def _pool_names(self) -> frozenset[str]:
        pools = self._state.pools
        if pools is not self._pools:  # the state replaces the tuple when pools change
            self._pools, self._names = pools, frozenset(p.name for p in pools)
        return self._names

    def _reject(self, reason: str, msg: str, *args: object) -> None:
        self._metrics.lrs_rejected.labels(reason).inc()
        self._logs.log(log, logging.WARNING, f"lrs_{reason}", msg, *args)

