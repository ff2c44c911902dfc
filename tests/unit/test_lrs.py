"""Load reports (LRS) into each Envoy's ingress: the translation, and the server over real
in-process gRPC (the real Envoy's side: tests/integration/test_lrs_envoy.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import duration_pb2, struct_pb2

from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica
from xds_server.state import State
from xds_server.xds.guard import AdsGuard
from xds_server.xds.lrs import SERVICE, LoadReportServer, read_report
from xds_server.xds.resources import pool_of_cluster

POOLS = {"qwen3", "Qwen/Qwen3-0.6B"}


@pytest.mark.parametrize(("cluster", "pool"), [
    ("qwen3", "qwen3"),
    ("qwen3/node/node-a", "qwen3"),
    ("qwen3/prefer/ip-10-0-1-5.ec2.internal", "qwen3"),
    ("qwen3/pinned", "qwen3"),
    ("qwen3/affinity", "qwen3"),
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("Qwen/Qwen3-0.6B/node/node-a", "Qwen/Qwen3-0.6B"),
    ("Qwen/Qwen3-0.6B/pinned", "Qwen/Qwen3-0.6B"),
    ("hybridlb_xds", None),
    ("hybridlb_admin", None),
    ("hybridlb_extproc", None),
    ("gone", None),  # a pool the control plane no longer serves
    ("gone/node/node-a", None),
    ("qwen3/node/", None),
    ("qwen3/other/node-a", None),
    ("Qwen", None),
])
def test_each_cluster_form_names_its_pool_and_other_clusters_none(
    cluster: str, pool: str | None
) -> None:
    assert pool_of_cluster(cluster, POOLS) == pool


def _stats(cluster: str, interval_s: float | None, *issued: int) -> load_report_pb2.ClusterStats:
    stats = load_report_pb2.ClusterStats(cluster_name=cluster, upstream_locality_stats=[
        load_report_pb2.UpstreamLocalityStats(total_issued_requests=n) for n in issued])
    if interval_s is not None:
        stats.load_report_interval.FromNanoseconds(int(interval_s * 1e9))
    return stats


def _report(*stats: load_report_pb2.ClusterStats) -> lrs_pb2.LoadStatsRequest:
    return lrs_pb2.LoadStatsRequest(cluster_stats=stats)


def test_a_pools_clusters_add_up_each_over_its_own_measured_interval() -> None:
    reading = read_report(_report(
        _stats("qwen3", 2.0, 6, 4),  # two localities: 10 in 2 s
        _stats("qwen3/prefer/node-a", 1.0),  # an aggregate: its requests show in its parts
        _stats("qwen3/node/node-a", 0.5, 3),
        _stats("qwen3/pinned", 1.0),
        _stats("hybridlb_xds", 1.0, 50),  # the control plane's own connection: not ingress
    ), POOLS)
    assert reading.rates == {"qwen3": pytest.approx(5.0 + 6.0)}
    assert reading.interval_s == 2.0
    assert reading.rejected == ()


def test_a_pool_reported_with_nothing_issued_reads_zero_and_no_pool_cluster_reads_none() -> None:
    assert read_report(_report(_stats("qwen3", 1.0)), POOLS).rates == {"qwen3": 0.0}
    empty = read_report(_report(_stats("hybridlb_xds", 1.0, 3)), POOLS)
    assert empty.rates == {}
    assert empty.interval_s is None


@pytest.mark.parametrize(("interval_s", "issued", "reason"), [
    (None, 5, "bad_interval"),  # absent
    (0.0, 5, "bad_interval"),
    (-1.0, 5, "bad_interval"),
    (1.0, 2**63, "implausible_rate"),
])
def test_a_bad_cluster_leaves_its_whole_pool_out_and_says_why(
    interval_s: float | None, issued: int, reason: str
) -> None:
    reading = read_report(_report(
        _stats("qwen3", 1.0, 4),
        _stats("qwen3/node/node-a", interval_s, issued),
        _stats("Qwen/Qwen3-0.6B", 1.0, 2),
    ), POOLS)
    assert reading.rates == {"Qwen/Qwen3-0.6B": 2.0}  # qwen3 in part would understate it
    assert reading.rejected == (reason,)


# --- the server --------------------------------------------------------------------------

@dataclass
class Plane:
    state: State
    metrics: Metrics
    target: str

    def rejected(self, reason: str) -> float:
        return float(self.metrics.lrs_rejected.labels(reason)._value.get())


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    state, metrics = State(), Metrics()
    state.set_pools("test", [Pool("qwen3", (Replica("10.0.0.1", 8000, "node-a"),))])
    lrs = LoadReportServer(state=state, metrics=metrics, interval_s=0.25)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdsGuard(
        lrs.handler(), metrics=metrics, max_streams=8, max_streams_per_peer=8,
        max_resource_names=3, node_san=None),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Plane(state, metrics, f"127.0.0.1:{port}")
    await server.stop(0)


def _node(name: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"hybridlb": {"node": name}})
    return base_pb2.Node(id=f"envoy-{name}", metadata=metadata)


class Stream:
    """One client stream: requests put in, responses read out."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._out: asyncio.Queue[lrs_pb2.LoadStatsRequest | None] = asyncio.Queue()
        self.call = channel.stream_stream(
            f"/{SERVICE}/StreamLoadStats",
            request_serializer=lrs_pb2.LoadStatsRequest.SerializeToString,
            response_deserializer=lrs_pb2.LoadStatsResponse.FromString)(self._requests())

    async def _requests(self) -> AsyncIterator[lrs_pb2.LoadStatsRequest]:
        while (request := await self._out.get()) is not None:
            yield request

    def send(self, request: lrs_pb2.LoadStatsRequest) -> None:
        self._out.put_nowait(request)

    def close(self) -> None:
        self._out.put_nowait(None)


