"""A terminating pod drains with a real generation in flight: fake API → control plane → Envoy
→ simulated vLLM.

test_kubernetes_envoy.py walks the lifecycle with echo upstreams, whose requests end at
once; what draining is for is the request that does not: a long streamed completion must
run to its last token on the terminating pod while every new request goes elsewhere. The
pods here point at `hybridlb sim` replicas (pod IP 127.0.0.1, the replica's port through
`hybridlb.io/port`), so the long request is a real token stream from a vLLM-shaped server.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakekube import FakeKube, Pod, make_pod
from tests.harness import ControlPlane, Envoy, Sim, Traffic, free_ports, running, wait_for

pytestmark = pytest.mark.envoy

MODEL = "Qwen/Qwen3-0.6B"
POOL = "qwen3"
MAX_TOKENS = 300
# Every engine step of the pod that drains takes this many times longer, so its stream is
# still running however slow the machine is; the test lifts it once it has checked the drain.
HOLD_SLOWDOWN = 50.0


class Stream:
    """One streamed completion through Envoy, read in a thread: its replica, status, text."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.replica = ""
        self.status = 0
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": MODEL, "prompt": "a long answer, please", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(timeout=httpx.Timeout(10.0, read=120.0)) as client, \
                    client.stream("POST", f"{self.url}/v1/completions", json=body,
                                  headers={"x-model": POOL}) as response:
                self.status = response.status_code
                self.replica = response.headers.get("x-hybridlb-replica", "")
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()
            self.done.set()

    def start(self) -> Stream:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def text(self) -> str:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return "".join(c["choices"][0]["text"] for c in chunks)

    def finish_reason(self) -> str | None:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        reason: str | None = chunks[-1]["choices"][0]["finish_reason"] if chunks else None
        return reason


class Cluster:
    def __init__(self, workdir: Path, kube: FakeKube) -> None:
        self.kube = kube
        self.sim = Sim(workdir, replicas=3)
        kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig")
        self.cp = ControlPlane(
            workdir, None, listener_port=free_ports(1)[0],
            source=["--kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", "default",
                    "--selector", "app=vllm"],
            # Capacity-only weights: which replica gets the new requests should depend on
            # the lifecycle alone, not on the load the long request puts on its replica.
            extra=["--metrics", "none"],
        )
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port, node="")

    def address(self, i: int) -> str:
        return self.sim.addresses[i]

    def pod(self, name: str, i: int, *, node: str = "node-a") -> Pod:
        port = self.address(i).rsplit(":", 1)[1]
        return make_pod(name, node=node, annotations={"hybridlb.io/port": port},
                        args=["vllm", "serve", MODEL, "--served-model-name", POOL])

    def envoy_hosts(self) -> dict[str, set[str]]:
        """`address -> health flags` of the pool's global cluster, from Envoy's /clusters."""
        hosts: dict[str, set[str]] = {}
        for line in httpx.get(f"{self.envoy.admin}/clusters").text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == POOL and parts[2] == "health_flags":
                hosts[parts[1]] = set(filter(None, parts[3].split("/"))) - {"healthy"}
        return hosts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("kubernetes-lifecycle")
    with FakeKube() as kube:
        c = Cluster(workdir, kube)
        with running(c.sim):
            # Only the first pod at first: the long request can only land there.
            kube.create(c.pod("vllm-0", 0))
            with running(c.cp, c.envoy):
                yield c


def test_terminating_pod_finishes_its_long_stream_while_new_requests_go_elsewhere(
    cluster: Cluster,
) -> None:
    c, kube = cluster, cluster.kube
    wait_for(lambda: set(c.envoy_hosts()) == {c.address(0)}, 15, "the first pod in Envoy")
    c.sim.fault(c.address(0), slowdown=HOLD_SLOWDOWN)
    stream = Stream(c.envoy.url).start()
    try:
        assert stream.started.wait(30), "no first token"
        assert stream.error is None and stream.status == 200
        assert stream.replica == c.address(0)

        kube.create(c.pod("vllm-1", 1), c.pod("vllm-2", 2, node="node-b"))
        wait_for(lambda: set(c.envoy_hosts()) == {c.address(i) for i in range(3)}, 15,
                 "the other pods in Envoy")

        with Traffic(c.envoy.url, headers={"x-model": POOL}) as traffic:
            wait_for(lambda: c.address(0) in traffic.served, 15, "the first pod serving")
            # Terminating: draining in Envoy, and no new request reaches the pod.
            kube.terminate("default", "vllm-0")
            wait_for(lambda: c.envoy_hosts().get(c.address(0)) == {"eds_status_draining"},
                     15, "draining in Envoy")
            before = traffic.served.copy()
            wait_for(lambda: sum((traffic.served - before).values()) >= 200, 30,
                     "more traffic")
            after_drain: Counter[str] = traffic.served - before
        assert traffic.failures == []
        assert c.address(0) not in after_drain
        assert set(after_drain) == {c.address(1), c.address(2)}
        # The premise: the long request was in flight through all of that.
        assert not stream.done.is_set(), "the long stream ended before the drain was checked"
        assert c.address(0) in c.envoy_hosts()
    finally:
        c.sim.fault(c.address(0), slowdown=1.0)
        stream.join(60)

    # The long one completed fully on the draining pod: 200, every token, [DONE].
    assert stream.error is None
    assert stream.status == 200 and stream.replica == c.address(0)
    assert stream.events[-1] == "[DONE]"
    assert stream.text().count(" ") == MAX_TOKENS
    assert stream.finish_reason() == "length"

    # Deleted: gone from Envoy; the others keep serving completions.
    kube.delete(("default", "vllm-0"))
    wait_for(lambda: c.address(0) not in c.envoy_hosts(), 15, "deleted pod removed")
    assert set(c.envoy_hosts()) == {c.address(1), c.address(2)}
    r = httpx.post(f"{c.envoy.url}/v1/completions", headers={"x-model": POOL}, timeout=30,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200
    assert r.headers["x-hybridlb-replica"] in {c.address(1), c.address(2)}
