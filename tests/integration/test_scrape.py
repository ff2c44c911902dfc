"""The direct scrape against real HTTP servers, good and broken, side by side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from xds_server.metrics import Metrics
from xds_server.model import Replica
from xds_server.sources.scrape import Scraper

GOOD = "vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_waiting{engine=\"0\"} 1\n"
BODIES = {
    "good": GOOD,
    "nan": "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n",
    "negative": "vllm:num_requests_running -3\nvllm:num_requests_waiting 0\n",
    "missing": "process_cpu_seconds_total 1\n",
    "html": "<html><body>oops</body></html>",
}


KIND = web.AppKey("kind", str)


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, Replica]]:
    async def metrics(request: web.Request) -> web.Response:
        kind = request.app[KIND]
        if kind == "hang":
            await asyncio.sleep(30)
        if kind == "500":
            return web.Response(status=500, text="boom")
        return web.Response(text=BODIES[kind])

    runners, replicas = [], {}
    for kind in [*BODIES, "hang", "500"]:
        app = web.Application()
        app[KIND] = kind
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        replicas[kind] = Replica("127.0.0.1", port, "n", origin=kind)
        runners.append(runner)
    yield replicas
    for runner in runners:
        await runner.cleanup()


async def test_each_bad_replica_fails_alone_and_is_counted(
    servers: dict[str, Replica], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    scraper = Scraper(metrics=metrics, timeout_s=0.3)
    try:
        loads = await scraper.scrape(servers.values())
        again = await scraper.scrape(servers.values())
    finally:
        await scraper.close()
    assert set(loads) == {servers["good"].address}
    assert (loads[servers["good"].address].running, loads[servers["good"].address].waiting) == \
        (2.0, 1.0)
    assert set(again) == set(loads)
    for reason, count in {"parse": 4, "timeout": 1, "http": 1}.items():
        assert metrics.registry.get_sample_value(
            "hybridlb_load_errors_total", {"source": "scrape", "reason": reason}) == 2 * count, \
            reason
    # One warning per failing replica, not one per scrape.
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 6
    assert any("timed out" in r.getMessage() for r in warnings)
