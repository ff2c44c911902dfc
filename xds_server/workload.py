"""Synthetic OpenAI-style traffic: who sends what, when, and what came back.

The demo and the routing benchmark must drive the same traffic, and a benchmark's policies
must see identical requests, so the plan is a pure function of a seed and parameters
(`schedule`), kept apart from the client that replays it (`Replayer`).

Lengths are ShareGPT-like: prompt and output token counts are drawn from lognormal
distributions, clipped. The defaults (`LengthMix`) give a prompt median of 130 tokens (mean
about 215) and an output median of 150 tokens (mean about 190), the shape and the means that
vLLM's ShareGPT benchmark reports for that data set with a Llama tokenizer; the tails are
long (a few prompts of thousands of tokens), which is what makes blind balancing hurt.

Arrivals are Poisson: exponential gaps at `rate_rps`, each request assigned to an entry
point (an Envoy) by its share. A burst is a second Poisson process on top, for a while,
through one entry point (a hot node) or spread like the base load. Each process draws from
its own random stream, so adding a burst leaves the base arrivals exactly as they were.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import aiohttp

from xds_server.xds.resources import PICKED_HEADER

#: Response headers the simulator (and nothing in a real vLLM) sets: who served a request.
REPLICA_HEADER = "x-hybridlb-replica"
RANK_HEADER = "x-hybridlb-rank"
#: Request header naming the node a request entered on, so the simulator can charge a
#: cross-node hop (xds_server.sim.server.ORIGIN_NODE_HEADER).
ORIGIN_NODE_HEADER = "x-hybridlb-origin-node"


@dataclass(frozen=True)
class LengthMix:
    """Lognormal prompt and output lengths in tokens: `median * exp(sigma * N(0, 1))`, clipped."""

    prompt_median: float = 130.0
    prompt_sigma: float = 1.0
    prompt_min: int = 4
    prompt_max: int = 4096
    output_median: float = 150.0
    output_sigma: float = 0.7
    output_min: int = 4
    output_max: int = 1024

    def __post_init__(self) -> None:
        if self.prompt_median <= 0 or self.output_median <= 0:
            raise ValueError("medians must be positive")
        if self.prompt_sigma < 0 or self.output_sigma < 0:
            raise ValueError("sigmas must not be negative")
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError("need 1 <= prompt_min <= prompt_max")
        if not 1 <= self.output_min <= self.output_max:
            raise ValueError("need 1 <= output_min <= output_max")

    def mean_prompt_tokens(self) -> float:
        """The unclipped mean; close enough to size a load against a capacity."""
        return self.prompt_median * math.exp(self.prompt_sigma**2 / 2)

    def mean_output_tokens(self) -> float:
        """The unclipped mean; close enough to size a load against a capacity."""
        return self.output_median * math.exp(self.output_sigma**2 / 2)

    def draw(self, rng: random.Random) -> tuple[int, int]:
        prompt = _clip(rng.lognormvariate(math.log(self.prompt_median), self.prompt_sigma),
                       self.prompt_min, self.prompt_max)
        output = _clip(rng.lognormvariate(math.log(self.output_median), self.output_sigma),
                       self.output_min, self.output_max)
        return prompt, output


def _clip(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


@dataclass(frozen=True)
class Entry:
    """An entry point of the traffic (an Envoy) and its share of the base load."""

    name: str
    share: float = 1.0


@dataclass(frozen=True)
class Burst:
    """Extra Poisson arrivals at `rate_rps` from `start_s` for `duration_s`.

    `entry` names the entry point they all go through; empty: spread like the base load.
    """

    start_s: float
    duration_s: float
    rate_rps: float
    entry: str = ""


@dataclass(frozen=True)
class Arrival:
    """One planned request: when (seconds from the start), through where, how long."""

    index: int
    at_s: float
    entry: str
    prompt_tokens: int
    output_tokens: int
    burst: bool = False


def schedule(
    *,
    seed: int,
    rate_rps: float,
    duration_s: float,
    entries: Sequence[Entry],
    lengths: LengthMix = LengthMix(),
    bursts: Sequence[Burst] = (),
) -> list[Arrival]:
    """Every request of a run, in time order: a pure function of its arguments."""
    if rate_rps < 0 or duration_s < 0:
        raise ValueError("rate and duration must not be negative")
    if not entries or any(e.share < 0 for e in entries) or sum(e.share for e in entries) <= 0:
        raise ValueError("need at least one entry and a positive total share")
    names = {e.name for e in entries}
    for burst in bursts:
        if burst.entry and burst.entry not in names:
            raise ValueError(f"burst entry {burst.entry!r} is not one of {sorted(names)}")
        if burst.rate_rps < 0 or burst.duration_s < 0:
            raise ValueError("burst rate and duration must not be negative")
    cumulative = list(itertools.accumulate(e.share for e in entries))

    def pick(rng: random.Random) -> str:
        x = rng.random() * cumulative[-1]
        return entries[min(bisect.bisect_right(cumulative, x), len(entries) - 1)].name

    planned: list[tuple[float, str, int, int, bool]] = []
    processes = [(0.0, duration_s, rate_rps, "", False)] + [
        (b.start_s, min(duration_s, b.start_s + b.duration_s), b.rate_rps, b.entry, True)
        for b in bursts
    ]
    for stream, (start, end, rate, entry, is_burst) in enumerate(processes):
        # One stream per process (string seeds hash deterministically across runs).
        rng = random.Random(f"{seed}/{stream}")
        if rate <= 0:
            continue
        t = start + rng.expovariate(rate)
        while t < end:
            where = entry or pick(rng)
            prompt, output = lengths.draw(rng)
            planned.append((t, where, prompt, output, is_burst))
            t += rng.expovariate(rate)
    planned.sort(key=lambda p: p[0])
    return [Arrival(index=i, at_s=t, entry=e, prompt_tokens=p, output_tokens=o, burst=b)
            for i, (t, e, p, o, b) in enumerate(planned)]


def prompt_text(tokens: int) -> str:
    """A prompt of `tokens` tokens as the simulator counts them (4 characters a token)."""
    return ("Tell me more about GPUs. " * (tokens // 6 + 1))[: tokens * 4]


@dataclass
class Result:
    """What happened to one request. Times are seconds; `sent_s` is from the run's start."""

    arrival: Arrival
    sent_s: float
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    replica: str = ""
    rank: int | None = None
    error: str = ""
    #: Request body plus response bytes: what crossed the network between proxy and replica.
    bytes: int = 0
    #: It went by the endpoint picker's pick (Envoy's picked route set PICKED_HEADER);
    #: False: by Envoy's balancer over the weights (no picker, or the picker failed open).
    picked: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