async def _until(predicate: object) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_an_envoy_is_asked_for_every_cluster_and_its_reports_become_its_ingress(
    plane: Plane,
) -> None:
    async with grpc.aio.insecure_channel(plane.target) as channel:
        stream = Stream(channel)
        stream.send(lrs_pb2.LoadStatsRequest(node=_node("node-a")))
        response = await asyncio.wait_for(stream.call.read(), 10)
        assert response.send_all_clusters
        assert response.load_reporting_interval == duration_pb2.Duration(nanos=250_000_000)
        # set_node_on_first_message_only: later reports name no node; the stream's first did.
        # Measured over 60 s: current for minutes, so only the stream's end can drop it.
        stream.send(_report(_stats("qwen3/prefer/node-a", 60.0), _stats("qwen3", 60.0, 720)))
        await _until(lambda: plane.state.ingress(time.time()) != {})
        assert plane.state.ingress(time.time()) == {"qwen3": {"node-a": 12.0}}
        assert plane.metrics.lrs_reports._value.get() == 1
        stream.close()
        assert await asyncio.wait_for(stream.call.code(), 10) == grpc.StatusCode.OK
    await _until(lambda: plane.state.ingress(time.time()) == {})


async def test_a_stream_whose_first_message_names_no_envoy_ends_and_is_counted(
    plane: Plane,
) -> None:
    async with grpc.aio.insecure_channel(plane.target) as channel:
        stream = Stream(channel)
        stream.send(_report(_stats("qwen3", 1.0, 3)))
        code = await asyncio.wait_for(stream.call.code(), 10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert plane.rejected("no_node") == 1
    assert plane.state.ingress(0.0) == {}


async def test_the_guard_ends_a_report_with_more_clusters_than_a_request_may_name(
    plane: Plane,
) -> None:
    async with grpc.aio.insecure_channel(plane.target) as channel:
        stream = Stream(channel)
        stream.send(lrs_pb2.LoadStatsRequest(
            node=_node("node-a"), cluster_stats=[_stats(f"c{i}", 1.0) for i in range(4)]))
        code = await asyncio.wait_for(stream.call.code(), 10)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert float(plane.metrics.refused_streams.labels("too_many_names")._value.get()) == 1
