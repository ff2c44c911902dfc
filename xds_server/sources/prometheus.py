"""Loads from Prometheus: one instant query per signal for the whole fleet.

Each result series is mapped to a replica by a label (`instance` by default: the
`IP:PORT` Prometheus scraped, which is the replica's metrics address). The sample's own
timestamp (`timestamp(...)`), not the query time, dates the reading, so a Prometheus that
scrapes every 15 s yields loads up to 15 s old, and the policy knows it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from typing import Any

from xds_server.metrics import Metrics
from xds_server.model import Load, RankLoad, Replica
from xds_server.settings import PrometheusQueries
from xds_server.sources.scrape import combine

log = logging.getLogger(__name__)

SOURCE = "prometheus"


class PrometheusDown(Exception):
    """Prometheus did not answer usably; the caller falls back."""


class PrometheusReader:
    def __init__(
        self, *, url: str, metrics: Metrics, queries: PrometheusQueries, timeout_s: float = 2.0
    ) -> None:
        from prometheus_api_client import PrometheusConnect

        self.url = url
        self._queries = queries
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._client = PrometheusConnect(url=url, disable_ssl=True)
        self._down_reason = ""

    async def read(self, replicas: Iterable[Replica]) -> dict[str, Load]:
        """Loads of the replicas Prometheus has fresh-enough series for; raises PrometheusDown."""
        q = self._queries
        try:
            running, waiting, kv, sampled, speed = await asyncio.gather(
                *(asyncio.to_thread(self._query, query)
                  for query in (q.running, q.waiting, q.kv_cache_usage, q.sampled_at,
                                q.decode_speed))
            )
        except Exception as exc:  # requests, HTTP and API errors alike mean "not now"
            reason = f"{type(exc).__name__}: {exc}"[:300]
            self._metrics.load_errors.labels(SOURCE, "query").inc()
            if reason != self._down_reason:
                log.warning("prometheus %s unusable: %s", self.url, reason)
                self._down_reason = reason
            raise PrometheusDown(reason) from exc
        if self._down_reason:
            log.info("prometheus %s answers again", self.url)
            self._down_reason = ""
        loads: dict[str, Load] = {}
        for replica in replicas:
            key = replica.metrics_address
            t = sampled.get(key, {}).get("")
            engines = running.get(key, {})
            if t is None or not engines:
                continue  # missing series: this replica's reading simply does not update
            ranks: list[RankLoad] = []
            for engine, r in sorted(engines.items()):
                w = waiting.get(key, {}).get(engine)
                if w is None or not all(math.isfinite(v) and v >= 0 for v in (r, w, t)):
                    self._metrics.load_errors.labels(SOURCE, "bad_value").inc()
                    ranks = []
                    break
                k = kv.get(key, {}).get(engine)
                ranks.append(RankLoad(engine, r, w, k if k is not None and math.isfinite(k)
                                      else None))
            if ranks:
                v = speed.get(key, {}).get("")
                loads[replica.address] = combine(
                    ranks, read_at=t,
                    decode_speed=v if v is not None and math.isfinite(v) and v >= 0 else None)
        return loads

    def _query(self, query: str) -> dict[str, dict[str, float]]:
        if not query:  # a signal the user turned off
            return {}
        result: list[dict[str, Any]] = self._client.custom_query(
            # Prometheus durations take no fractions ("2.0s" is a 400): whole milliseconds.
            query=query, params={"timeout": f"{int(self._timeout_s * 1000)}ms"},
            timeout=self._timeout_s,
        )
        values: dict[str, dict[str, float]] = {}
        for series in result:
            labels = series.get("metric", {})
            key = labels.get(self._queries.label)
            try:
                value = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if key:
                values.setdefault(key, {})[labels.get("engine", "")] = value
        return values
