"""The Prometheus load source against Debian's real Prometheus scraping simulators."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    PROMETHEUS,
    ControlPlane,
    Envoy,
    Prometheus,
    Sim,
    Traffic,
    free_ports,
    running,
    wait_for,
)
from xds_server.metrics import Metrics
from xds_server.model import Replica
from xds_server.settings import PrometheusQueries
from xds_server.sources.prometheus import PrometheusReader
from xds_server.sources.scrape import Scraper

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed"),
]


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sim = Sim(workdir, replicas=3, nodes=1, extra=["--max-num-seqs", "4"])
        self.prometheus: Prometheus | None = None
        self.cp: ControlPlane | None = None
        self.envoy: Envoy | None = None

    def replicas(self) -> list[Replica]:
        return [Replica(a.split(":")[0], int(a.split(":")[1]), "node-a")
                for a in self.sim.addresses]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("prometheus"))
    with running(s.sim):
        s.prometheus = Prometheus(s.workdir, s.sim.addresses, interval_s=0.5)
        s.cp = ControlPlane(
            s.workdir, s.sim.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "auto", "--prometheus-url", s.prometheus.url,
                   "--prometheus-max-age-s", "3", "--scrape-interval-s", "0.5",
                   "--max-num-seqs", "4"],
        )
        s.envoy = Envoy(s.workdir, xds_port=s.cp.xds_port, node="node-a")
        with running(s.prometheus, s.cp, s.envoy):
            yield s


def test_prometheus_and_scrape_sources_agree(stack: Stack) -> None:
    busy = stack.sim.addresses[0]
    stack.sim.fault(busy, slowdown=50.0)  # hold the queue still while both sources read it
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=10)
    futures = [pool.submit(httpx.post, f"http://{busy}/v1/completions", timeout=120,
                           json={"model": "Qwen/Qwen3-0.6B", "prompt": "hi", "max_tokens": 50})
               for _ in range(10)]
    try:
        assert stack.prometheus is not None
        reader = PrometheusReader(url=stack.prometheus.url, metrics=Metrics(),
                                  queries=PrometheusQueries())

        async def both() -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
            scraper = Scraper(metrics=Metrics())
            try:
                scraped = await scraper.scrape(stack.replicas())
            finally:
                await scraper.close()
            queried = await reader.read(stack.replicas())
            return ({a: (v.running, v.waiting) for a, v in scraped.items()},
                    {a: (v.running, v.waiting) for a, v in queried.items()})

        def agree() -> bool:
            scraped, queried = asyncio.run(both())
            return scraped == queried and scraped[busy] == (4.0, 6.0)

        wait_for(agree, 20, "Prometheus to report what the scrape sees")

        def speeds() -> dict[str, float | None]:
            return {a: v.decode_speed
                    for a, v in asyncio.run(reader.read(stack.replicas())).items()}

        # The default query's two vectors match per replica; an idle one's 0/0 is no speed
        # (this module's first test: no request has reached the other replicas yet).
        wait_for(lambda: (speed := speeds()[busy]) is not None and speed > 0, 20,
                 "a decode speed of the busy replica from Prometheus")
        assert [speed for a, speed in speeds().items() if a != busy] == [None, None]
    finally:
        stack.sim.fault(busy, slowdown=1.0)
        for f in futures:
            f.result(timeout=120)
        pool.shutdown()


def test_prometheus_down_falls_back_to_the_scrape_and_back(stack: Stack) -> None:
    assert stack.cp is not None and stack.prometheus is not None and stack.envoy is not None
    cp, prometheus = stack.cp, stack.prometheus
    wait_for(lambda: cp.metric("hybridlb_load_replicas", source="prometheus") == 3, 20,
             "loads from Prometheus")
    with Traffic(stack.envoy.url) as traffic:
        prometheus.stop()
        wait_for(lambda: cp.metric("hybridlb_load_replicas", source="scrape") == 3, 20,
                 "fallback to the scrape")
        assert cp.metric("hybridlb_load_errors_total", source="prometheus") > 0
        ages = [cp.metric("hybridlb_load_age_seconds", replica=a) for a in stack.sim.addresses]
        assert all(age < 3 for age in ages)
        prometheus.start()
        wait_for(lambda: cp.metric("hybridlb_load_replicas", source="prometheus") == 3, 30,
                 "Prometheus used again")
    assert traffic.failures == []
    assert sum(traffic.served.values()) > 50
