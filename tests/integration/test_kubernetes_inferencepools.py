"""InferencePools (inference.networking.k8s.io/v1) as pools, through the official client's
custom objects API against the fake API server, which serves them with the real list/watch
protocol (the same 410, bookmark and paging rules as pods)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.fakekube import FakeKube, Obj, make_inference_pool, make_pod
from tests.harness import ControlPlane, free_ports, running, wait_for
from tests.integration.test_kubernetes_watch import (
    discovery,
    kube,  # noqa: F401  (fixture)
    settings,  # noqa: F401  (fixture)
    until,
)
from xds_server.model import Pool, ReplicaState
from xds_server.settings import KubernetesPool, KubernetesSettings


def gie(base: KubernetesSettings, **changes: Any) -> KubernetesSettings:
    """`serve --kubernetes --inference-pools --namespace default`."""
    return replace(base, pools=(), inference_pools=True, namespaces=("default",),
                   **changes)


def engine(name: str, ip: str, *, model: str = "qwen3", ready: bool = True,
           namespace: str = "default", **kwargs: Any) -> Obj:
    """A vLLM pod as a GIE user labels it; no hybridlb.io metadata at all."""
    return make_pod(name, ip=ip, namespace=namespace, ready=ready,
                    labels={"model": model}, args=["vllm", "serve", "Qwen/Qwen3-0.6B"],
                    **kwargs)


def pools(state: Any) -> dict[str, dict[str, ReplicaState]]:
    pools: tuple[Pool, ...] = state.pools
    return {p.name: {r.address: r.state for r in p.replicas} for p in pools}


READY, DRAINING = ReplicaState.READY, ReplicaState.DRAINING


async def test_every_target_port_of_every_selected_ready_pod_is_a_replica(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.create(
        make_inference_pool("qwen3", match_labels={"model": "qwen3"}, ports=[8001, 8002]),
        make_inference_pool("llama", match_labels={"model": "llama"}),
        make_inference_pool("elsewhere", namespace="other", match_labels={"model": "qwen3"}),
        engine("q-0", "10.0.0.1"), engine("q-1", "10.0.0.2", ready=False),
        engine("l-0", "10.0.0.3", model="llama"),
        engine("q-other", "10.0.0.9", namespace="other"),  # not a watched namespace
        make_pod("epp", ip="10.0.0.8", labels={"app": "epp"}),  # selected by no pool
    )
    async with discovery(gie(settings)) as d:
        await until(lambda: d.state.synced, "first lists")
        assert pools(d.state) == {
            "qwen3": {"10.0.0.1:8001": READY, "10.0.0.1:8002": READY},
            "llama": {"10.0.0.3:8000": READY},
        }
        (first, second) = next(p for p in d.state.pools if p.name == "qwen3").replicas
        # One vLLM server per port is one DP rank each; capacity 1 unless the pod says more.
        assert (first.dp_rank, second.dp_rank, first.capacity) == (0, 1, 1)
        assert first.origin == "pod default/q-0"

        # Pod status and deletion are handled as for any pod.
        kube.update("default", "q-1", lambda p: p["status"]["conditions"][0].update(
            {"status": "True"}))
        await until(lambda: "10.0.0.2:8001" in pools(d.state)["qwen3"], "q-1 ready")
        kube.terminate("default", "q-0")
        await until(lambda: pools(d.state)["qwen3"].get("10.0.0.1:8002") is DRAINING,
                    "q-0 draining")
        kube.delete(("default", "q-0"))
        await until(lambda: set(pools(d.state)["qwen3"]) == {"10.0.0.2:8001", "10.0.0.2:8002"},
                    "q-0 gone")

        # The pool's own changes: a new port set, a selector that takes other pods, deletion.
        def one_port(pool: Obj) -> None:
            pool["spec"]["targetPorts"] = [{"number": 9000}]
        kube.update("default", "qwen3", one_port, resource="inferencepools")
        await until(lambda: set(pools(d.state)["qwen3"]) == {"10.0.0.2:9000"}, "new ports")
        kube.delete(("default", "llama"), resource="inferencepools")
        await until(lambda: "llama" not in pools(d.state), "llama's pool deleted")
        assert d.errors("bad_pool") == 0  # the pool name comes from the InferencePool


async def test_inference_pool_watch_resumes_and_relists_like_pods(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.create(make_inference_pool("qwen3", match_labels={"model": "qwen3"}),
                engine("q-0", "10.0.0.1"))
    async with discovery(gie(settings)) as d:
        await until(lambda: d.state.synced, "first lists")
        await until(lambda: kube.open_watches() == 2, "a watch of pools and one of pods")
        gie_watches = [w for w in kube.watches() if w.resource == "inferencepools"]
        assert gie_watches and all(w.params.get("allowWatchBookmarks") == "true"
                                   for w in gie_watches)
        # While the watches are down a pool comes and the history is compacted: 410, relist.
        kube.hold_watches()
        kube.drop_watches()
        kube.create(make_inference_pool("llama", match_labels={"model": "llama"}),
                    engine("l-0", "10.0.0.3", model="llama"))
        kube.compact()
        kube.release_watches()
        await until(lambda: pools(d.state).get("llama") == {"10.0.0.3:8000": READY},
                    "the pool created during the outage")
        assert d.errors("expired") == 2  # the pools' watch and the pods' watch
        assert len([r for r in kube.lists() if r.resource == "inferencepools"]) == 2


async def test_config_names_inference_pools_one_by_one(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.create(make_inference_pool("qwen3", match_labels={"model": "qwen3"}),
                make_inference_pool("llama", match_labels={"model": "llama"}),
                engine("q-0", "10.0.0.1"), engine("l-0", "10.0.0.3", model="llama"))
    named = (KubernetesPool(inference_pool="qwen3", namespaces=("default",)),
             KubernetesPool(inference_pool="mistral", namespaces=("default",)))
    async with discovery(replace(settings, pools=named)) as d:
        await until(lambda: d.state.synced, "first lists")
        # llama is not named; mistral is named but has no InferencePool yet: empty.
        assert pools(d.state) == {"qwen3": {"10.0.0.1:8000": READY}, "mistral": {}}
        kube.create(make_inference_pool("mistral", match_labels={"model": "qwen3"}))
        await until(lambda: pools(d.state)["mistral"] == {"10.0.0.1:8000": READY},
                    "mistral's InferencePool")


async def test_a_malformed_inference_pool_is_counted_and_the_others_stay(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    bad = make_inference_pool("bad", match_labels={"model": "qwen3"})
    bad["spec"]["selector"] = {}  # would take every pod of the namespace
    kube.create(bad, make_inference_pool("qwen3", match_labels={"model": "qwen3"}),
                engine("q-0", "10.0.0.1"))
    async with discovery(gie(settings)) as d:
        await until(lambda: d.state.synced, "first lists")
        assert pools(d.state) == {"qwen3": {"10.0.0.1:8000": READY}}
        assert d.errors("bad_inferencepool") == 1


def test_serve_takes_its_pools_from_inference_pools(tmp_path: Path) -> None:
    with FakeKube() as server:
        server.create(make_inference_pool("qwen3", match_labels={"model": "qwen3"},
                                          ports=[8001, 8002]),
                      engine("q-0", "10.0.0.1"))
        cp = ControlPlane(
            tmp_path, None, listener_port=free_ports(1)[0],
            source=["--kubernetes", "--kubeconfig", str(server.write_kubeconfig(
                tmp_path / "kubeconfig")), "--namespace", "default", "--inference-pools"],
            extra=["--metrics", "none"])
        with running(cp):
            # Ready means listed; the snapshot follows a moment later.
            wait_for(lambda: cp.state()["pools"] != [], 20, "the pool published")
            (pool,) = cp.state()["pools"]
            assert pool["name"] == "qwen3"
            assert [r["address"] for r in pool["replicas"]] == ["10.0.0.1:8001",
                                                                "10.0.0.1:8002"]
            server.delete(("default", "qwen3"), resource="inferencepools")
            wait_for(lambda: cp.state()["pools"] == [], 20, "the pool deleted")


async def test_without_the_crd_selector_pools_go_on_and_the_404_is_reported(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.crd_installed(False)
    kube.create(make_pod("a", ip="10.0.0.1", annotations={"hybridlb.io/port": "8001"}))
    named = (*settings.pools, KubernetesPool(inference_pool="llama", namespaces=("default",)))
    async with discovery(replace(settings, pools=named)) as d:
        await until(lambda: d.state.synced, "the selector pool published")
        assert pools(d.state) == {"qwen3": {"10.0.0.1:8001": READY}, "llama": {}}
        (what, why), = d.state.problems.items()
        assert what == "inferencepools in default"
        assert why == "HTTP 404 Not Found: the server could not find the requested resource"
        kube.crd_installed(True)
        kube.create(make_inference_pool("llama", match_labels={"model": "llama"}),
                    engine("l-0", "10.0.0.2", model="llama"))
        await until(lambda: pools(d.state)["llama"] == {"10.0.0.2:8000": READY},
                    "the pool's pods")
        assert not d.state.problems
