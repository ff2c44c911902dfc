"""The hub: current pools, loads and ingress. Sources write here; everything else reads.

Each source owns its own slice of pools (so a Kubernetes relist cannot erase pools from a
static file); readers see the merge. A change bumps `version` and wakes `wait_change`.
Sources also say what they currently fail to see (`problems`), for /readyz and /debug/state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from xds_server.model import IngressReport, Load, Pool, Replica


class State:
    def __init__(self) -> None:
        self._by_source: dict[str, tuple[Pool, ...]] = {}
        self._loads: dict[str, Load] = {}
        self._pools: tuple[Pool, ...] = ()
        self._version = 0
        self._changed = asyncio.Event()
        #: Sources that have delivered their first full picture; readiness waits for them.
        self._synced: set[str] = set()
        self._expected: set[str] = set()
        self._problems: dict[str, Mapping[str, str]] = {}
        #: Envoy load-report stream -> its latest IngressReport.
        self._ingress: dict[str, IngressReport] = {}

    @property
    def version(self) -> int:
        return self._version

    @property
    def pools(self) -> tuple[Pool, ...]:
        return self._pools

    @property
    def loads(self) -> Mapping[str, Load]:
        """Latest load per replica address."""
        return self._loads

    def expect_source(self, source: str) -> None:
        """Declare a source whose first sync readiness waits for."""
        self._expected.add(source)

    @property
    def synced(self) -> bool:
        return self._expected <= self._synced

    @property
    def problems(self) -> dict[str, str]:
        """What each source currently fails to see -> why (e.g. a watch the API refuses)."""
        return {what: why for problems in self._problems.values()
                for what, why in problems.items()}

    def set_problems(self, source: str, problems: Mapping[str, str]) -> None:
        """Replace what `source` reports as failing (empty: all is well)."""
        self._problems[source] = dict(problems)

    def set_pools(self, source: str, pools: Iterable[Pool]) -> bool:
        """Replace everything `source` knows; returns whether the merged view changed."""
        pools = tuple(pools)
        self._synced.add(source)
        if self._by_source.get(source) == pools:
            return False
        self._by_source[source] = pools
        merged = _merge(self._by_source.values())
        if merged == self._pools:
            return False
        self._pools = merged
        live = {r.address for p in merged for r in p.replicas}
        self._loads = {a: load for a, load in self._loads.items() if a in live}
        self._bump()
        return True

    def set_loads(self, loads: Mapping[str, Load]) -> None:
        """Record new load readings (by replica address)."""
        live = {r.address for p in self._pools for r in p.replicas}
        loads = {a: load for a, load in loads.items() if a in live}
        if not loads:
            return
        self._loads.update(loads)
        self._bump()

    def set_ingress(self, stream: str, report: IngressReport) -> None:
        """Record what one Envoy's load-report stream says it sent upstream lately. Bumps
        nothing: the next decision reads it (loads arrive every second anyway)."""
        self._ingress[stream] = report

    def drop_ingress(self, stream: str) -> None:
        """Forget a stream that ended: its Envoy no longer reports."""
        self._ingress.pop(stream, None)

    def ingress(self, now: float) -> dict[str, dict[str, float]]:
        """Requests per second entering Envoys: pool -> Envoy node ("" for an Envoy on no
        node) -> rate, summed over the streams whose report is still current (read within
        three of its intervals)."""
        rates: dict[str, dict[str, float]] = {}
        for report in self._ingress.values():
            if now - report.at > 3.0 * report.interval_s:
                continue
            for pool, rate in report.rates.items():
                by_node = rates.setdefault(pool, {})
                by_node[report.node] = by_node.get(report.node, 0.0) + rate
        return rates

    def replica(self, pool_name: str, address: str) -> Replica | None:
        for pool in self._pools:
            if pool.name == pool_name:
                for replica in pool.replicas:
                    if replica.address == address:
                        return replica
        return None

    async def wait_change(self, seen_version: int) -> int:
        """Return the current version once it differs from `seen_version`."""
        while self._version == seen_version:
            await self._changed.wait()
        return self._version

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()


def _merge(slices: Iterable[tuple[Pool, ...]]) -> tuple[Pool, ...]:
    """Merge pools of the same name across sources; order by first appearance."""
    replicas: dict[str, dict[str, Replica]] = {}
    for pools in slices:
        for pool in pools:
            into = replicas.setdefault(pool.name, {})
            for replica in pool.replicas:
                into.setdefault(replica.address, replica)
    return tuple(
        Pool(name=name, replicas=tuple(sorted(by_address.values())))
        for name, by_address in replicas.items()
    )
