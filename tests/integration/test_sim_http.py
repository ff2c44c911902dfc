"""Simulated vLLM servers over real HTTP: the openai client, metrics, queue bounds, ranks.

Servers run in the test's event loop on free ports, twenty times faster than real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from xds_server.metrics import Metrics
from xds_server.model import Replica
from xds_server.sim.engine import EngineSettings
from xds_server.sim.host import HostSettings, SimHost
from xds_server.sim.server import ServerSettings
from xds_server.sources.scrape import Scraper

MODEL = "Qwen/Qwen3-0.6B"
TIME_SCALE = 0.05

# Tests that watch a queue form need requests that outlast their own submission.
SLOW_STEPS = {"step_base_s": 0.05}

StartSim = Callable[..., Awaitable[SimHost]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulated servers in this loop; `engine` and `server` override settings."""
    started: list[tuple[SimHost, list[asyncio.Task[None]]]] = []

    async def start(*, replicas: int = 1, engine: dict[str, Any] | None = None,
                    **server: Any) -> SimHost:
        settings = HostSettings(
            server=ServerSettings(port=0, **server),
            engine=dataclasses.replace(EngineSettings(), **(engine or {})),
            replicas=replicas,
            time_scale=TIME_SCALE,
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


def base_url(host: SimHost, index: int = 0) -> str:
    return f"http://{host.servers[index].address}"


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """{(sample name, engine[/finished_reason]): value} from a /metrics page."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.labels.get("engine", "")
            if "finished_reason" in sample.labels:
                key += "/" + sample.labels["finished_reason"]
            if sample.name.endswith("_bucket"):
                continue
            assert sample.labels.get("model_name") == MODEL, sample
            samples[(sample.name, key)] = sample.value
    return samples


async def wait_for_state(
    session: aiohttp.ClientSession, url: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll /sim/state until `predicate` holds (the test fails by timeout otherwise)."""
    async with asyncio.timeout(10):
        while True:
            async with session.get(f"{url}/sim/state") as response:
                state: dict[str, Any] = await response.json()
            if predicate(state):
                return state
            await asyncio.sleep(0.005)


async def complete(session: aiohttp.ClientSession, url: str, *, prompt: Any = "hello",
                   max_tokens: int = 8, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_openai_client_completions_and_chat(start_sim: StartSim) -> None:
    host = await start_sim()
    address = host.servers[0].address
    async with openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="sim",
                                  max_retries=0) as client:
        models = await client.models.list()
        assert [model.id for model in models.data] == [MODEL]

        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt="x" * 40, max_tokens=5)
        completion = raw.parse()
        assert raw.headers["x-hybridlb-replica"] == address
        assert raw.headers["x-hybridlb-rank"] == "0"
        assert completion.id.startswith("cmpl-")
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 5)
        assert len(completion.choices[0].text) == 5 * 4

        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=200)
        # no ignore_eos: the simulated model "meets EOS" after --output-tokens (128)
        assert chat.choices[0].finish_reason == "stop"
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage is not None and chat.usage.completion_tokens == 128


async def test_openai_client_streams_tokens_and_usage(start_sim: StartSim) -> None:
    host = await start_sim()
    async with openai.AsyncOpenAI(base_url=f"{base_url(host)}/v1", api_key="sim",
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
            stream=True, stream_options={"include_usage": True})
        contents: list[str] = []
        finish_reasons: list[str | None] = []
        usage = None
        roles = []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                roles.append(choice.delta.role)
                contents.append(choice.delta.content or "")
                finish_reasons.append(choice.finish_reason)
        assert roles[0] == "assistant"
        assert len("".join(contents)) == 6 * 4
        assert finish_reasons[-1] == "length" and finish_reasons[:-1] == [None] * (
            len(finish_reasons) - 1)
        assert usage is not None and usage.completion_tokens == 6

        text_stream = await client.completions.create(
            model=MODEL, prompt="abc", max_tokens=4, stream=True)
        texts = [chunk.choices[0].text async for chunk in text_stream]
        assert "".join(texts) == " sim lab gpu dat"


async def test_bad_requests_are_refused_like_vllm(start_sim: StartSim) -> None:
    host = await start_sim(num_ranks=2)
    async with openai.AsyncOpenAI(base_url=f"{base_url(host)}/v1", api_key="sim",
                                  max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="out of range"):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                            extra_headers={"X-data-parallel-rank": "2"})
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=50_000)


