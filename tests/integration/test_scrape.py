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
BODY = web.AppKey("body", list[str])


def errors(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "hybridlb_load_errors_total", {"source": "scrape", "reason": reason})
    return value or 0.0


def large_body(engines: int = 8) -> bytes:
    """What a hybrid-mode vLLM with `engines` ranks writes: histograms first (hundreds of
    KB), the load gauges at the very end."""
    lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for engine in range(engines):
        for i in range(400):
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="{engine}",'
                         f'le="{i / 10}",model_name="Qwen/Qwen3-0.6B"}} {i}')
    for engine in range(engines):
        lines.append(f'vllm:num_requests_running{{engine="{engine}"}} {engine}')
        lines.append(f'vllm:num_requests_waiting{{engine="{engine}"}} 1')
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
async def chunked() -> AsyncIterator[Replica]:
    """A /metrics sent in small chunks, paced, so that the client's buffer never holds it
    all at once."""
    body = large_body()

    async def metrics(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start:start + 4096])
            await asyncio.sleep(0)  # let each chunk go out on its own
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Replica("127.0.0.1", runner.addresses[0][1], "n", capacity=8, origin="chunked")
    await runner.cleanup()


async def test_every_engine_of_a_large_chunked_metrics_body_is_read(chunked: Replica) -> None:
    assert len(large_body()) > 240 * 1024
    metrics = Metrics()
    scraper = Scraper(metrics=metrics, timeout_s=5.0)
    try:
        loads = await scraper.scrape([chunked])
    finally:
        await scraper.close()
    load = loads[chunked.address]
    assert len(load.ranks) == 8
    assert (load.running, load.waiting) == (sum(range(8)), 8)


async def test_a_body_over_the_cap_is_an_error_and_counted(
    chunked: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    scraper = Scraper(metrics=metrics, timeout_s=5.0, max_body_bytes=100_000)
    try:
        assert await scraper.scrape([chunked]) == {}
    finally:
        await scraper.close()
    assert errors(metrics, "too_large") == 1
    assert any("over the 100000 byte limit" in r.getMessage() for r in caplog.records)


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
        assert errors(metrics, reason) == 2 * count, reason
    # One warning per failing replica, not one per scrape.
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 6
    assert any("timed out" in r.getMessage() for r in warnings)


async def test_failures_of_replicas_that_are_gone_are_forgotten(
    servers: dict[str, Replica], caplog: pytest.LogCaptureFixture
) -> None:
    scraper = Scraper(metrics=Metrics(), timeout_s=0.3)
    try:
        await scraper.scrape([servers["500"]])
        scraper.forget([servers["good"].address])
        # Had its failure been kept, the same failure would not be logged again.
        caplog.clear()
        await scraper.scrape([servers["500"]])
    finally:
        await scraper.close()
    assert [r.getMessage() for r in caplog.records if "http 500" in r.getMessage()]


def counted(tokens: int, running: int) -> str:
    """Two engines, as vLLM writes them: their running requests and output tokens so far."""
    return "".join(
        f'vllm:num_requests_running{{engine="{e}"}} {running // 2}\n'
        f'vllm:num_requests_waiting{{engine="{e}"}} 0\n'
        f'vllm:generation_tokens_total{{engine="{e}"}} {tokens // 2}\n' for e in (0, 1))


@pytest.fixture
async def counting() -> AsyncIterator[tuple[Replica, list[str]]]:
    """A replica whose /metrics is whatever the test last put in the list."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=request.app[BODY][-1])

    app = web.Application()
    app[BODY] = []
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Replica("127.0.0.1", runner.addresses[0][1], "n", capacity=2), app[BODY]
    await runner.cleanup()


async def test_the_decode_speed_is_timed_over_the_recent_readings_of_the_token_counter(
    counting: tuple[Replica, list[str]],
) -> None:
    replica, body = counting
    scraper = Scraper(metrics=Metrics(), timeout_s=5.0)

    async def speed(text: str) -> float | None:
        body.append(text)
        return (await scraper.scrape([replica]))[replica.address].decode_speed

    try:
        assert await speed(counted(1000, running=4)) is None  # nothing to time it against
        sped = await speed(counted(3000, running=4))
        assert sped is not None and sped > 0
        assert await speed(counted(20, running=4)) is None  # vLLM restarted: no speed yet
        assert await speed(counted(20, running=4)) == 0.0  # 4 running, no token since
        assert await speed(counted(20, running=0)) == 0.0  # 8/3 running on average, no token
        assert await speed(counted(10, running=0)) is None  # restarted again
        assert await speed(counted(10, running=0)) is None  # idle: nothing decodes
        scraper.forget([])
        assert await speed(counted(2000, running=4)) is None  # forgotten: a first reading
    finally:
        await scraper.close()
