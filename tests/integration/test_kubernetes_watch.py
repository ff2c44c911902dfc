"""Kubernetes discovery through the official client against the fake API server.

The source runs as it does in production (watch threads, the official client, a kubeconfig);
only the API server is fake, and it speaks the real list/watch protocol.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.fakekube import FakeKube, Pod, make_pod
from xds_server.metrics import Metrics
from xds_server.model import Pool, ReplicaState
from xds_server.settings import KubernetesPool, KubernetesSettings
from xds_server.sources.kubernetes import KubernetesSource
from xds_server.state import State


class RecordingState(State):
    """The hub, remembering every picture a source handed it (a test double of the reader)."""

    def __init__(self) -> None:
        super().__init__()
        self.pictures: list[set[str]] = []
        self._lock = threading.Lock()

    def set_pools(self, source: str, pools: Iterable[Pool]) -> bool:
        pools = tuple(pools)
        self.pictures.append({r.address for p in pools for r in p.replicas})
        return super().set_pools(source, pools)

    def addresses(self, state: ReplicaState | None = None) -> set[str]:
        return {r.address for p in self.pools for r in p.replicas
                if state is None or r.state is state}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def settings(kube: FakeKube, tmp_path: Path) -> KubernetesSettings:
    return KubernetesSettings(
        enabled=True,
        kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig"),
        pools=(KubernetesPool(name="qwen3", selector="app=vllm", namespaces=("default",)),),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )


class Discovery:
    def __init__(self, state: RecordingState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    def errors(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "hybridlb_source_errors_total", {"source": "kubernetes", "reason": reason})
        return value or 0.0


@asynccontextmanager
async def discovery(settings: KubernetesSettings) -> AsyncIterator[Discovery]:
    state, metrics = RecordingState(), Metrics()
    source = KubernetesSource(settings=settings, state=state, metrics=metrics)
    task = asyncio.create_task(source.run())
    try:
        yield Discovery(state, metrics)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Wait (without blocking the loop) until `predicate` holds; a bound, not an assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def vllm_pod(name: str, port: int, **kwargs: Any) -> Pod:
    annotations = {"hybridlb.io/port": str(port), **kwargs.pop("annotations", {})}
    return make_pod(name, annotations=annotations, **kwargs)


def ready_addresses(kube: FakeKube) -> set[str]:
    """What the server says should be routed (the oracle: computed without the code under
    test)."""
    return {f"{p['status']['podIP']}:{p['metadata']['annotations']['hybridlb.io/port']}"
            for p in kube.pods()
            if p["status"]["conditions"][0]["status"] == "True"
            and not p["metadata"].get("deletionTimestamp")}


async def test_pods_added_modified_and_removed_reach_the_state(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(vllm_pod("a", 8001), vllm_pod("b", 8002, node="node-b"),
                vllm_pod("other", 8009, labels={"app": "something-else"}),
                vllm_pod("elsewhere", 8008, namespace="other-ns"))
    async with discovery(settings) as d:
        assert not d.state.synced  # readiness waits for the first list
        await until(lambda: d.state.synced, "first list")
        assert d.state.addresses() == {"127.0.0.1:8001", "127.0.0.1:8002"}
        (pool,) = d.state.pools
        assert pool.name == "qwen3" and pool.nodes == ("node-a", "node-b")
        assert {r.origin for r in pool.replicas} == {"pod default/a", "pod default/b"}

        kube.create(vllm_pod("c", 8003))
        await until(lambda: "127.0.0.1:8003" in d.state.addresses(), "added pod")

        def move(pod: Pod) -> None:
            pod["metadata"]["annotations"]["hybridlb.io/port"] = "8013"
        kube.update("default", "c", move)
        await until(lambda: d.state.addresses() == {
            "127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8013"}, "modified pod")

        def unready(pod: Pod) -> None:
            pod["status"]["conditions"][0]["status"] = "False"
        kube.update("default", "b", unready)
        await until(lambda: "127.0.0.1:8002" not in d.state.addresses(), "unready pod")

        def relabel(pod: Pod) -> None:  # it leaves the selector: the watch sees it deleted
            pod["metadata"]["labels"]["app"] = "retired"
        kube.update("default", "a", relabel)
        kube.delete(("default", "c"))
        await until(lambda: d.state.addresses() == set(), "removed pods")
        assert [p.name for p in d.state.pools] == ["qwen3"]  # a configured pool stays


async def test_draining_pod_is_kept_until_it_is_gone(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(vllm_pod("a", 8001), vllm_pod("b", 8002))
    async with discovery(settings) as d:
        await until(lambda: len(d.state.addresses()) == 2, "pods")
        kube.terminate("default", "a")
        await until(lambda: d.state.addresses(ReplicaState.DRAINING) == {"127.0.0.1:8001"},
                    "draining")

        def stop_serving(pod: Pod) -> None:  # vLLM fails its readiness probe while draining
            pod["status"]["conditions"][0]["status"] = "False"
        kube.update("default", "a", stop_serving)
        kube.create(vllm_pod("c", 8003))
        await until(lambda: "127.0.0.1:8003" in d.state.addresses(), "later event")
        assert d.state.addresses(ReplicaState.DRAINING) == {"127.0.0.1:8001"}
        kube.delete(("default", "a"))
        await until(lambda: d.state.addresses() == {"127.0.0.1:8002", "127.0.0.1:8003"},
                    "deleted")


async def test_dropped_watch_resumes_from_the_last_resource_version(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(vllm_pod("a", 8001))
    async with discovery(settings) as d:
        await until(lambda: d.state.synced, "first list")
        kube.create(vllm_pod("b", 8002))
        await until(lambda: "127.0.0.1:8002" in d.state.addresses(), "b")
        last_seen = str(kube.resource_version)
        await until(lambda: kube.open_watches() == 1, "watch open")
        kube.hold_watches()
        kube.drop_watches()
        kube.create(vllm_pod("c", 8003))  # while the client cannot reconnect
        kube.release_watches()
        await until(lambda: "127.0.0.1:8003" in d.state.addresses(), "c after the drop")
        resumed = [w.params.get("resourceVersion") for w in kube.watches()]
        assert resumed[-1] == last_seen
        assert len(kube.lists()) == 1  # a drop is no reason to relist
        assert d.errors("watch_error") >= 1


async def test_bookmarks_advance_the_resource_version(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(vllm_pod("a", 8001))
    # Short server-side watches: each new watch request shows what version the client holds.
    async with discovery(replace(settings, watch_timeout_s=1)) as d:
        await until(lambda: d.state.synced, "first list")
        assert all(w.params.get("allowWatchBookmarks") == "true" for w in kube.watches())
        # Changes the watch does not see still move the server's version on.
        kube.create(*(vllm_pod(f"x{i}", 9000 + i, namespace="other") for i in range(5)))
        target = str(kube.resource_version)
        await until(lambda: kube.open_watches() == 1, "watch open")
        assert kube.bookmark() == 1
        await until(lambda: any(w.params.get("resourceVersion") == target
                                for w in kube.watches()), "a watch resumed from the bookmark")
        # History up to the bookmark can now go: resuming needs no relist.
        kube.compact()
        kube.drop_watches()
        kube.create(vllm_pod("b", 8002))
        await until(lambda: "127.0.0.1:8002" in d.state.addresses(), "b")
        assert len(kube.lists()) == 1
        assert d.errors("expired") == 0


async def test_gone_relists_without_ghosts(kube: FakeKube, settings: KubernetesSettings) -> None:
    kube.create(vllm_pod("a", 8001), vllm_pod("b", 8002))
    async with discovery(settings) as d:
        await until(lambda: len(d.state.addresses()) == 2, "pods")
        await until(lambda: kube.open_watches() == 1, "watch open")
        # While the watch is down, b goes and c comes, and the history is compacted away.
        kube.hold_watches()
        kube.drop_watches()
        kube.delete(("default", "b"))
        kube.create(vllm_pod("c", 8003))
        kube.compact()
        kube.release_watches()
        await until(lambda: d.state.addresses() == {"127.0.0.1:8001", "127.0.0.1:8003"},
                    "relisted state")
        assert len(kube.lists()) == 2 and d.errors("expired") == 1
        # Every picture handed over kept the pod that never left.
        assert all("127.0.0.1:8001" in seen for seen in d.state.pictures)


async def test_churn_of_a_thousand_pods_with_a_drop_and_a_gone(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    def pod(i: int) -> Pod:
        return vllm_pod(f"p{i}", 8000, ip=f"10.0.{i // 250}.{i % 250 + 1}",
                        node=f"node-{i % 16}")

    kube.create(*(pod(i) for i in range(1000)))
    stable = {f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(0, 1000, 3)}
    churned = [i for i in range(1000) if i % 3]
    async with discovery(settings) as d:
        await until(lambda: len(d.state.addresses()) == 1000, "1,000 pods", 30)
        synced_at = len(d.state.pictures)

        def churn() -> None:
            new = iter(range(1000, 2000))
            for round_ in range(8):
                batch = churned[round_ * 40:(round_ + 1) * 40]
                kube.delete(*(("default", f"p{i}") for i in batch[:20]))
                for i in batch[20:30]:
                    kube.update("default", f"p{i}", lambda p: p["metadata"]["labels"].update(
                        {"generation": "2"}))
                for i in batch[30:]:
                    kube.update("default", f"p{i}", lambda p: p["status"]["conditions"][0]
                                .update({"status": "False"}))
                kube.create(*(pod(next(new)) for _ in range(20)))
                if round_ == 2:
                    kube.drop_watches()
                if round_ == 4:  # an outage: the client misses rounds 5 and 6
                    kube.hold_watches()
                    kube.drop_watches()
                if round_ == 6:  # history compacted; an open watch would be told it is gone
                    kube.compact()
                    kube.expire_watches()
                    kube.release_watches()

        await asyncio.to_thread(churn)
        expected = ready_addresses(kube)
        await until(lambda: d.state.addresses() == expected, "the server's state", 30)
        assert len(kube.lists()) >= 2  # the 410 was answered with a relist
        assert d.errors("expired") >= 1
        missing = [stable - seen for seen in d.state.pictures[synced_at:] if stable - seen]
        assert missing == []


async def test_errors_back_off_and_readiness_waits(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(vllm_pod("a", 8001))
    kube.fail_next(500, 503, 500)
    async with discovery(settings) as d:
        await until(lambda: d.state.synced, "first list after errors")
        assert d.state.addresses() == {"127.0.0.1:8001"}
        assert d.errors("list_error") == 3
        assert len(kube.lists()) == 4


async def test_bad_metadata_warns_once_and_the_others_stay(
    kube: FakeKube, settings: KubernetesSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="xds_server.sources.kubernetes")
    kube.create(
        vllm_pod("good-1", 8001),
        make_pod("bad", annotations={"hybridlb.io/port": "eighty",
                                     "hybridlb.io/dp-size-local": "-2"},
                 args=["vllm", "serve", "m", "--port", "8003"]),
        vllm_pod("good-2", 8002),
    )
    async with discovery(settings) as d:
        await until(lambda: d.state.synced, "first list")
        assert d.state.addresses() == {"127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"}
        bad = d.state.replica("qwen3", "127.0.0.1:8003")
        assert bad is not None and bad.capacity == 1
        warnings = [r.getMessage() for r in caplog.records]
        assert any("default/bad" in w and "'eighty'" in w for w in warnings)
        assert d.errors("bad_port") == 1 and d.errors("bad_dp_size_local") == 1
        # The same problem on the next event is not repeated.
        kube.update("default", "bad", lambda p: p["metadata"]["labels"].update({"x": "y"}))
        kube.create(vllm_pod("good-3", 8004))
        await until(lambda: "127.0.0.1:8004" in d.state.addresses(), "later pod")
        assert d.errors("bad_port") == 1


async def test_unannotated_vllm_pods_and_several_pools(
    kube: FakeKube, settings: KubernetesSettings
) -> None:
    kube.create(
        make_pod("qwen-0", namespace="ml", ip="10.0.0.1", labels={"app": "qwen"},
                 command=["vllm", "serve", "Qwen/Qwen3-0.6B", "--port=8100", "-dp", "4",
                          "-dpl", "2", "-dpr", "2", "--data-parallel-hybrid-lb",
                          "--max-num-seqs", "64"]),
        make_pod("llama-0", namespace="team", ip="10.0.0.2", labels={"app": "llama"},
                 args=["vllm", "serve", "/models/llama", "--served-model-name", "llama"],
                 ports=[{"name": "http", "containerPort": 8200}]),
    )
    pools = (
        KubernetesPool(selector="app=qwen", namespaces=("ml",)),
        KubernetesPool(selector="app=llama"),  # every namespace
        KubernetesPool(name="mistral", selector="app=mistral", namespaces=("ml", "team")),
    )
    async with discovery(replace(settings, pools=pools)) as d:
        await until(lambda: len(d.state.addresses()) == 2, "pods of both pools")
        by_name = {p.name: p for p in d.state.pools}
        assert sorted(by_name) == ["Qwen/Qwen3-0.6B", "llama", "mistral"]
        (qwen,) = by_name["Qwen/Qwen3-0.6B"].replicas
        assert (qwen.address, qwen.capacity, qwen.dp_rank, qwen.max_num_seqs) == (
            "10.0.0.1:8100", 2, 2, 64)
        (llama,) = by_name["llama"].replicas
        assert (llama.address, llama.max_num_seqs) == ("10.0.0.2:8200", None)
        assert by_name["mistral"].replicas == ()
        # Watches reconnect (server-side timeouts, a list between two watches): wait for all.
        await until(lambda: {w.namespace for w in kube.watches()} == {"ml", "team", ""},
                    "a watch in each namespace and one across all")
