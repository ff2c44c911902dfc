"""Kubernetes discovery when the API server fails: an outage then 410 Gone, a silent watch,
a namespace the control plane may not read. The fake API server speaks the real protocol;
the client is the official one."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.fakekube import FakeKube, make_pod
from tests.harness import ControlPlane, free_ports, running, wait_for
from tests.integration.test_kubernetes_watch import (
    discovery,
    kube,  # noqa: F401  (fixture)
    settings,  # noqa: F401  (fixture)
    until,
    vllm_pod,
)
from xds_server.settings import KubernetesPool, KubernetesSettings
from xds_server.sources.listwatch import Retry


def test_errors_back_off_and_count_up_but_a_gone_relists_at_once() -> None:
    retry = Retry(initial_s=1.0, max_s=8.0)
    outage = [retry.error() for _ in range(6)]  # the API server restarting
    assert outage[-1] >= 4.0 and retry.errors == 6
    # It answers again, with 410 Gone for the old resourceVersion: relist now, not after
    # the outage's backoff.
    assert retry.gone() == 0.0 and retry.errors == 0
    # A fresh list whose watch expires at once again: the server is struggling.
    retry.listed()
    assert retry.gone() > 0.0
    retry.watched()  # a watch that worked resets it
    assert retry.gone() == 0.0
    assert retry.error() <= 1.0  # errors start over from the first step


async def test_gone_after_an_outage_relists_and_counts_apart_from_errors(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.create(vllm_pod("a", 8001), vllm_pod("b", 8002))
    async with discovery(replace(settings, backoff_initial_s=0.01, backoff_max_s=0.1)) as d:
        await until(lambda: len(d.state.addresses()) == 2, "pods")
        await until(lambda: kube.open_watches() == 1, "watch open")
        # The API server goes away: every request fails; meanwhile b goes, c comes and the
        # history is compacted, so the first watch after the outage gets 410 Gone.
        kube.hold_watches()
        kube.fail_next(*[503] * 6)
        kube.drop_watches()
        kube.delete(("default", "b"))
        kube.create(vllm_pod("c", 8003))
        kube.compact()
        kube.release_watches()
        await until(lambda: d.state.addresses() == {"127.0.0.1:8001", "127.0.0.1:8003"},
                    "the state after the outage")
        # The cut and six refused requests are errors; the 410 is counted apart.
        assert d.errors("watch_error") == 7
        assert d.errors("expired") == 1
        assert len(kube.lists()) == 2


async def test_a_silent_watch_is_resumed_after_the_configured_silence(
    kube: FakeKube, settings: KubernetesSettings  # noqa: F811
) -> None:
    kube.create(vllm_pod("a", 8001))
    async with discovery(replace(settings, watch_silence_s=0.5, watch_timeout_s=300)) as d:
        await until(lambda: d.state.synced, "first list")
        listed_at = str(kube.resource_version)
        # The server sends nothing (no event, no bookmark): the client gives the connection
        # up after the silence and resumes where it was, without a relist.
        await until(lambda: d.errors("watch_silent") >= 1, "the silent watch given up")
        await until(lambda: len(kube.watches()) >= 2, "a second watch")
        assert all(w.params.get("resourceVersion") == listed_at for w in kube.watches())
        assert all(w.params.get("allowWatchBookmarks") == "true" for w in kube.watches())
        assert len(kube.lists()) == 1
        kube.create(vllm_pod("b", 8002))
        await until(lambda: "127.0.0.1:8002" in d.state.addresses(), "b")


def test_default_silence_bound_is_about_one_bookmark_period() -> None:
    assert 60 < KubernetesSettings().watch_silence_s <= 120


async def test_a_forbidden_namespace_does_not_hold_the_others_back(
    kube: FakeKube, settings: KubernetesSettings,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    kube.forbid("team-b")
    kube.create(vllm_pod("a", 8001), vllm_pod("b", 8002, namespace="team-b", ip="127.0.0.2"))
    pools = (KubernetesPool(name="qwen3", selector="app=vllm",
                            namespaces=("default", "team-b")),)
    async with discovery(replace(settings, pools=pools, backoff_max_s=0.1)) as d:
        await until(lambda: d.state.synced, "the namespace it may read, published")
        assert d.state.addresses() == {"127.0.0.1:8001"}
        (what, why), = d.state.problems.items()
        assert "team-b" in what
        assert 'cannot list resource "pods" in API group "" in the namespace "team-b"' in why
        assert any('cannot list resource "pods"' in r.getMessage() for r in caplog.records)
        up = {ns: d.metrics.registry.get_sample_value(
            "hybridlb_kubernetes_watch_up",
            {"resource": "pods", "namespace": ns, "selector": "app=vllm"})
            for ns in ("default", "team-b")}
        assert up == {"default": 1.0, "team-b": 0.0}
        # RBAC fixed: the namespace joins in, and nothing is reported any more.
        kube.allow("team-b")
        await until(lambda: "127.0.0.2:8002" in d.state.addresses(), "team-b's pod")
        await until(lambda: not d.state.problems, "the problem cleared")


@pytest.fixture
def server() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


def test_serve_is_ready_with_a_forbidden_namespace_and_says_why(
    server: FakeKube, tmp_path: Path
) -> None:
    server.forbid("team-b")
    server.create(make_pod("a", annotations={"hybridlb.io/port": "8001"},
                           args=["vllm", "serve", "m", "--served-model-name", "qwen3"]))
    cp = ControlPlane(
        tmp_path, None, listener_port=free_ports(1)[0],
        source=["--kubernetes", "--kubeconfig", str(server.write_kubeconfig(
            tmp_path / "kubeconfig")), "--namespace", "default", "--namespace", "team-b",
            "--selector", "app=vllm"],
        extra=["--metrics", "none"])
    with running(cp):  # waits for /readyz 200: never, before, with one namespace refused
        ready = httpx.get(f"{cp.admin}/readyz")
        assert ready.status_code == 200
        assert "failing: pods in team-b (app=vllm): HTTP 403 Forbidden: pods is forbidden" \
            in ready.text
        # Ready means listed; the snapshot follows a moment later.
        wait_for(lambda: [r["address"] for p in cp.state()["pools"] for r in p["replicas"]]
                 == ["127.0.0.1:8001"], 20, "the readable namespace's pod published")
        state = cp.state()
        assert "pods in team-b (app=vllm)" in state["problems"]
        assert cp.metric("hybridlb_kubernetes_watch_up", namespace="team-b") == 0.0
        assert 'cannot list resource "pods"' in cp.output()
        status = subprocess.run(
            [sys.executable, "-m", "xds_server", "status", "--admin", cp.admin],
            capture_output=True, text=True, check=True).stdout
        assert "failing: pods in team-b (app=vllm): HTTP 403 Forbidden" in status