@dataclass
class Replayer:
    """Replays a schedule against entry URLs with streaming completions, open loop.

    Open loop: a request is sent at its planned time whether or not earlier ones finished,
    as independent users would, so a slow replica shows up as latency, not as less load.
    TTFT is the time to the first SSE event, which for `/v1/completions` carries the first
    token (a chat stream opens with a role-only event, which would flatter TTFT).
    """

    urls: Mapping[str, str]
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Entry -> the node it runs on, sent as ORIGIN_NODE_HEADER (entries not listed: none).
    origin_nodes: Mapping[str, str] = field(default_factory=dict)
    on_result: Callable[[Result], None] | None = None
    #: Results in completion order; `in_flight` counts requests sent and not yet finished.
    results: list[Result] = field(default_factory=list)
    sent: int = 0
    sent_by_entry: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _started: float = 0.0

    async def run(self, arrivals: Sequence[Arrival], session: aiohttp.ClientSession,
                  stop: asyncio.Event | None = None) -> None:
        """Send every arrival at its time; returns when all are sent or `stop` is set."""
        missing = {a.entry for a in arrivals} - set(self.urls)
        if missing:
            raise ValueError(f"no URL for entries {sorted(missing)}")
        stop = stop or asyncio.Event()
        self._started = time.monotonic()
        for arrival in arrivals:
            delay = self._started + arrival.at_s - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass
            if stop.is_set():
                return
            task = asyncio.create_task(self._send(session, arrival))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    async def drain(self, timeout_s: float) -> bool:
        """Wait for the requests in flight; False if some were still running at the timeout."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            return not pending
        return True

    async def cancel(self) -> None:
        """Abandon the requests in flight (each is recorded with the error `cancelled`)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    #: Exceptions of `route` recorded as a failed request rather than raised.
    route_errors: ClassVar[tuple[type[Exception], ...]] = ()

    async def route(
        self, session: aiohttp.ClientSession, arrival: Arrival
    ) -> tuple[str, Mapping[str, str]]:
        """Where a request goes (base URL) and with which headers: its entry point's Envoy.

        A subclass may decide per request (the benchmark's oracle); the latency clock starts
        after this returns, so the decision is not charged to the request.
        """
        return self.urls[arrival.entry], self.entry_headers(arrival)

    def entry_headers(self, arrival: Arrival) -> Mapping[str, str]:
        origin = self.origin_nodes.get(arrival.entry)
        return self.headers if origin is None else {**self.headers, ORIGIN_NODE_HEADER: origin}

    async def _send(self, session: aiohttp.ClientSession, arrival: Arrival) -> None:
        deciding = time.monotonic()
        result = Result(arrival=arrival, sent_s=deciding - self._started)
        sent_at = deciding
        self.sent += 1
        self.sent_by_entry[arrival.entry] += 1
        self.in_flight += 1
        body = {
            "model": self.model,
            "prompt": prompt_text(arrival.prompt_tokens),
            "max_tokens": arrival.output_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        recorded: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError,
                                                 *self.route_errors)
        try:
            url, headers = await self.route(session, arrival)
            sent_at = time.monotonic()
            payload = json.dumps(body).encode()
            result.bytes = len(payload)
            async with session.post(url + "/v1/completions", data=payload,
                                    headers={**headers, "Content-Type": "application/json"}
                                    ) as response:
                result.status = response.status
                result.replica = response.headers.get(REPLICA_HEADER, "")
                result.picked = PICKED_HEADER in response.headers
                rank = response.headers.get(RANK_HEADER)
                result.rank = int(rank) if rank is not None and rank.isdigit() else None
                if response.status != 200:
                    result.error = (await response.text())[:200] or f"HTTP {response.status}"
                else:
                    await self._read_stream(response, result, sent_at)
        except asyncio.CancelledError:
            result.error = "cancelled"
            raise
        except recorded as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            result.e2e_s = time.monotonic() - sent_at
            self.in_flight -= 1
            self.results.append(result)
            if self.on_result is not None:
                self.on_result(result)

    @staticmethod
    async def _read_stream(response: aiohttp.ClientResponse, result: Result,
                           sent_at: float) -> None:
        # Only the first event is parsed (for TTFT); the rest is read in bulk, which keeps
        # the client cheap at thousands of tokens a second on a small machine.
        while True:
            line = await response.content.readline()
            if not line:
                result.error = "stream ended before any event"
                return
            result.bytes += len(line)
            if line.startswith(b"data:"):
                result.ttft_s = time.monotonic() - sent_at
                break
        rest = await response.content.read()
        result.bytes += len(rest)
        if not (line + rest).rstrip().endswith(b"data: [DONE]"):
            result.error = "stream ended without [DONE]"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
