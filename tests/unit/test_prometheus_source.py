"""The Prometheus source's reading of query results, against a fake of Prometheus' HTTP query
API (the real Prometheus runs in tests/integration/test_prometheus.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from xds_server.metrics import Metrics
from xds_server.model import Replica
from xds_server.settings import PrometheusQueries
from xds_server.sources.prometheus import PrometheusReader

QUERIES = PrometheusQueries()
REPLICAS = [Replica(f"10.0.0.{i}", 8000, "node-a") for i in range(1, 6)]
SAMPLED_AT = 1_700_000_000.0
RESULTS = web.AppKey("results", dict[str, list[dict[str, Any]]])


def series(address: str, value: str, engine: str | None = None) -> dict[str, Any]:
    labels = {"instance": address} | ({"engine": engine} if engine is not None else {})
    return {"metric": labels, "value": [SAMPLED_AT + 1, value]}


def results(speeds: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every replica running 2 and waiting 0 on engine 0; decode speeds as Prometheus writes
    them (NaN and +Inf from an idle replica's zero denominator)."""
    addresses = [r.metrics_address for r in REPLICAS]
    return {
        QUERIES.running: [series(a, "2", "0") for a in addresses],
        QUERIES.waiting: [series(a, "0", "0") for a in addresses],
        QUERIES.kv_cache_usage: [],
        QUERIES.sampled_at: [series(a, str(SAMPLED_AT)) for a in addresses],
        QUERIES.decode_speed: [series(a, v) for a, v in speeds.items()],
    }


@pytest.fixture
async def prometheus() -> AsyncIterator[tuple[str, dict[str, list[dict[str, Any]]]]]:
    """Answers /api/v1/query with the vector the test put under that query."""
    async def query(request: web.Request) -> web.Response:
        result = request.app[RESULTS].get(request.query["query"])
        if result is None:
            return web.json_response({"status": "error", "errorType": "bad_data",
                                      "error": "unknown query"}, status=400)
        return web.json_response({"status": "success",
                                  "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app[RESULTS] = {}
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[RESULTS]
    await runner.cleanup()


async def test_each_replica_gets_its_decode_speed_and_nan_or_inf_reads_as_none(
    prometheus: tuple[str, dict[str, list[dict[str, Any]]]],
) -> None:
    url, answers = prometheus
    a, b, c, d, e = (r.metrics_address for r in REPLICAS)
    answers.update(results({a: "31.5", b: "NaN", c: "+Inf", d: "-2"}))
    reader = PrometheusReader(url=url, metrics=Metrics(), queries=QUERIES)
    loads = await reader.read(REPLICAS)
    assert {r.metrics_address: loads[r.address].decode_speed for r in REPLICAS} == {
        a: 31.5, b: None, c: None, d: None, e: None}
    assert all(load.running == 2 and load.read_at == SAMPLED_AT for load in loads.values())


async def test_an_empty_decode_speed_query_is_not_asked(
    prometheus: tuple[str, dict[str, list[dict[str, Any]]]],
) -> None:
    url, answers = prometheus
    answers.update(results({}))
    del answers[QUERIES.decode_speed]  # asked anyway, it would fail the whole read
    reader = PrometheusReader(url=url, metrics=Metrics(),
                              queries=PrometheusQueries(decode_speed=""))
    loads = await reader.read(REPLICAS)
    assert len(loads) == len(REPLICAS)
    assert all(load.decode_speed is None for load in loads.values())
