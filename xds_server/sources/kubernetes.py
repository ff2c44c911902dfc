"""Kubernetes discovery: list then watch the vLLM pods of each pool selector.

The official client is blocking, so every (selector, namespace) pair gets its own watch
thread; threads hand changes to the event loop with `call_soon_threadsafe` and the loop only
merges them into the state, so a slow API server never stalls the xDS server.

Each watch follows client-go's reflector: a full list (paged), then a watch from the list's
resourceVersion with bookmarks; a dropped or timed-out watch resumes from the last
resourceVersion seen (bookmarks advance it); 410 Gone relists, and the relist replaces that
watch's pods in one step, so no pod that left lingers and none that stayed blinks out;
errors back off exponentially with jitter; and a periodic relist is the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica, ReplicaState
from xds_server.settings import KubernetesPool, KubernetesSettings
from xds_server.sources.pods import POOL_NAME, PodReplica, pod_to_replica
from xds_server.state import State

log = logging.getLogger(__name__)

SOURCE = "kubernetes"


class KubernetesConfigError(RuntimeError):
    """No usable cluster credentials (no kubeconfig, or not running in a cluster)."""


def backoff_delay(
    failures: int, *, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with jitter: several control planes must not retry in step."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    jitter: float = (rng or random).uniform(0.5, 1.0)
    return ceiling * jitter


_POOL_KEYS = ("name", "namespaces", "selector")


def pools_from_config(value: Any) -> tuple[KubernetesPool, ...]:
    """The config file's `kubernetes_pools:` list; ValueError says where and why."""
    if not isinstance(value, list):
        raise ValueError("expected a list of {name, selector, namespaces}")
    pools: list[KubernetesPool] = []
    for i, raw in enumerate(value):
        where = f"kubernetes_pools[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping with {', '.join(_POOL_KEYS)}")
        unknown = sorted(set(map(str, raw)) - set(_POOL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(_POOL_KEYS)}")
        name = raw.get("name") or ""
        if not isinstance(name, str) or (name and not POOL_NAME.match(name)):
            raise ValueError(f"{where}.name: {name!r} is not a valid pool name")
        if name and any(p.name == name for p in pools):
            raise ValueError(f"{where}.name: pool {name!r} appears twice")
        selector = raw.get("selector")
        if not isinstance(selector, str) or not selector.strip():
            raise ValueError(f"{where}.selector: a label selector is required, e.g. app=vllm")
        namespaces = raw.get("namespaces") or []
        if isinstance(namespaces, str):
            namespaces = [namespaces]
        if not isinstance(namespaces, list) or not all(
                isinstance(n, str) and n for n in namespaces):
            raise ValueError(f"{where}.namespaces: expected a list of namespace names")
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
    watches = sum(max(1, len(p.namespaces)) for p in settings.pools)
    configuration.connection_pool_maxsize = max(4, watches + 2)
    return client.ApiClient(configuration)


class _Expired(Exception):
    """410 Gone: the resourceVersion is compacted away; only a relist can continue."""


class PodWatch:
    """One list+watch loop, run in its own thread: one selector in one namespace (or all)."""

    def __init__(
        self,
        *,
        api: client.CoreV1Api,
        pool: KubernetesPool,
        namespace: str,
        settings: KubernetesSettings,
        metrics: Metrics,
        notify: Callable[[], None],
    ) -> None:
        self._api = api
        self._pool = pool
        self._namespace = namespace
        self._settings = settings
        self._metrics = metrics
        self._notify = notify
        self._lock = threading.Lock()
        self._results: dict[str, PodReplica] = {}  # by pod uid; guarded by _lock
        self._stop = threading.Event()
        self._response: Any = None
        self.resource_version = ""
        self.listed = threading.Event()
        self.where = f"{namespace or 'all namespaces'} {pool.selector or '(every pod)'}"

    def results(self) -> list[PodReplica]:
        with self._lock:
            return list(self._results.values())

    def stop(self) -> None:
        """Ask the thread to end; unblocks a read in progress (any thread may call it)."""
        self._stop.set()
        response = self._response
        if response is not None:
            response.shutdown()

    def run(self) -> None:
        failures = 0
        next_resync = 0.0
        while not self._stop.is_set():
            try:
                if not self.resource_version or time.monotonic() >= next_resync:
                    self._list()
                    # Jittered, so that control-plane replicas do not relist in step.
                    next_resync = time.monotonic() + self._settings.resync_interval_s * (
                        random.uniform(0.9, 1.1))
                    failures = 0
                if self._watch(until=next_resync):
                    failures = 0
            except _Expired as exc:
                log.info("pods in %s: %s; relisting", self.where, exc)
                self._metrics.source_errors.labels(SOURCE, "expired").inc()
                self.resource_version = ""
                failures += 1
                if failures > 1:  # a fresh list expiring at once: the server is struggling
                    self._sleep(failures)
            except Exception as exc:
                if self._stop.is_set():
                    break
                failures += 1
                reason = "list_error" if not self.resource_version else "watch_error"
                self._metrics.source_errors.labels(SOURCE, reason).inc()
                log.warning("pods in %s: %s (%s); retrying", self.where,
                            _describe(exc), reason)
                self._sleep(failures)

    def _sleep(self, failures: int) -> None:
        self._stop.wait(backoff_delay(
            failures, initial_s=self._settings.backoff_initial_s,
            max_s=self._settings.backoff_max_s,
        ))

    def _request(self, **kwargs: Any) -> Any:
        selector = self._pool.selector or None
        if self._namespace:
            return self._api.list_namespaced_pod(
                self._namespace, label_selector=selector, _preload_content=False, **kwargs)
        return self._api.list_pod_for_all_namespaces(
            label_selector=selector, _preload_content=False, **kwargs)

    def _list(self) -> None:
        found: dict[str, PodReplica] = {}
        token: str | None = None
        while True:
            try:
                response = self._request(
                    limit=self._settings.list_page_size, _continue=token,
                    _request_timeout=(self._settings.connect_timeout_s,
                                      self._settings.list_timeout_s))
            except client.ApiException as exc:
                if exc.status == 410:  # the continue token expired
                    raise _Expired("list continuation expired") from exc
                raise
            try:
                doc = json.loads(response.data)
            finally:
                response.release_conn()
            for pod in doc.get("items") or []:
                found[_uid(pod)] = self._convert(pod)
            metadata = doc.get("metadata") or {}
            token = metadata.get("continue") or None
            if token is None:
                break
            if self._stop.is_set():
                return
        with self._lock:
            self._report(found)
            self._results = found
        self.resource_version = str(metadata.get("resourceVersion") or "")
        self.listed.set()
        self._notify()

    def _watch(self, *, until: float) -> bool:
        """Watch until the server ends the stream; returns whether any event arrived."""
        timeout = max(1, min(self._settings.watch_timeout_s, int(until - time.monotonic())))
        try:
            response = self._request(
                watch=True, resource_version=self.resource_version,
                allow_watch_bookmarks=True, timeout_seconds=timeout,
                # A silent connection past the server's own timeout is a dead one.
                _request_timeout=(self._settings.connect_timeout_s, timeout + 30))
        except client.ApiException as exc:
            if exc.status == 410:
                raise _Expired("watch resourceVersion too old") from exc
            raise
        self._response = response
        got_events = False
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if line.strip():
                    self._event(json.loads(line))
                    got_events = True
        finally:
            self._response = None
            response.release_conn()
        return got_events

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(obj.get("message") or "Gone")
            raise RuntimeError(f"watch error {obj.get('code')} {obj.get('reason')}: "
                               f"{obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind in ("ADDED", "MODIFIED"):
            result = self._convert(obj)
            with self._lock:
                self._report({_uid(obj): result})
                self._results[_uid(obj)] = result
        elif kind == "DELETED":
            with self._lock:
                self._results.pop(_uid(obj), None)
        elif kind != "BOOKMARK":
            log.debug("pods in %s: ignoring event type %r", self.where, kind)
        if version:
            self.resource_version = version
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._notify()

    def _convert(self, pod: dict[str, Any]) -> PodReplica:
        return pod_to_replica(pod, default_pool=self._pool.name)

    def _report(self, results: dict[str, PodReplica]) -> None:
        """Warn about bad metadata once per change, not on every event or relist."""
        for uid, result in results.items():
            before = self._results.get(uid)
            if not result.problems or (before is not None and before.problems == result.problems):
                continue
            for problem in result.problems:
                log.warning("pod %s: %s", result.pod, problem.message)
                self._metrics.source_errors.labels(
                    SOURCE, "bad_" + problem.key.replace("-", "_")).inc()


class KubernetesSource:
    """Runs a `PodWatch` thread per pool selector and namespace; merges them into pools."""

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
        self._api_client = api if api is not None else api_client(settings)
        core = client.CoreV1Api(self._api_client)
        self._watches = [
            PodWatch(api=core, pool=pool, namespace=namespace, settings=settings,
                     metrics=metrics, notify=self._wake)
            for pool in settings.pools
            for namespace in (pool.namespaces or ("",))
        ]
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

        def main(watch: PodWatch) -> None:
            try:
                watch.run()
            except BaseException as exc:  # a bug, not the API: take the process down
                loop.call_soon_threadsafe(fail, exc)

        threads = [threading.Thread(target=main, args=(w,), name=f"pods {w.where}", daemon=True)
                   for w in self._watches]
        for thread in threads:
            thread.start()
        log.info("watching pods in %s", "; ".join(w.where for w in self._watches))
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
        if not all(w.listed.is_set() for w in self._watches):
            return  # readiness waits for every selector's first list
        pools = self.pools()
        if self._state.set_pools(SOURCE, pools):
            log.info("pods: %s", ", ".join(
                f"{p.name} ({sum(r.state is ReplicaState.READY for r in p.replicas)} ready, "
                f"{sum(r.state is ReplicaState.DRAINING for r in p.replicas)} draining)"
                for p in pools) or "no pools")

    def pools(self) -> tuple[Pool, ...]:
        """Every watch's replicas merged by pool; configured pools exist even when empty."""
        by_pool: dict[str, dict[str, Replica]] = {p.name: {} for p in self._settings.pools
                                                  if p.name}
        for watch in self._watches:
            for result in watch.results():
                if result.replica is None:
                    continue
                into = by_pool.setdefault(result.pool, {})
                current = into.get(result.replica.address)
                if current is None or _preferred(result.replica, current):
                    into[result.replica.address] = result.replica
        # Sorted: control-plane replicas must compute the same snapshot from the same pods.
        return tuple(
            Pool(name=name, replicas=tuple(sorted(replicas.values(), key=_address_key)))
            for name, replicas in sorted(by_pool.items())
        )


def _preferred(new: Replica, current: Replica) -> bool:
    """Two pods on one address (an IP reused while the old pod terminates): the live one."""
    rank = {ReplicaState.READY: 0, ReplicaState.DRAINING: 1}
    return (rank[new.state], new.origin) < (rank[current.state], current.origin)


def _address_key(replica: Replica) -> tuple[str, int]:
    return replica.host, replica.port


def _uid(pod: dict[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    uid = metadata.get("uid")
    return str(uid) if uid else f"{metadata.get('namespace')}/{metadata.get('name')}"


def _describe(exc: Exception) -> str:
    if isinstance(exc, client.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
