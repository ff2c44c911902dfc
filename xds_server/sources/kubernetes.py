"""Kubernetes discovery: list then watch the vLLM pods of each pool selector, and the
InferencePools (with their pods) of the Gateway API Inference Extension.

The official client is blocking, so every (selector, namespace) pair gets its own
`ListWatch` thread (sources/listwatch.py: the reflector's rules); threads hand changes to the
event loop with `call_soon_threadsafe` and the loop only merges them into the state, so a
slow API server never stalls the xDS server.

A watch the API server refuses (RBAC on one namespace of several) does not hold the others
back: what the others know is published, and the refusal is reported with the server's own
message (log, `hybridlb_kubernetes_watch_up`, /readyz, /debug/state) until it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from typing import Any

from kubernetes import client, config

from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica, ReplicaState
from xds_server.settings import KubernetesPool, KubernetesSettings
from xds_server.sources import inferencepools
from xds_server.sources.listwatch import SOURCE, ListWatch, backoff_delay
from xds_server.sources.names import valid_pool_name
from xds_server.sources.pods import PodReplica, Problem, pod_to_replica
from xds_server.state import State

log = logging.getLogger(__name__)

__all__ = ["SOURCE", "KubernetesConfigError", "KubernetesSource", "api_client",
           "backoff_delay", "pools_from_config"]


class KubernetesConfigError(RuntimeError):
    """No usable cluster credentials (no kubeconfig, or not running in a cluster)."""


_POOL_KEYS = ("inference_pool", "name", "namespaces", "selector")


def pools_from_config(value: Any) -> tuple[KubernetesPool, ...]:
    """The config file's `kubernetes_pools:` list; ValueError says where and why."""
    if not isinstance(value, list):
        raise ValueError("expected a list of {name, selector, namespaces} or "
                         "{inference_pool, namespaces}")
    pools: list[KubernetesPool] = []
    for i, raw in enumerate(value):
        where = f"kubernetes_pools[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping with {', '.join(_POOL_KEYS)}")
        unknown = sorted(set(map(str, raw)) - set(_POOL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(_POOL_KEYS)}")
        namespaces = raw.get("namespaces") or []
        if isinstance(namespaces, str):
            namespaces = [namespaces]
        if not isinstance(namespaces, list) or not all(
                isinstance(n, str) and n for n in namespaces):
            raise ValueError(f"{where}.namespaces: expected a list of namespace names")
        inference_pool = raw.get("inference_pool")
        if inference_pool is not None:
            if not isinstance(inference_pool, str) or not valid_pool_name(inference_pool):
                raise ValueError(f"{where}.inference_pool: {inference_pool!r} is not a valid "
                                 "InferencePool name")
            if "name" in raw or "selector" in raw:
                raise ValueError(f"{where}: an inference_pool names the pool and selects its "
                                 "pods; give no name or selector with it")
            pools.append(KubernetesPool(inference_pool=inference_pool,
                                        namespaces=tuple(namespaces)))
            continue
        name = raw.get("name") or ""
        if not isinstance(name, str) or (name and not valid_pool_name(name)):
            raise ValueError(f"{where}.name: {name!r} is not a valid pool name")
        if name and any(p.name == name for p in pools):
            raise ValueError(f"{where}.name: pool {name!r} appears twice")
        selector = raw.get("selector")
        if not isinstance(selector, str) or not selector.strip():
            raise ValueError(f"{where}.selector: a label selector is required, e.g. app=vllm")
        pools.append(KubernetesPool(name=name, selector=selector.strip(),
                                    namespaces=tuple(namespaces)))
    return tuple(pools)


def api_client(settings: KubernetesSettings) -> client.ApiClient:
    """A client for the kubeconfig given, else the pod's in-cluster service account."""
    configuration = client.Configuration()
    try:
        if settings.kubeconfig is not None:
            config.load_kube_config(
                config_file=str(settings.kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = settings.kubeconfig or "the in-cluster service account"
        raise KubernetesConfigError(f"cannot configure the Kubernetes client from {where}: "
                                    f"{exc}") from exc
    # Every watch holds a connection for its lifetime; a smaller pool would churn them.
    watches = sum(max(1, len(p.namespaces)) for p in settings.pools if not p.inference_pool)
    watches += 2 * len(_inference_pool_namespaces(settings))
    configuration.connection_pool_maxsize = max(4, watches + 2)
    return client.ApiClient(configuration)


class KubernetesSource:
    """Runs a `ListWatch` thread per pool selector and namespace, and per InferencePool
    namespace one for the InferencePools and one for their pods; merges them into pools."""

    def __init__(
        self,
        *,
        settings: KubernetesSettings,
        state: State,
        metrics: Metrics,
        api: client.ApiClient | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._metrics = metrics
        self._api_client = api if api is not None else api_client(settings)
        core = client.CoreV1Api(self._api_client)
        self._pod_watches = [
            ListWatch[PodReplica](
                resource="pods", namespace=namespace, selector=pool.selector,
                request=_pods(core, namespace),
                convert=functools.partial(pod_to_replica, default_pool=pool.name),
                settings=settings, metrics=metrics, notify=self._wake, report=self._report)
            for pool in settings.pools if not pool.inference_pool
            for namespace in (pool.namespaces or ("",))
        ]
        # InferencePools: per namespace, the pools and every pod (a pool's selector picks
        # its pods here, as several pools' selectors cannot be one label selector).
        custom = client.CustomObjectsApi(self._api_client)
        namespaces = _inference_pool_namespaces(settings)
        self._pool_watches = [
            ListWatch[inferencepools.InferencePool](
                resource=inferencepools.PLURAL, namespace=namespace, selector="",
                request=_inference_pools(custom, namespace),
                convert=inferencepools.parse_inference_pool, settings=settings,
                metrics=metrics, notify=self._wake, report=self._report_pool)
            for namespace in namespaces
        ]
        self._member_watches = [
            ListWatch[inferencepools.PodMember](
                resource="pods", namespace=namespace, selector="",
                request=_pods(core, namespace), convert=inferencepools.pod_member,
                settings=settings, metrics=metrics, notify=self._wake)
            for namespace in namespaces
        ]
        self._watches: list[ListWatch[Any]] = [
            *self._pod_watches, *self._pool_watches, *self._member_watches]
        #: pod uid -> problems last reported for a pod an InferencePool selects.
        self._member_problems: dict[str, tuple[Problem, ...]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = threading.Lock()
        self._flush_scheduled = False
        state.expect_source(SOURCE)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        died: asyncio.Future[None] = loop.create_future()

        def fail(exc: BaseException) -> None:
            if not died.done():
                died.set_exception(exc)

        def main(watch: ListWatch[Any]) -> None:
            try:
                watch.run()
            except BaseException as exc:  # a bug, not the API: take the process down
                loop.call_soon_threadsafe(fail, exc)

        threads = [threading.Thread(target=main, args=(w,), name=w.where, daemon=True)
                   for w in self._watches]
        for thread in threads:
            thread.start()
        log.info("watching %s", "; ".join(w.where for w in self._watches))
        try:
            await died
        finally:
            for watch in self._watches:
                watch.stop()
            deadline = time.monotonic() + 5.0
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._api_client.close()

    def _wake(self) -> None:
        """Called from watch threads: schedule one merge on the loop for a burst of events."""
        with self._pending:
            if self._flush_scheduled or self._loop is None:
                return
            self._flush_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._pending:
            self._flush_scheduled = False
        self._state.set_problems(SOURCE, {
            status.where: status.error for status in (w.status() for w in self._watches)
            if status.error})
        if not all(w.settled.is_set() for w in self._watches):
            return  # readiness waits for every watch's first list (or refusal)
        pools = self.pools()
        if self._state.set_pools(SOURCE, pools):
            log.info("pods: %s", ", ".join(
                f"{p.name} ({sum(r.state is ReplicaState.READY for r in p.replicas)} ready, "
                f"{sum(r.state is ReplicaState.DRAINING for r in p.replicas)} draining)"
                for p in pools) or "no pools")

    def pools(self) -> tuple[Pool, ...]:
        """Every watch's replicas merged by pool; configured pools exist even when empty."""
        by_pool: dict[str, dict[str, Replica]] = {
            p.inference_pool or p.name: {} for p in self._settings.pools
            if p.inference_pool or p.name}

        def add(pool: str, replica: Replica) -> None:
            into = by_pool.setdefault(pool, {})
            current = into.get(replica.address)
            if current is None or _preferred(replica, current):
                into[replica.address] = replica

        for watch in self._pod_watches:
            for result in watch.results():
                if result.replica is not None:
                    add(result.pool, result.replica)
        for name, replica in self._inference_pool_replicas():
            add(name, replica)
        # Sorted: control-plane replicas must compute the same snapshot from the same pods.
        return tuple(
            Pool(name=name, replicas=tuple(sorted(replicas.values(), key=_address_key)))
            for name, replicas in sorted(by_pool.items())
        )

    def _inference_pool_replicas(self) -> list[tuple[str, Replica]]:
        members: dict[str, list[inferencepools.PodMember]] = {}
        for member_watch in self._member_watches:
            for member in member_watch.results():
                members.setdefault(member.namespace, []).append(member)
        found: list[tuple[str, Replica]] = []
        reported: dict[str, tuple[Problem, ...]] = {}
        for watch in self._pool_watches:
            for pool in watch.results():
                if pool.problem or not self._wanted(pool):
                    continue
                for member in members.get(pool.namespace, ()):
                    if pool.selects(member):
                        reported[member.uid] = self._report_member(member)
                found.extend((pool.name, r) for r in inferencepools.replicas(
                    pool, members.get(pool.namespace, ())))
        # Forget pods no pool selects any more: a later match reports them afresh.
        self._member_problems = reported
        return found

    def _wanted(self, pool: inferencepools.InferencePool) -> bool:
        s = self._settings
        if s.inference_pools and (not s.namespaces or pool.namespace in s.namespaces):
            return True
        return any(p.inference_pool == pool.name
                   and (not p.namespaces or pool.namespace in p.namespaces) for p in s.pools)

    def _report_member(self, member: inferencepools.PodMember) -> tuple[Problem, ...]:
        """A selected pod's bad metadata, once per change (unselected pods are not ours)."""
        problems = member.result.problems
        if problems != self._member_problems.get(member.uid, ()):
            self._report(member.result, None)
        return problems

    def _report_pool(self, pool: inferencepools.InferencePool,
                     before: inferencepools.InferencePool | None) -> None:
        if pool.problem and (before is None or before.problem != pool.problem):
            log.warning("InferencePool %s ignored: %s", pool.key, pool.problem)
            self._metrics.source_errors.labels(SOURCE, "bad_inferencepool").inc()

    def _report(self, result: PodReplica, before: PodReplica | None) -> None:
        """Warn about bad metadata once per change, not on every event or relist."""
        if not result.problems or (before is not None and before.problems == result.problems):
            return
        for problem in result.problems:
            log.warning("pod %s: %s", result.pod, problem.message)
            self._metrics.source_errors.labels(
                SOURCE, "bad_" + problem.key.replace("-", "_")).inc()


def _pods(core: client.CoreV1Api, namespace: str) -> Any:
    """The list call of pods in `namespace` ("": every namespace)."""
    if namespace:
        return lambda **kwargs: core.list_namespaced_pod(namespace, **kwargs)
    return lambda **kwargs: core.list_pod_for_all_namespaces(**kwargs)


def _inference_pools(custom: client.CustomObjectsApi, namespace: str) -> Any:
    """The list call of InferencePools (the custom objects API) in `namespace` ("": all)."""
    g, v, plural = inferencepools.GROUP, inferencepools.VERSION, inferencepools.PLURAL
    if namespace:
        return lambda **kwargs: custom.list_namespaced_custom_object(
            g, v, namespace, plural, **kwargs)
    return lambda **kwargs: custom.list_cluster_custom_object(g, v, plural, **kwargs)


def _inference_pool_namespaces(settings: KubernetesSettings) -> tuple[str, ...]:
    """Where InferencePools (and their pods) are watched; ("",) is every namespace."""
    wanted: set[str] = set()
    if settings.inference_pools:
        wanted.update(settings.namespaces or ("",))
    for pool in settings.pools:
        if pool.inference_pool:
            wanted.update(pool.namespaces or ("",))
    return ("",) if "" in wanted else tuple(sorted(wanted))


def _preferred(new: Replica, current: Replica) -> bool:
    """Two pods on one address (an IP reused while the old pod terminates): the live one."""
    rank = {ReplicaState.READY: 0, ReplicaState.DRAINING: 1}
    return (rank[new.state], new.origin) < (rank[current.state], current.origin)


def _address_key(replica: Replica) -> tuple[str, int]:
    return replica.host, replica.port