async def test_metrics_follow_the_queue(start_sim: StartSim) -> None:
    host = await start_sim(engine={"max_num_seqs": 1, **SLOW_STEPS}, start_rank=4)
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, url)
        assert before[("vllm:num_requests_running", "4")] == 0
        assert before[("vllm:request_success_total", "4/length")] == 0
        requests = [asyncio.create_task(complete(session, url, prompt=[1] * 16, max_tokens=60))
                    for _ in range(3)]
        await wait_for_state(session, url, lambda s: s["ranks"][0]["waiting"] == 2)
        busy = await metrics(session, url)
        assert busy[("vllm:num_requests_running", "4")] == 1
        assert busy[("vllm:num_requests_waiting", "4")] == 2
        assert busy[("vllm:kv_cache_usage_perc", "4")] > 0
        results = await asyncio.gather(*requests)
        assert [status for status, _, _ in results] == [200] * 3
        after = await metrics(session, url)
    assert after[("vllm:num_requests_running", "4")] == 0
    assert after[("vllm:num_requests_waiting", "4")] == 0
    assert after[("vllm:kv_cache_usage_perc", "4")] == 0
    assert after[("vllm:request_success_total", "4/length")] == 3
    assert after[("vllm:prompt_tokens_total", "4")] == 3 * 16
    assert after[("vllm:generation_tokens_total", "4")] == 3 * 60
    assert after[("vllm:time_to_first_token_seconds_count", "4")] == 3
    assert after[("vllm:e2e_request_latency_seconds_count", "4")] == 3
    # with one slot, the later requests queued behind the first
    assert after[("vllm:request_queue_time_seconds_sum", "4")] > 0


@pytest.mark.parametrize("max_num_seqs", [1, 3])
async def test_max_num_seqs_bounds_concurrency(start_sim: StartSim, max_num_seqs: int) -> None:
    host = await start_sim(engine={"max_num_seqs": max_num_seqs, **SLOW_STEPS})
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(complete(session, url, max_tokens=100))
                    for _ in range(6)]
        state = await wait_for_state(
            session, url, lambda s: s["ranks"][0]["running"] + s["ranks"][0]["waiting"] == 6)
        assert state["ranks"][0]["running"] == max_num_seqs
        assert state["ranks"][0]["waiting"] == 6 - max_num_seqs
        assert [status for status, _, _ in await asyncio.gather(*requests)] == [200] * 6


async def test_kv_cache_budget_bounds_concurrency(start_sim: StartSim) -> None:
    # 256 tokens of KV = 16 blocks; each request holds 7-8 blocks (100 prompt + 20 output).
    host = await start_sim(engine={"kv_cache_tokens": 256, "step_base_s": 0.2})
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(complete(session, url, prompt=[7] * 100, max_tokens=20))
                    for _ in range(4)]
        state = await wait_for_state(
            session, url, lambda s: s["ranks"][0]["running"] + s["ranks"][0]["waiting"] == 4)
        assert (state["ranks"][0]["running"], state["ranks"][0]["waiting"]) == (2, 2)
        assert state["ranks"][0]["kv_cache_usage"] > 0.8
        assert [status for status, _, _ in await asyncio.gather(*requests)] == [200] * 4


async def test_rank_header_pins_the_local_rank(start_sim: StartSim) -> None:
    host = await start_sim(num_ranks=3, start_rank=6)
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*[
            complete(session, url, headers={"X-data-parallel-rank": "2"}) for _ in range(5)])
        assert {headers["x-hybridlb-rank"] for _, _, headers in results} == {"8"}
        samples = await metrics(session, url)
    assert samples[("vllm:request_success_total", "8/length")] == 5
    assert samples[("vllm:request_success_total", "6/length")] == 0


async def test_unpinned_requests_spread_over_ranks(start_sim: StartSim) -> None:
    host = await start_sim(num_ranks=3)
    url = base_url(host)
    served: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            status, _, headers = await complete(session, url, max_tokens=2)
            assert status == 200
            served.append(headers["x-hybridlb-rank"])
    assert sorted(served) == ["0", "0", "1", "1", "2", "2"]


async def test_replicas_number_their_ranks_globally(start_sim: StartSim) -> None:
    host = await start_sim(replicas=2, num_ranks=2, start_rank=10)
    async with aiohttp.ClientSession() as session:
        for index, expected in ((0, {"10", "11"}), (1, {"12", "13"})):
            samples = await metrics(session, base_url(host, index))
            engines = {key for name, key in samples if name == "vllm:num_requests_running"}
            assert engines == expected
            async with session.get(f"{base_url(host, index)}/health") as response:
                assert response.status == 200
                assert await response.read() == b""
                assert response.headers["x-hybridlb-replica"] == host.servers[index].address


async def test_client_disconnect_aborts_the_request(start_sim: StartSim) -> None:
    host = await start_sim(engine=SLOW_STEPS)
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(complete(session, url, max_tokens=1000))
        await wait_for_state(session, url, lambda s: s["ranks"][0]["running"] == 1)
        request.cancel()
        state = await wait_for_state(session, url, lambda s: s["in_flight"] == 0)
        assert state["ranks"][0]["running"] == 0
        assert state["ranks"][0]["kv_cache_usage"] == 0
        samples = await metrics(session, url)
    assert samples[("vllm:request_success_total", "0/abort")] == 1
    assert samples[("vllm:request_success_total", "0/length")] == 0


