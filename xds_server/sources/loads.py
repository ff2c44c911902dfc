"""The load loop: where each replica's load comes from, every interval.

Modes: `scrape` (each replica's /metrics), `prometheus` (fleet-wide queries), `auto`
(Prometheus when configured, and the scrape for every replica whose Prometheus sample is
missing or older than `prometheus_max_age_s`, including all of them while Prometheus is
down), `none` (capacity-only weights).
"""

from __future__ import annotations

import asyncio
import logging
import time

from xds_server.metrics import Metrics
from xds_server.model import Load, Replica, ReplicaState
from xds_server.settings import LoadSettings
from xds_server.sources.prometheus import PrometheusDown, PrometheusReader
from xds_server.sources.scrape import Scraper
from xds_server.state import State

log = logging.getLogger(__name__)


class LoadLoop:
    def __init__(self, *, state: State, metrics: Metrics, settings: LoadSettings) -> None:
        self._state = state
        self._metrics = metrics
        self._settings = settings
        self._scraper = Scraper(
            metrics=metrics, timeout_s=settings.scrape_timeout_s,
            concurrency=settings.scrape_concurrency,
        )
        self._prometheus = (
            PrometheusReader(url=settings.prometheus_url, metrics=metrics,
                             queries=settings.queries, timeout_s=settings.prometheus_timeout_s)
            if settings.prometheus_url and settings.mode in ("auto", "prometheus")
            else None
        )
        if settings.mode == "prometheus" and self._prometheus is None:
            raise ValueError("--metrics prometheus needs --prometheus-url")

    @property
    def interval_s(self) -> float:
        s = self._settings
        return s.prometheus_interval_s if s.mode == "prometheus" else s.scrape_interval_s

    async def run(self) -> None:
        if self._settings.mode == "none":
            return
        try:
            while True:
                started = time.monotonic()
                loads = await self.collect_once()
                self._state.set_loads(loads)
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
        finally:
            await self._scraper.close()

    async def collect_once(self) -> dict[str, Load]:
        replicas = [r for p in self._state.pools for r in p.replicas
                    if r.state is ReplicaState.READY]
        self._scraper.forget(r.address for r in replicas)
        mode = self._settings.mode
        loads: dict[str, Load] = {}
        from_prometheus = 0
        if self._prometheus is not None:
            try:
                loads = await self._prometheus.read(replicas)
            except PrometheusDown:
                loads = {}
            if mode == "auto":
                now = time.time()
                loads = {a: v for a, v in loads.items()
                         if now - v.read_at <= self._settings.prometheus_max_age_s}
            from_prometheus = len(loads)
        if mode == "scrape" or (mode == "auto" and len(loads) < len(replicas)):
            missing: list[Replica] = [r for r in replicas if r.address not in loads]
            loads.update(await self._scraper.scrape(missing))
        self._metrics.load_replicas.labels("prometheus").set(from_prometheus)
        self._metrics.load_replicas.labels("scrape").set(len(loads) - from_prometheus)
        return loads
