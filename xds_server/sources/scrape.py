"""Direct scrape: each replica's own /metrics, on a short interval (the fast path).

Bounded concurrency and a timeout per replica; a hybrid-mode API server's per-rank series
(`engine` label) are summed into its replica. A replica whose /metrics fails keeps its last
reading, which then ages: staleness is the policy's input, not a verdict here. Its decode
speed comes from its output-token counter over the readings of the last few seconds
(`decode_speed`).

The body is read to its end under a size cap: vLLM writes the load gauges after hundreds of
KB of histograms (8 DP engines), so a partial read would drop engines without an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from xds_server.metrics import Metrics
from xds_server.model import Load, RankLoad, Replica
from xds_server.sources.vllm_metrics import MetricsTextError, parse_metrics

log = logging.getLogger(__name__)

SOURCE = "scrape"
#: Seconds of readings a decode speed is timed over: between two readings a second apart,
#: the mean of two instants' running requests was off by up to 4x (a batch that came and
#: went between them), and the weights moved traffic on it.
SPEED_SPAN_S = 5.0


def combine(ranks: Iterable[RankLoad], read_at: float,
            decode_speed: float | None = None) -> Load:
    """One replica's load from its ranks: counts add up, KV use is the mean."""
    ranks = list(ranks)
    kv = [r.kv_cache_usage for r in ranks if r.kv_cache_usage is not None]
    return Load(
        running=sum(r.running for r in ranks),
        waiting=sum(r.waiting for r in ranks),
        kv_cache_usage=sum(kv) / len(kv) if kv else None,
        read_at=read_at,
        ranks=tuple(ranks),
        decode_speed=decode_speed,
    )


@dataclass(frozen=True)
class Count:
    """What a decode speed is measured between: one reading's output tokens so far (summed
    over `engines`) and its running requests."""

    engines: tuple[str, ...]
    tokens: float
    running: float
    read_at: float


def decode_speed(counts: Sequence[Count]) -> float | None:
    """Output tokens per second per running request from the first reading to the last
    (1/TPOT), with the mean of every reading's running requests in between.

    None with fewer than two readings, when the replica averaged less than one running
    request (no decoding to time), when the counter went backwards (vLLM restarted) or when
    the readings sum different engines.
    """
    if len(counts) < 2 or any(c.engines != counts[-1].engines for c in counts):
        return None
    first, last = counts[0], counts[-1]
    elapsed = last.read_at - first.read_at
    running = sum(c.running for c in counts) / len(counts)
    produced = last.tokens - first.tokens
    if elapsed <= 0 or running < 1 or produced < 0:
        return None
    return produced / elapsed / running


class Scraper:
    """Scrapes a set of replicas once; the loop that calls it lives in `loads.py`."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        timeout_s: float = 0.5,
        concurrency: int = 32,
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = asyncio.Semaphore(concurrency)
        self._max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None
        #: address -> reason of the last failure, so a failing replica logs once, not per scrape.
        self._failing: dict[str, str] = {}
        #: address -> its last token count, which the next reading's decode speed starts from.
        self._counts: dict[str, deque[Count]] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape(self, replicas: Iterable[Replica]) -> dict[str, Load]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            )
        targets = list(replicas)
        results = await asyncio.gather(*(self._one(r) for r in targets))
        return {r.address: load for r, load in zip(targets, results, strict=True) if load}

    async def _one(self, replica: Replica) -> Load | None:
        assert self._session is not None
        url = f"http://{replica.metrics_address}{replica.metrics_path}"
        async with self._limit:
            try:
                async with self._session.get(url) as response:
                    if response.status != 200:
                        self._fail(replica, f"http {response.status}", "http")
                        return None
                    body = await _read_capped(response, self._max_body_bytes)
                    read_at = time.time()
            except TimeoutError:
                self._fail(replica, "timed out", "timeout")
                return None
            except aiohttp.ClientError as exc:
                self._fail(replica, f"{type(exc).__name__}: {exc}", "connect")
                return None
        if body is None:
            self._fail(replica, f"/metrics body over the {self._max_body_bytes} byte limit",
                       "too_large")
            return None
        try:
            reading = parse_metrics(body.decode("utf-8", errors="replace"))
        except MetricsTextError as exc:
            self._fail(replica, str(exc), "parse")
            return None
        if replica.address in self._failing:
            log.info("scrape of %s recovered", replica.address)
            del self._failing[replica.address]
        speed = None
        if reading.generation_tokens is None:
            self._counts.pop(replica.address, None)
        else:
            count = Count(tuple(r.engine for r in reading.ranks), reading.generation_tokens,
                          sum(r.running for r in reading.ranks), read_at)
            counts = self._counts.setdefault(replica.address, deque())
            if counts and (counts[-1].engines != count.engines or counts[-1].tokens > count.tokens):
                counts.clear()  # other engines, or a restart: time from here on
            counts.append(count)
            while len(counts) > 2 and read_at - counts[1].read_at >= SPEED_SPAN_S:
                counts.popleft()
            speed = decode_speed(counts)
        return combine(reading.ranks, read_at, speed)

    def forget(self, live: Iterable[str]) -> None:
        """Drop what is remembered of replicas that are gone (called with every live address)."""
        keep = set(live)
        self._failing = {a: why for a, why in self._failing.items() if a in keep}
        self._counts = {a: count for a, count in self._counts.items() if a in keep}

    def _fail(self, replica: Replica, why: str, reason: str) -> None:
        self._metrics.load_errors.labels(SOURCE, reason).inc()
        if self._failing.get(replica.address) != why:
            log.warning("scrape of %s (%s) failed: %s; keeping its last load, which will age",
                        replica.address, replica.origin or replica.node, why)
            self._failing[replica.address] = why
        return None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it is longer than `limit` (the rest is not read)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    # `read(n)` returns what is buffered (at most n), not n bytes: read until EOF.
    while chunk := await response.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
