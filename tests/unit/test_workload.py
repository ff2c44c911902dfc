"""The workload generator: the schedule is a pure function of seed and parameters; the
replayer records what each request met (against a small in-process SSE server)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from xds_server.sim.tokens import count_prompt_tokens
from xds_server.workload import (
    Arrival,
    Burst,
    Entry,
    LengthMix,
    Replayer,
    percentile,
    prompt_text,
    schedule,
)

ENTRIES = [Entry("a", 3.0), Entry("b", 1.0)]


def plan(**overrides: object) -> list[Arrival]:
    args: dict[str, object] = {"seed": 7, "rate_rps": 20.0, "duration_s": 100.0,
                               "entries": ENTRIES}
    args.update(overrides)
    return schedule(**args)  # type: ignore[arg-type]


def test_same_seed_same_schedule_other_seed_another() -> None:
    assert plan() == plan()
    assert plan() != plan(seed=8)


def test_arrivals_are_ordered_indexed_and_inside_the_run() -> None:
    arrivals = plan()
    assert [a.index for a in arrivals] == list(range(len(arrivals)))
    times = [a.at_s for a in arrivals]
    assert times == sorted(times)
    assert times[0] > 0 and times[-1] < 100.0


def test_poisson_rate_and_exponential_gaps() -> None:
    arrivals = plan(rate_rps=20.0, duration_s=500.0)
    # 10,000 expected: Poisson's standard deviation is 100.
    assert 9_600 < len(arrivals) < 10_400
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(arrivals)]
    # Exponential gaps: the standard deviation equals the mean (a fixed rate would give 0).
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)


def test_entries_get_their_shares() -> None:
    counts = Counter(a.entry for a in plan(duration_s=500.0))
    assert counts["a"] / counts["b"] == pytest.approx(3.0, rel=0.1)


def test_lengths_follow_the_lognormal_mix_and_stay_clipped() -> None:
    mix = LengthMix(prompt_median=200, prompt_sigma=1.0, prompt_min=10, prompt_max=2000,
                    output_median=50, output_sigma=0.5, output_min=5, output_max=400)
    arrivals = plan(duration_s=500.0, lengths=mix)
    prompts = [a.prompt_tokens for a in arrivals]
    outputs = [a.output_tokens for a in arrivals]
    assert statistics.median(prompts) == pytest.approx(200, rel=0.1)
    assert statistics.median(outputs) == pytest.approx(50, rel=0.1)
    assert min(prompts) >= 10 and max(prompts) <= 2000
    assert min(outputs) >= 5 and max(outputs) <= 400
    # sigma 1: the tail reaches the clip; the mean sits well above the median.
    assert max(prompts) == 2000
    assert statistics.mean(prompts) > 1.3 * statistics.median(prompts)


def test_default_mix_is_sharegpt_like() -> None:
    arrivals = plan(duration_s=500.0)
    assert statistics.mean(a.prompt_tokens for a in arrivals) == pytest.approx(215, rel=0.1)
    assert statistics.mean(a.output_tokens for a in arrivals) == pytest.approx(190, rel=0.1)


def test_burst_adds_arrivals_through_its_entry_and_leaves_the_base_alone() -> None:
    base = plan()
    burst = Burst(start_s=40.0, duration_s=10.0, rate_rps=30.0, entry="b")
    both = plan(bursts=[burst])
    extra = [a for a in both if a.burst]
    assert {a.entry for a in extra} == {"b"}
    assert all(40.0 <= a.at_s < 50.0 for a in extra)
    assert 200 < len(extra) < 400  # 300 expected
    # The base process draws from its own stream: the same requests at the same times.
    strip = [(a.at_s, a.entry, a.prompt_tokens, a.output_tokens) for a in both if not a.burst]
    assert strip == [(a.at_s, a.entry, a.prompt_tokens, a.output_tokens) for a in base]


def test_burst_without_entry_is_spread_like_the_base_load() -> None:
    both = plan(bursts=[Burst(start_s=0.0, duration_s=100.0, rate_rps=40.0)])
    counts = Counter(a.entry for a in both if a.burst)
    assert counts["a"] / counts["b"] == pytest.approx(3.0, rel=0.15)


def test_burst_is_cut_at_the_end_of_the_run() -> None:
    both = plan(bursts=[Burst(start_s=90.0, duration_s=50.0, rate_rps=50.0, entry="a")])
    assert max(a.at_s for a in both) < 100.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_rps": -1.0},
        {"entries": []},
        {"entries": [Entry("a", 0.0)]},
        {"bursts": [Burst(start_s=1.0, duration_s=1.0, rate_rps=1.0, entry="nope")]},
    ],
)
def test_bad_parameters_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        plan(**overrides)


def test_lengths_refuse_an_empty_range() -> None:
    with pytest.raises(ValueError):
        LengthMix(output_min=10, output_max=5)


@pytest.mark.parametrize("tokens", [1, 4, 5, 130, 4096])
def test_prompt_text_has_the_planned_tokens_by_the_simulators_rule(tokens: int) -> None:
    assert count_prompt_tokens(prompt_text(tokens)) == tokens


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


# -- the replayer, against a small server that streams like the simulator ------------------


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["max_tokens"] == 13:
        return web.json_response({"error": "boom"}, status=500,
                                 headers={"x-hybridlb-replica": "10.0.0.2:8000"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-hybridlb-replica": "10.0.0.1:8000",
                                           "x-hybridlb-rank": "3"})
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"text": " sim"}]}\n\n')
    await response.write(b'data: {"choices": [{"text": " lab"}]}\n\n')
    if body["max_tokens"] != 14:  # 14: the stream breaks off without [DONE]
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def arrival(index: int, output_tokens: int, at_s: float = 0.0, entry: str = "a") -> Arrival:
    return Arrival(index=index, at_s=at_s, entry=entry, prompt_tokens=8,
                   output_tokens=output_tokens)


async def test_replayer_records_ttft_e2e_replica_rank_and_failures(server: str) -> None:
    seen: list[int] = []
    replayer = Replayer(urls={"a": server, "b": server}, model="m",
                        on_result=lambda r: seen.append(r.arrival.index))
    arrivals = [arrival(0, 10), arrival(1, 13, 0.01, "b"), arrival(2, 14, 0.02)]
    async with aiohttp.ClientSession() as session:
        await replayer.run(arrivals, session)
        assert await replayer.drain(10.0)
    by_index = {r.arrival.index: r for r in replayer.results}
    assert sorted(seen) == [0, 1, 2]
    assert replayer.sent == 3 and replayer.in_flight == 0
    assert replayer.sent_by_entry == Counter({"a": 2, "b": 1})
    good = by_index[0]
    assert good.ok and good.status == 200
    assert (good.replica, good.rank) == ("10.0.0.1:8000", 3)
    assert good.ttft_s is not None and good.e2e_s is not None
    assert good.e2e_s >= good.ttft_s
    failed = by_index[1]
    assert not failed.ok and failed.status == 500 and "boom" in failed.error
    assert failed.replica == "10.0.0.2:8000"
    cut = by_index[2]
    assert not cut.ok and "[DONE]" in cut.error


class FirstEventSeen(aiohttp.ClientResponse):
    """A response that sets `seen` once the client has read a stream's first event, the
    moment the replayer takes TTFT at: lets a test act between that and the stream's end."""

    seen = asyncio.Event()

    async def start(self, connection: aiohttp.connector.Connection) -> FirstEventSeen:
        await super().start(connection)
        self.content = _Watched(self.content)  # type: ignore[assignment]
        return self