def parse_orca(value: str) -> dict[str, float]:
    """An `endpoint-load-metrics` value in vLLM's TEXT or JSON shape, as Envoy reads it."""
    kind, _, payload = value.partition(" ")
    if kind == "JSON":
        doc = json.loads(payload)
        assert set(doc) == {"named_metrics"}
        return {k: float(v) for k, v in doc["named_metrics"].items()}
    assert kind == "TEXT"
    pairs = [item.split("=") for item in payload.split(", ")]
    assert all(k.startswith("named_metrics.") for k, _ in pairs)
    return {k.removeprefix("named_metrics."): float(v) for k, v in pairs}


@pytest.mark.parametrize("requested", ["TEXT", "JSON", "text"])
async def test_non_streamed_responses_carry_vllm_orca_reports(
    start_sim: StartSim, requested: str
) -> None:
    host = await start_sim(engine={"max_num_seqs": 1, **SLOW_STEPS})
    url = base_url(host)
    asked = {"endpoint-load-metrics-format": requested}
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(
            complete(session, url, prompt=[1] * 16, max_tokens=30, headers=asked)
            for _ in range(3)))
        reports = [parse_orca(headers["endpoint-load-metrics"]) for _, _, headers in results]
        assert all(set(r) == {"num_requests_waiting", "kv_cache_usage_perc"} for r in reports)
        # one slot, three requests: the first to finish saw the others queued behind it
        assert max(r["num_requests_waiting"] for r in reports) >= 1
        assert all(0 < r["kv_cache_usage_perc"] <= 1 for r in reports[:2])


async def test_orca_reports_only_when_asked_and_never_on_streams(start_sim: StartSim) -> None:
    host = await start_sim()
    url = base_url(host)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        _, _, plain = await complete(session, url)
        _, _, unknown = await complete(session, url, headers={
            "endpoint-load-metrics-format": "PROTO"})
        async with session.post(f"{url}/v1/completions", json=body, headers={
                "endpoint-load-metrics-format": "TEXT"}) as response:
            await response.read()
            streamed = dict(response.headers)
    for headers in (plain, unknown, streamed):
        assert "endpoint-load-metrics" not in {k.lower() for k in headers}


async def test_a_request_from_another_node_pays_the_hop(start_sim: StartSim) -> None:
    # An hour's hop (simulated): a cross-node request cannot finish while the test runs.
    host = await start_sim(node="node-a", hop_s=3600.0)
    url = base_url(host)
    async with aiohttp.ClientSession() as session:
        remote = asyncio.create_task(complete(
            session, url, headers={"x-hybridlb-origin-node": "node-b"}))
        await wait_for_state(session, url, lambda s: s["cross_node_requests"] == 1)
        status, _, _ = await complete(session, url,
                                      headers={"x-hybridlb-origin-node": "node-a"})
        assert status == 200
        # the local request came and went while the remote one still crosses
        assert not remote.done()
        remote.cancel()
        state = await wait_for_state(session, url, lambda s: s["in_flight"] == 0)
    assert state["cross_node_requests"] == 1


async def test_a_hybrid_server_counts_output_tokens_per_engine_and_the_scrape_times_them(
    start_sim: StartSim,
) -> None:
    host = await start_sim(num_ranks=2, start_rank=4, engine=SLOW_STEPS)
    url = base_url(host)
    address, port = host.servers[0].address.rsplit(":", 1)
    replica = Replica(address, int(port), "node-a", capacity=2, dp_rank=4)
    scraper = Scraper(metrics=Metrics())
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(complete(session, url, max_tokens=400,
                                                 headers={"X-data-parallel-rank": str(rank)}))
                    for rank in (0, 1)]
        try:
            await wait_for_state(session, url, lambda s: all(
                r["running"] == 1 for r in s["ranks"]))
            first = (await scraper.scrape([replica]))[replica.address]
            before = await metrics(session, url)
            # Each engine's own counter moves: both ranks decode.
            async with asyncio.timeout(10):
                while True:
                    now = await metrics(session, url)
                    if all(now[("vllm:generation_tokens_total", e)]
                           > before[("vllm:generation_tokens_total", e)] for e in ("4", "5")):
                        break
                    await asyncio.sleep(0.005)
            second = (await scraper.scrape([replica]))[replica.address]
        finally:
            await scraper.close()
            await asyncio.gather(*requests)
    assert first.decode_speed is None
    assert second.decode_speed is not None and second.decode_speed > 0
    assert [r.engine for r in second.ranks] == ["4", "5"]
