"""Each fault of a simulated server does what it says, set by flag or by POST /sim/fault."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from xds_server.sim.engine import EngineSettings
from xds_server.sim.faults import Faults
from xds_server.sim.host import HostSettings, SimHost
from xds_server.sim.server import ServerSettings

MODEL = "Qwen/Qwen3-0.6B"

StartSim = Callable[..., Awaitable[SimHost]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    started: list[tuple[SimHost, list[asyncio.Task[None]]]] = []

    async def start(*, replicas: int = 1, faults: Faults | None = None,
                    **server: Any) -> SimHost:
        settings = HostSettings(
            server=ServerSettings(port=0, seed=1, **server),
            engine=dataclasses.replace(EngineSettings()),
            faults=faults or Faults(),
            replicas=replicas,
            time_scale=0.05,
        )
        host = SimHost(settings)
        await host.start()
        tasks = [asyncio.create_task(loop) for s in host.servers for loop in s.engine_loops()]
        started.append((host, tasks))
        return host

    yield start
    for host, tasks in started:
        await host.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def url_of(host: SimHost, index: int = 0) -> str:
    return f"http://{host.servers[index].address}"


async def complete(session: aiohttp.ClientSession, url: str, *, max_tokens: int = 4
                   ) -> tuple[int, dict[str, str]]:
    body = {"model": MODEL, "prompt": [1] * 512, "max_tokens": max_tokens, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        await response.read()
        return response.status, dict(response.headers)


async def set_fault(session: aiohttp.ClientSession, url: str, **fault: Any) -> dict[str, Any]:
    async with session.post(f"{url}/sim/fault", json=fault) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def inference_time_sum(session: aiohttp.ClientSession, url: str) -> float:
    """Sum of vllm:request_inference_time_seconds: simulated, so exact from the model."""
    async with session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("vllm:request_inference_time_seconds_sum"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no inference time in /metrics")


async def test_slowdown_multiplies_step_times(start_sim: StartSim) -> None:
    # One token: a single prefill step, whose simulated length is exactly the model's.
    normal, slow = await start_sim(), await start_sim(faults=Faults(slowdown=3.0))
    async with aiohttp.ClientSession() as session:
        assert (await complete(session, url_of(normal), max_tokens=1))[0] == 200
        assert (await complete(session, url_of(slow), max_tokens=1))[0] == 200
        normal_s = await inference_time_sum(session, url_of(normal))
        slow_s = await inference_time_sum(session, url_of(slow))
        assert normal_s == pytest.approx(0.002 + 512 * 19e-6, rel=1e-6)
        assert slow_s == pytest.approx(3 * normal_s, rel=1e-6)
        # the admin endpoint sets it at run time too
        await set_fault(session, url_of(normal), slowdown=3.0)
        assert (await complete(session, url_of(normal), max_tokens=1))[0] == 200
        assert await inference_time_sum(session, url_of(normal)) == pytest.approx(
            normal_s + slow_s, rel=1e-6)


async def inference_time_by_engine(session: aiohttp.ClientSession, url: str
                                   ) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    sums = {}
    for line in text.splitlines():
        if line.startswith("vllm:request_inference_time_seconds_sum"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            sums[engine] = float(line.rsplit(" ", 1)[1])
    return sums


async def test_slow_rank_slows_that_rank_only(start_sim: StartSim) -> None:
    host = await start_sim(num_ranks=2)
    url = url_of(host)
    async with aiohttp.ClientSession() as session:
        await set_fault(session, url, slowdown=3.0, slow_rank=1)
        for rank in ("0", "1"):
            async with session.post(f"{url}/v1/completions", headers={
                    "X-data-parallel-rank": rank}, json={
                    "model": MODEL, "prompt": [1] * 512, "max_tokens": 1}) as response:
                assert response.status == 200, await response.text()
        sums = await inference_time_by_engine(session, url)
        assert sums["0"] == pytest.approx(0.002 + 512 * 19e-6, rel=1e-6)
        assert sums["1"] == pytest.approx(3 * sums["0"], rel=1e-6)
        async with session.get(f"{url}/sim/state") as response:
            assert [r["slowdown"] for r in (await response.json())["ranks"]] == [1.0, 3.0]
        async with session.post(f"{url}/sim/fault", json={"slow_rank": 2}) as response:
            assert response.status == 400


async def test_error_rate_fails_that_share_with_500(start_sim: StartSim) -> None:
    host = await start_sim(num_ranks=2)
    url = url_of(host)
    async with aiohttp.ClientSession() as session:
        await set_fault(session, url, error_rate=1.0)
        status, headers = await complete(session, url)
        assert status == 500
        assert headers["x-hybridlb-rank"] in {"0", "1"}
        await set_fault(session, url, error_rate=0.5)
        statuses = [(await complete(session, url, max_tokens=1))[0] for _ in range(40)]
        assert 0 < statuses.count(500) < 40
        assert set(statuses) == {200, 500}
        await set_fault(session, url, error_rate=0.0)
        assert (await complete(session, url))[0] == 200


async def test_hang_accepts_but_does_not_answer_until_cleared(start_sim: StartSim) -> None:
    host = await start_sim()
    url = url_of(host)
    server = host.servers[0]
    async with aiohttp.ClientSession() as session:
        await set_fault(session, url, hang=True)
        pending = asyncio.create_task(complete(session, url))
        health = asyncio.create_task(session.get(f"{url}/health"))
        async with asyncio.timeout(10):
            while server.in_flight == 0:
                await asyncio.sleep(0.005)
        # accepted, but the engine never saw it and nothing was answered
        assert server.runners[0].engine.num_running + server.runners[0].engine.num_waiting == 0
        assert server.runners[0].engine.counters.prompt_tokens == 0
        assert not pending.done() and not health.done()
        await set_fault(session, url, hang=False)
        assert (await pending)[0] == 200
        async with await health as response:
            assert response.status == 200


async def test_refuse_closes_the_listener_until_cleared(start_sim: StartSim) -> None:
    host = await start_sim(replicas=2)
    front, back = url_of(host, 0), url_of(host, 1)
    target = host.servers[1].address
    async with aiohttp.ClientSession() as session:
        reply = await set_fault(session, front, target=target, refuse=True)
        assert reply["replica"] == target and reply["faults"]["refuse"] is True
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                await complete(fresh, back)
        await set_fault(session, front, target=target, refuse=False)
        async with aiohttp.ClientSession() as fresh:
            assert (await complete(fresh, back))[0] == 200


async def test_refuse_flag_and_timed_clear(start_sim: StartSim) -> None:
    host = await start_sim(faults=Faults(error_rate=1.0))
    url = url_of(host)
    async with aiohttp.ClientSession() as session:
        assert (await complete(session, url))[0] == 500
        await set_fault(session, url, clear=True, refuse=True, duration_s=0.2)
        async with asyncio.timeout(10):
            while True:
                try:
                    async with aiohttp.ClientSession() as fresh:
                        status, _ = await complete(fresh, url)
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
        # after the duration, the faults from before the change are back
        assert status == 500


async def test_invalid_fault_is_refused(start_sim: StartSim) -> None:
    host = await start_sim()
    async with aiohttp.ClientSession() as session:
        for body in ({"slowdown": -1}, {"explode": True}, {"target": "10.0.0.1:1"}):
            async with session.post(f"{url_of(host)}/sim/fault", json=body) as response:
                assert response.status == 400
        async with session.get(f"{url_of(host)}/sim/state") as response:
            assert (await response.json())["faults"] == Faults().as_dict()