class _Watched:
    def __init__(self, reader: aiohttp.StreamReader) -> None:
        self._reader = reader

    async def readline(self) -> bytes:
        line = await self._reader.readline()
        if line.startswith(b"data:"):
            FirstEventSeen.seen.set()
        return line

    def __getattr__(self, name: str) -> object:
        return getattr(self._reader, name)


async def test_replayer_takes_ttft_at_the_first_event_not_at_the_end() -> None:
    """The stream sends one event and never ends: TTFT is known all the same."""

    async def first_event_only(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": " sim"}]}\n\n')
        await asyncio.Event().wait()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", first_event_only)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    FirstEventSeen.seen = asyncio.Event()
    try:
        replayer = Replayer(urls={"a": url}, model="m")
        async with aiohttp.ClientSession(response_class=FirstEventSeen) as session:
            await replayer.run([arrival(0, 10)], session)
            async with asyncio.timeout(10):
                await FirstEventSeen.seen.wait()
            await replayer.cancel()
        [result] = replayer.results
        assert result.error == "cancelled" and result.ttft_s is not None
    finally:
        await runner.cleanup()


async def test_replayer_stops_sending_when_told(server: str) -> None:
    replayer = Replayer(urls={"a": server}, model="m")
    stop = asyncio.Event()
    stop.set()
    async with aiohttp.ClientSession() as session:
        await replayer.run([arrival(0, 10, 5.0)], session, stop)
    assert replayer.sent == 0


async def test_replayer_cancel_records_cancelled_requests() -> None:
    hold = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await hold.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/v1/completions", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        replayer = Replayer(urls={"a": url}, model="m")
        async with aiohttp.ClientSession() as session:
            await replayer.run([arrival(0, 10)], session)
            assert not await replayer.drain(0.2)
            await replayer.cancel()
        assert [r.error for r in replayer.results] == ["cancelled"]
        assert replayer.in_flight == 0
    finally:
        hold.set()
        await runner.cleanup()


async def test_replayer_refuses_an_entry_without_url() -> None:
    replayer = Replayer(urls={"a": "http://127.0.0.1:1"}, model="m")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match="no URL"):
            await replayer.run([arrival(0, 10, entry="zz")], session)
