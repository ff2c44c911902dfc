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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from xds_server.metrics import GaugeFamily, Metrics
from xds_server.model import Load, Pool, ReplicaState, View, Weights
from xds_server.policy.views import HybridSettings, keep_shares
from xds_server.policy.weights import Decision, Explanation, Memory, PolicySettings, decide
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds import consistency, resources, types
from xds_server.xds.cache import Snapshot, SnapshotCache
from xds_server.xds.snapshot import Entry, encode_all

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

    def judged(self, pool: str, address: str) -> Explanation | None:
        """How the policy judged the replica (its relative speed, the room its load is read
        against), None if it did not: the picker weighs a wait by the same."""
        return self.explain.get(pool, {}).get(address)


@dataclass(frozen=True)
class Plan:
    """What every view's snapshot is built from: plain data, decided once per change."""

    inputs: tuple[resources.PoolInput, ...] = ()
    #: pool -> node -> per mille an Envoy on that node keeps there.
    keep: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: Nodes with a view of their own (a replica of some pool runs there).
    nodes: frozenset[str] = frozenset()
    #: The shared endpoint assignments, encoded once for every view.
    endpoints: Mapping[str, Entry] = field(default_factory=dict)


class InconsistentSnapshot(Exception):
    """A view's resources name something the snapshot does not have."""


def build_view(plan: Plan, view: View, settings: EnvoySettings) -> Snapshot:
    """One view's complete snapshot; raises `InconsistentSnapshot` rather than return one
    that would route to a missing cluster."""
    routes = tuple(
        resources.PoolRoute(
            pool=item.pool.name,
            node=view.node if view.node in plan.keep[item.pool.name] else "",
            keep_per_mille=plan.keep[item.pool.name].get(view.node, 0),
        )
        for item in plan.inputs
    )
    clusters = resources.build_clusters(plan.inputs, view.node, settings)
    route = resources.build_route_config(routes, settings)
    listener = resources.build_listener(view, settings)
    problems = consistency.problems(clusters, plan.endpoints.keys(), [route])
    if problems:
        raise InconsistentSnapshot(f"view {view}: " + "; ".join(problems))
    return Snapshot(
        {
            types.CLUSTER: encode_all(clusters, by_identity=True),
            types.ENDPOINT: plan.endpoints,
            types.LISTENER: encode_all([listener], by_identity=True),
            types.ROUTE: encode_all([route], by_identity=True),
        },
        assignments_needed=consistency.assignments_needed(clusters),
    )


