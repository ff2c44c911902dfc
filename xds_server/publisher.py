"""Turns the state into a snapshot whenever it changes: collect → decide → serve.

The one place that calls the policy and the builders; it remembers what it published so
that /debug/state can explain every weight and every view's keep share.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from xds_server.metrics import GaugeFamily, Metrics
from xds_server.model import Pool, ReplicaState, View, Weights
from xds_server.policy.views import HybridSettings, keep_shares
from xds_server.policy.weights import Decision, Explanation, Memory, PolicySettings, decide
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
    #: pool -> node -> per mille an Envoy on that node keeps there.
    keep: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: pool -> node -> smoothed utilization the keep share came from.
    node_utilization: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
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
        hybrid: HybridSettings | None = None,
        debounce_s: float = 0.05,
        linger_s: float = 30.0,
    ) -> None:
        self._state = state
        self._cache = cache
        self._metrics = metrics
        self._replica_counts = GaugeFamily(metrics.replicas)
        self._weights = GaugeFamily(metrics.weight)
        self._load_ages = GaugeFamily(metrics.load_age)
        self._settings = settings
        self._policy = policy or PolicySettings()
        self._hybrid = hybrid or HybridSettings()
        self._debounce_s = debounce_s
        self._linger_s = linger_s
        self._memory: dict[str, Memory] = {}
        #: (pool, node) -> when the clusters of a node that lost its last replica go away.
        self._lingering: dict[tuple[str, str], float] = {}
        self._published_lingering: tuple[tuple[str, str], ...] = ()
        self.published = Published()

    async def run(self) -> None:
        seen = -1
        while True:
            if self._state.version == seen and self._cache.ready:
                timeout = None
                if self._lingering:
                    timeout = max(0.0, min(self._lingering.values()) - time.time()) + 0.01
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._state.wait_change(seen)
                        # Coalesce a burst of changes (a relist, many edits) into one push.
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
        self._update_lingering(pools, now)
        inputs = [
            resources.PoolInput(
                pool=p,
                weights=decisions[p.name].weights,
                nodes=tuple(n for (pool, n) in self._lingering if pool == p.name),
            )
            for p in pools
        ]
        keep = {p.name: self._keep_shares(p, decisions[p.name]) for p in pools}
        weights = {i.pool.name: i.weights for i in inputs}
        lingering = tuple(sorted(self._lingering))
        if (self._cache.ready and pools == self.published.pools and weights ==
                self.published.weights and keep == self.published.keep
                and lingering == self._published_lingering):
            # Most load readings move no published weight (the deadband): explain them, but
            # build and diff nothing.
            self.published = dataclasses.replace(
                self.published, state_version=self._state.version,
                explain={name: d.explain for name, d in decisions.items()},
                node_utilization={name: d.node_utilization for name, d in decisions.items()},
                at=now,
            )
            self._export(inputs, now)
            return False
        self._published_lingering = lingering
        assignments = resources.build_endpoints(inputs)
        shared: dict[str, Sequence[Message]] = {types.ENDPOINT: assignments}
        settings = self._settings
        names = [p.name for p in pools]

        def per_view(view: View) -> Mapping[str, Sequence[Message]]:
            routes = tuple(
                resources.PoolRoute(
                    pool=name,
                    node=view.node if view.node in keep[name] else "",
                    keep_per_mille=keep[name].get(view.node, 0),
                )
                for name in names
            )
            return {
                types.CLUSTER: resources.build_clusters(inputs, view.node, settings),
                types.LISTENER: [resources.build_listener(view, settings)],
                types.ROUTE: [resources.build_route_config(routes, settings)],
            }

        changed = self._cache.publish(shared, per_view)
        membership_changed = pools != self.published.pools
        elapsed = time.perf_counter() - started
        self.published = Published(
            state_version=self._state.version,
            xds_version=self._cache.version,
            pools=pools,
            weights=weights,
            explain={name: d.explain for name, d in decisions.items()},
            keep=keep,
            node_utilization={name: d.node_utilization for name, d in decisions.items()},
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
                "snapshot %d: %d pools, %d replicas, %d endpoint assignments (%.1f ms)",
                self._cache.version, len(pools), sum(len(p.replicas) for p in pools),
                len(assignments), elapsed * 1000,
            )
        return changed

    def _keep_shares(self, pool: Pool, decision: Decision) -> dict[str, int]:
        capacity: dict[str, int] = {}
        for r in pool.replicas:
            if r.state is ReplicaState.READY:
                capacity[r.node] = capacity.get(r.node, 0) + r.capacity
        return keep_shares(pool.nodes, decision.node_utilization, capacity, self._hybrid,
                           decision.node_keep)

    def _update_lingering(self, pools: Sequence[Pool], now: float) -> None:
        """Nodes that lost their last replica keep their (empty) clusters for `linger_s`.

        Routes stop naming such a node at once, but an Envoy applies the new routes a moment
        after the new clusters; removing the clusters in the same push would 503 that moment.
        """
        current = {(p.name, n) for p in pools for n in p.nodes}
        before = {(p.name, n) for p in self.published.pools for n in p.nodes}
        for key in before - current:
            self._lingering[key] = now + self._linger_s
        self._lingering = {
            key: until for key, until in self._lingering.items()
            if until > now and key not in current
        }

    def _export(self, inputs: Sequence[resources.PoolInput], now: float) -> None:
        counts: dict[tuple[str, ...], float] = {}
        weights: dict[tuple[str, ...], float] = {}
        ages: dict[tuple[str, ...], float] = {}
        loads = self._state.loads
        for item in inputs:
            pool = item.pool.name
            for state in ReplicaState:
                counts[pool, state.value] = 0
            for r in item.pool.replicas:
                address = r.address
                counts[pool, r.state.value] += 1
                weights[pool, address, r.node] = item.weights.endpoints.get(address, 0)
                load = loads.get(address)
                if load is not None:
                    ages[pool, address] = max(0.0, now - load.read_at)
        self._replica_counts.replace(counts)
        self._weights.replace(weights)
        self._load_ages.replace(ages)
        m = self._metrics
        # Shared resources, and the per-view ones as a gateway's view holds them.
        gateway = self._cache.resources_for(View())
        for type_url in types.PUSH_ORDER:
            m.resources.labels(types.short(type_url)).set(len(gateway.get(type_url, {})))
