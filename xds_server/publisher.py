"""Turns the state into a snapshot whenever it changes: collect → decide → serve.

The one place that calls the policy and the builders; it remembers what it published so
that /debug/state can explain every weight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from xds_server.metrics import Metrics
from xds_server.model import Pool, ReplicaState, View, Weights
from xds_server.policy.weights import Explanation, Memory, PolicySettings, decide
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import resources, types
from xds_server.xds.cache import SnapshotCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """What the last snapshot was built from."""

    state_version: int = -1
    xds_version: int = 0
    pools: tuple[Pool, ...] = ()
    weights: Mapping[str, Weights] = field(default_factory=dict)
    #: pool -> replica address -> the inputs its weight came from.
    explain: Mapping[str, Mapping[str, Explanation]] = field(default_factory=dict)
    at: float = 0.0


class Publisher:
    def __init__(
        self,
        *,
        state: State,
        cache: SnapshotCache,
        metrics: Metrics,
        settings: EnvoySettings,
        policy: PolicySettings | None = None,
        debounce_s: float = 0.05,
    ) -> None:
        self._state = state
        self._cache = cache
        self._metrics = metrics
        self._settings = settings
        self._policy = policy or PolicySettings()
        self._debounce_s = debounce_s
        self._memory: dict[str, Memory] = {}
        self.published = Published()

    async def run(self) -> None:
        seen = -1
        while True:
            if self._state.version == seen and self._cache.ready:
                await self._state.wait_change(seen)
                # Coalesce a burst of changes (a relist, a file with many edits) into one push.
                await asyncio.sleep(self._debounce_s)
            seen = self._state.version
            self.publish_now()

    def publish_now(self) -> bool:
        started = time.perf_counter()
        pools = self._state.pools
        now = time.time()
        loads = self._state.loads
        decisions = {
            p.name: decide(p, loads, self._memory.get(p.name, Memory()), now, self._policy)
            for p in pools
        }
        self._memory = {name: d.memory for name, d in decisions.items()}
        inputs = [resources.PoolInput(pool=p, weights=decisions[p.name].weights) for p in pools]
        clusters, assignments = resources.build_clusters_and_endpoints(inputs, self._settings)
        shared: dict[str, Sequence[Message]] = {
            types.CLUSTER: clusters,
            types.ENDPOINT: assignments,
            types.ROUTE: [resources.build_route_config(inputs, self._settings)],
        }
        settings = self._settings

        def per_view(view: View) -> Mapping[str, Sequence[Message]]:
            return {types.LISTENER: [resources.build_listener(view, settings)]}

        changed = self._cache.publish(shared, per_view)
        membership_changed = pools != self.published.pools
        elapsed = time.perf_counter() - started
        self.published = Published(
            state_version=self._state.version,
            xds_version=self._cache.version,
            pools=pools,
            weights={i.pool.name: i.weights for i in inputs},
            explain={name: d.explain for name, d in decisions.items()},
            at=now,
        )
        self._export(inputs, now)
        if changed:
            self._metrics.snapshots.inc()
            self._metrics.snapshot_version.set(self._cache.version)
            self._metrics.snapshot_build_seconds.observe(elapsed)
            # Weight-only snapshots come every second or so: not worth an INFO line each.
            log.log(
                logging.INFO if membership_changed else logging.DEBUG,
                "snapshot %d: %d pools, %d replicas, %d clusters (%.1f ms)",
                self._cache.version, len(pools), sum(len(p.replicas) for p in pools),
                len(clusters), elapsed * 1000,
            )
        return changed

    def _export(self, inputs: Sequence[resources.PoolInput], now: float) -> None:
        m = self._metrics
        m.replicas.clear()
        m.weight.clear()
        m.load_age.clear()
        loads = self._state.loads
        for item in inputs:
            for state in ReplicaState:
                count = sum(1 for r in item.pool.replicas if r.state is state)
                m.replicas.labels(item.pool.name, state.value).set(count)
            for r in item.pool.replicas:
                m.weight.labels(item.pool.name, r.address, r.node).set(
                    item.weights.endpoints.get(r.address, 0)
                )
                load = loads.get(r.address)
                if load is not None:
                    m.load_age.labels(item.pool.name, r.address).set(max(0.0, now - load.read_at))
        for type_url in types.PUSH_ORDER:
            m.resources.labels(types.short(type_url)).set(
                len(self._cache.shared.get(type_url, {}))
            )