@dataclass(frozen=True)
class _Decision:
    pools: tuple[Pool, ...]
    decisions: Mapping[str, Decision]
    inputs: tuple[resources.PoolInput, ...]
    keep: Mapping[str, Mapping[str, int]]
    #: When it was decided: `published.at`, stamped before the build.
    at: float
    #: What the picker feed reads of each replica's judgement (`_judgement`), gathered in
    #: the worker thread: at 10,000 replicas a few milliseconds the loop need not spend.
    judgement: Mapping[tuple[str, str], tuple[float, float | None]] = field(
        default_factory=dict)

    @property
    def weights(self) -> dict[str, Weights]:
        return {i.pool.name: i.weights for i in self.inputs}


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
        self._memory: dict[str, Memory] = {}
        self._plan: Plan | None = None
        self.published = Published()
        #: Bumped whenever what the picker feed reads from here changes: the keep shares, or
        #: a replica's judgement it weighs waits by (relative speed, room per rank).
        self.feed_version = 0
        self._feed_changed = asyncio.Event()
        #: `_judgement` of what is published.
        self._judged: Mapping[tuple[str, str], tuple[float, float | None]] = {}
        cache.set_source(self)

    async def run(self) -> None:
        seen = -1
        while True:
            if self._state.version == seen and self._cache.ready:
                # No change still re-decides now and then: staleness is judged at decide time.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._policy.decide_interval_s):
                        await self._state.wait_change(seen)
                        # Coalesce a burst of changes (a relist, many edits) into one push.
                        await asyncio.sleep(self._debounce_s)
            seen = self._state.version
            await self.publish()

    async def publish(self) -> bool:
        """Decide and build in a worker thread (at 10,000 replicas: ~0.2 s and ~0.4 s, in
        which ADS and the hosted picker keep being served), make the result current on the
        loop."""
        started = time.perf_counter()
        pools, loads, version = self._state.pools, dict(self._state.loads), self._state.version
        ingress = self._state.ingress(time.time())
        views = self._cache.views_in_use(_nodes(pools))
        decided, built = await asyncio.to_thread(self._decide_and_build, pools, loads, ingress,
                                                 views)
        return self._finish(decided, built, started, version)

    async def wait_feed_change(self, seen_version: int) -> int:
        """Return `feed_version` once it differs from `seen_version`."""
        while self.feed_version == seen_version:
            await self._feed_changed.wait()
        return self.feed_version

    def publish_now(self) -> bool:
        """`publish` on the calling thread: at startup, before anything is served."""
        started = time.perf_counter()
        pools, loads, version = self._state.pools, self._state.loads, self._state.version
        views = self._cache.views_in_use(_nodes(pools))
        decided, built = self._decide_and_build(pools, loads, self._state.ingress(time.time()),
                                                views)
        return self._finish(decided, built, started, version)

    def build_view(self, view: View) -> Snapshot | None:
        """A view no stream had when the snapshot was built, from the current plan."""
        if self._plan is None:
            return None
        try:
            return build_view(self._plan, view, self._settings)
        except InconsistentSnapshot as exc:
            self._refused(exc)
            return None

    def _decide_and_build(
        self, pools: tuple[Pool, ...], loads: Mapping[str, Load],
        ingress: Mapping[str, Mapping[str, float]], views: set[View]
    ) -> tuple[_Decision, tuple[Plan, dict[View, Snapshot]] | InconsistentSnapshot | None]:
        """Work on immutable inputs (`loads` and `ingress` copies), safe in a worker thread:
        the new weights and keep shares, and the snapshots, unless they would publish
        nothing new."""
        now = time.time()
        decisions = {
            p.name: decide(p, loads, self._memory.get(p.name, Memory()), now, self._policy,
                           self._entering(ingress.get(p.name)))
            for p in pools
        }
        self._memory = {name: d.memory for name, d in decisions.items()}
        inputs = tuple(
            resources.PoolInput(pool=p, weights=decisions[p.name].weights) for p in pools
        )
        keep = {p.name: self._keep_shares(p, decisions[p.name]) for p in pools}
        decided = _Decision(pools=pools, decisions=decisions, inputs=inputs, keep=keep, at=now,
                            judgement=_judgement(decisions))
        if (self._cache.ready and pools == self.published.pools
                and decided.weights == self.published.weights and keep == self.published.keep):
            return decided, None  # most load readings move no published weight (deadband)
        return decided, self._build(decided, views)

    def _finish(
        self,
        decided: _Decision,
        built: tuple[Plan, dict[View, Snapshot]] | InconsistentSnapshot | None,
        started: float,
        state_version: int,
    ) -> bool:
        before = self.published
        if built is None:
            # Explain the readings, but build and diff nothing.
            self.published = dataclasses.replace(
                self.published, state_version=state_version,
                explain={name: d.explain for name, d in decided.decisions.items()},
                node_utilization={
                    name: d.node_utilization for name, d in decided.decisions.items()
                },
                at=decided.at,
            )
            self._export(decided.inputs, time.time())
            changed = False
        else:
            changed = self._swap(decided, built, started, state_version)
        # The judgement too: a room learnt while the weights stand still must reach the feed.
        if self.published is not before and (self.published.keep != before.keep
                                             or decided.judgement != self._judged):
            self._judged = decided.judgement
            self.feed_version += 1
            self._feed_changed.set()
            self._feed_changed = asyncio.Event()
        return changed

    def _build(
        self, decided: _Decision, views: set[View]
    ) -> tuple[Plan, dict[View, Snapshot]] | InconsistentSnapshot:
        previous = self._plan.endpoints if self._plan is not None else None
        plan = Plan(
            inputs=decided.inputs,
            keep=decided.keep,
            nodes=_nodes(decided.pools),
            endpoints=encode_all(resources.build_endpoints(decided.inputs), previous),
        )
        try:
            return plan, {view: build_view(plan, view, self._settings) for view in views}
        except InconsistentSnapshot as exc:
            return exc

    def _swap(
        self,
        decided: _Decision,
        built: tuple[Plan, dict[View, Snapshot]] | InconsistentSnapshot,
        started: float,
        state_version: int,
    ) -> bool:
        if isinstance(built, InconsistentSnapshot):
            self._refused(built)
            return False
        plan, views = built
        self._plan = plan
        changed = self._cache.set_snapshots(plan.nodes, views)
        membership_changed = decided.pools != self.published.pools
        elapsed = time.perf_counter() - started
        self.published = Published(
            state_version=state_version,
            xds_version=self._cache.version,
            pools=decided.pools,
            weights=decided.weights,
            explain={name: d.explain for name, d in decided.decisions.items()},
            keep=decided.keep,
            node_utilization={
                name: d.node_utilization for name, d in decided.decisions.items()
            },
            at=decided.at,
        )
        self._export(decided.inputs, time.time())
        if changed:
            self._metrics.snapshots.inc()
            self._metrics.snapshot_version.set(self._cache.version)
            self._metrics.snapshot_build_seconds.observe(elapsed)
            # Weight-only snapshots come every second or so: not worth an INFO line each.
            log.log(
                logging.INFO if membership_changed else logging.DEBUG,
                "snapshot %d: %d pools, %d replicas, %d endpoint assignments (%.1f ms)",
                self._cache.version, len(decided.pools),
                sum(len(p.replicas) for p in decided.pools), len(plan.endpoints),
                elapsed * 1000,
            )
        return changed

    def _refused(self, exc: InconsistentSnapshot) -> None:
        self._metrics.snapshots_refused.inc()
        log.error("snapshot refused, the last good one stays: %.500s", exc)

    def _entering(self, ingress: Mapping[str, float] | None) -> Mapping[str, float] | None:
        """A pool's ingress as the plan must see it: with local-first off every Envoy sends
        all it gets through the whole-pool cluster, as a gateway does."""
        if ingress is None or self._hybrid.local_first:
            return ingress
        return {"": sum(ingress.values())}

    def _keep_shares(self, pool: Pool, decision: Decision) -> dict[str, int]:
        capacity: dict[str, int] = {}
        for r in pool.replicas:
            if r.state is ReplicaState.READY:
                capacity[r.node] = capacity.get(r.node, 0) + r.capacity
        return keep_shares(pool.nodes, decision.node_utilization, capacity, self._hybrid,
                           decision.node_keep)

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
        gateway = self._cache.snapshot_for(View())
        held = gateway.resources if gateway is not None else {}
        for type_url in types.PUSH_ORDER:
            m.resources.labels(types.short(type_url)).set(len(held.get(type_url, {})))


def _nodes(pools: Iterable[Pool]) -> frozenset[str]:
    return frozenset(n for p in pools for n in p.nodes)


def _judgement(decisions: Mapping[str, Decision]
               ) -> dict[tuple[str, str], tuple[float, float | None]]:
    """What the picker reads of each replica's judgement (admin.picker_state)."""
    return {(pool, address): (e.relative_speed, e.slots)
            for pool, d in decisions.items() for address, e in d.explain.items()}
