"""Faults under steady load through real Envoys: what fails, how much, and for how long.

Each test runs traffic through an Envoy while one part of the system fails, counts the
requests sent and failed, and writes one figure line (`FAULT name sent=.. failed=..
recover_s=..`) to stdout and to $HYBRIDLB_FAULT_FIGURES when set; the assertions are about
failures (zero unless stated), never about time. Prometheus stopped and started under load
is covered by tests/integration/test_prometheus.py; the xDS-only restart by
test_xds_restart.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fakekube import FakeKube, make_pod
from tests.harness import (
    ControlPlane,
    Envoy,
    Sim,
    Traffic,
    Upstreams,
    free_ports,
    running,
    served_by,
    wait_for,
    write_pools,
)

pytestmark = [pytest.mark.reliability, pytest.mark.envoy]


def figure(name: str, sent: int, failed: int, recover_s: float, **more: object) -> None:
    line = {"fault": name, "sent": sent, "failed": failed, "recover_s": round(recover_s, 2),
            **more}
    print("FAULT", json.dumps(line))
    out = os.environ.get("HYBRIDLB_FAULT_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


def sent(traffic: Traffic) -> int:
    return sum(traffic.served.values()) + len(traffic.failures)


class Completions:
    """Threads posting short completions (each a few engine steps): in-flight work that a
    drain must let finish, unlike the instant GETs of `Traffic`."""

    def __init__(self, url: str, threads: int = 4, max_tokens: int = 150) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.served: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    @property
    def sent(self) -> int:
        return sum(self.served.values()) + len(self.failures)

    def _run(self) -> None:
        body = {"model": "Qwen/Qwen3-0.6B", "prompt": "hello " * 20,
                "max_tokens": self.max_tokens}
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url + "/v1/completions", json=body,
                                    headers={"x-model": "qwen3"})
                    with self._lock:
                        if r.status_code == 200:
                            self.served[r.headers.get("x-hybridlb-replica", "?")] += 1
                        else:
                            self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))

    def __enter__(self) -> Completions:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def streams(cp: ControlPlane) -> float:
    return cp.metric("hybridlb_xds_streams")


def test_killed_control_plane_with_weights_on(tmp_path: Path) -> None:
    """Scrape-driven weights, SIGKILL: Envoy routes on its last weights, then reconnects."""
    sim = Sim(tmp_path, replicas=3, nodes=2)
    cp = ControlPlane(tmp_path, sim.pools, listener_port=free_ports(1)[0],
                      extra=["--metrics", "scrape", "--scrape-interval-s", "0.2"])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port, node="node-a")
    with running(sim, cp, envoy), Traffic(envoy.url) as traffic:
        wait_for(lambda: len(envoy.endpoint_weights("qwen3")) == 3, 15, "weights in Envoy")
        wait_for(lambda: sent(traffic) > 200, 10, "traffic")
        cp.stop(signal.SIGKILL)
        before = sent(traffic)
        wait_for(lambda: sent(traffic) > before + 300, 20, "traffic while down")
        started = time.monotonic()
        cp.start()
        wait_for(lambda: streams(cp) >= 1, 30, "Envoy reconnected")
        recover = time.monotonic() - started
        wait_for(lambda: cp.metric("hybridlb_xds_acks_total") > 0, 10, "an ACK after restart")
        more = sent(traffic)
        wait_for(lambda: sent(traffic) > more + 100, 10, "traffic after restart")
    figure("control plane SIGKILL + restart (weights on)", sent(traffic),
           len(traffic.failures), recover)
    assert traffic.failures == []


def test_two_control_planes_one_killed(tmp_path: Path) -> None:
    """Two replicas of the control plane; the one holding Envoy's stream dies."""
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
    listener = free_ports(1)[0]
    cps = [ControlPlane(tmp_path, pools, listener_port=listener, name=f"cp{i}")
           for i in range(2)]
    envoy = Envoy(tmp_path, xds_port=cps[0].xds_port,
                  bootstrap={"more_xds": [("127.0.0.1", cps[1].xds_port)]})
    upstreams = Upstreams(tmp_path, ports)
    with running(upstreams, *cps, envoy), Traffic(envoy.url) as traffic:
        wait_for(lambda: len(traffic.served) == 2, 15, "traffic on both replicas")
        wait_for(lambda: sum(streams(cp) for cp in cps) == 1, 15, "one stream")
        holder, other = cps if streams(cps[0]) == 1 else cps[::-1]
        holder.stop(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: streams(other) == 1, 60, "Envoy on the other replica")
        recover = time.monotonic() - killed
        # The survivor's config is what Envoy now follows.
        write_pools(pools, [(addresses[1], "node-b"), (addresses[2], "node-c")])
        wait_for(lambda: addresses[2] in served_by(envoy.url, 20), 30, "converged")
        holder.start()  # back, for `running` to stop it
    figure("one of two control planes SIGKILLed", sent(traffic), len(traffic.failures),
           recover)
    assert traffic.failures == []


def test_kubernetes_watch_cut_and_410_under_traffic(tmp_path: Path) -> None:
    ports = free_ports(4)
    addresses = [f"127.0.0.1:{p}" for p in ports]

    def pod(name: str, i: int) -> dict[str, object]:
        return make_pod(name, annotations={"hybridlb.io/port": str(ports[i]),
                                           "hybridlb.io/pool": "qwen3"})

    with FakeKube() as kube:
        kube.create(pod("vllm-0", 0), pod("vllm-1", 1))
        cp = ControlPlane(tmp_path, None, listener_port=free_ports(1)[0], source=[
            "--kubernetes", "--kubeconfig", str(kube.write_kubeconfig(tmp_path / "kc")),
            "--namespace", "default", "--selector", "app=vllm"], extra=["--metrics", "none"])
        envoy = Envoy(tmp_path, xds_port=cp.xds_port)
        upstreams = Upstreams(tmp_path, ports)
        with running(upstreams, cp, envoy), Traffic(envoy.url) as traffic:
            wait_for(lambda: len(traffic.served) == 2, 15, "traffic on both pods")
            # A cut watch (connection dropped): the watch resumes, a new pod arrives.
            assert kube.drop_watches() >= 1
            cut = time.monotonic()
            kube.create(pod("vllm-2", 2))
            wait_for(lambda: addresses[2] in traffic.served, 30, "pod after the cut")
            recover_cut = time.monotonic() - cut
            # History compacted, then the watch ends: the resume is answered 410, a relist.
            kube.hold_watches()
            kube.create(pod("vllm-3", 3))
            kube.delete(("default", "vllm-0"))
            kube.compact()
            kube.release_watches()
            kube.expire_watches()
            expired = time.monotonic()
            wait_for(lambda: cp.metric("hybridlb_source_errors_total", reason="expired") > 0
                     or addresses[3] in traffic.served, 30, "410 seen")
            wait_for(lambda: addresses[3] in traffic.served, 30, "pod after the relist")
            recover_410 = time.monotonic() - expired
            wait_for(lambda: addresses[0] not in served_by(envoy.url, 30), 15, "deleted pod gone")
            assert cp.metric("hybridlb_source_errors_total", reason="expired") >= 1
    figure("Kubernetes watch cut, then 410 Gone", sent(traffic), len(traffic.failures),
           max(recover_cut, recover_410), cut_s=round(recover_cut, 2),
           gone_s=round(recover_410, 2))
    assert traffic.failures == []


def test_rolling_restart_with_drain(tmp_path: Path) -> None:
    """Every replica replaced one by one, the Kubernetes way: the old pod gets a
    deletionTimestamp (DRAINING in Envoy), its in-flight requests finish, it is deleted;
    the new pod (another address) becomes Ready. No request fails."""
    sim = Sim(tmp_path, replicas=6, extra=["--time-scale", "0.5"])
    with FakeKube() as kube, running(sim):
        old, new = sim.addresses[:3], sim.addresses[3:]

        def pod(name: str, address: str) -> dict[str, object]:
            host, port = address.rsplit(":", 1)
            return make_pod(name, ip=host, node=f"node-{name[-1]}", annotations={
                "hybridlb.io/port": port, "hybridlb.io/pool": "qwen3"})

        kube.create(*(pod(f"vllm-{i}", a) for i, a in enumerate(old)))
        cp = ControlPlane(tmp_path, None, listener_port=free_ports(1)[0], source=[
            "--kubernetes", "--kubeconfig", str(kube.write_kubeconfig(tmp_path / "kc")),
            "--namespace", "default", "--selector", "app=vllm"],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2"])
        envoy = Envoy(tmp_path, xds_port=cp.xds_port)
        with running(cp, envoy), Completions(envoy.url) as load:
            wait_for(lambda: set(old) <= set(load.served), 30, "load on every old replica")
            started = time.monotonic()
            for i, (gone, fresh) in enumerate(zip(old, new, strict=True)):
                kube.terminate("default", f"vllm-{i}")
                kube.create(pod(f"vllm-{i}n", fresh))
                wait_for(lambda g=gone: _draining(envoy, g), 30, "draining in Envoy")
                before = load.served[gone]
                wait_for(lambda g=gone: sim.queues(g)["in_flight"] == 0, 30,
                         "in-flight finished")
                kube.delete(("default", f"vllm-{i}"))
                wait_for(lambda g=gone: g not in envoy.endpoint_weights("qwen3"), 30, "removed")
                assert load.served[gone] - before <= 4  # only the in-flight ones, at most
                wait_for(lambda f=fresh: f in load.served, 30, "the new pod serves")
            rolled = time.monotonic() - started
            total = load.sent
            wait_for(lambda: load.sent > total + 20, 30, "load after the roll")
    figure("rolling restart of every replica (drain first)", load.sent, len(load.failures),
           rolled, replicas=3)
    assert load.failures == []


def _draining(envoy: Envoy, address: str) -> bool:
    for line in httpx.get(f"{envoy.admin}/clusters").text.splitlines():
        parts = line.split("::")
        if (len(parts) == 4 and parts[0] == "qwen3" and parts[1] == address
                and parts[2] == "health_flags"):
            return "eds_status_draining" in parts[3]
    return False


def test_hung_replica_costs_a_bounded_number_of_requests(tmp_path: Path) -> None:
    """A replica that accepts and never answers: each Envoy sends it requests until it
    has seen `--outlier-consecutive-failures` idle timeouts in a row, then ejects it."""
    failures_to_eject = 3
    sim = Sim(tmp_path, replicas=3)
    cp = ControlPlane(tmp_path, sim.pools, listener_port=free_ports(1)[0], extra=[
        "--metrics", "scrape", "--scrape-interval-s", "0.2",
        "--upstream-idle-timeout-s", "1", "--outlier-ejection-s", "30",
        "--outlier-consecutive-failures", str(failures_to_eject)])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port)
    with running(sim, cp, envoy), Traffic(envoy.url) as traffic:
        hung = sim.addresses[0]
        wait_for(lambda: hung in traffic.served, 15, "traffic on every replica")
        sim.fault(hung, hang=True)
        started = time.monotonic()
        try:
            wait_for(lambda: _stat(envoy, "outlier_detection.ejections_enforced_total") >= 1,
                     60, "the hung replica ejected")
            recover = time.monotonic() - started
            failed = len(traffic.failures)
            after = sent(traffic)
            wait_for(lambda: sent(traffic) > after + 300, 30, "traffic after the ejection")
        finally:
            sim.fault(hung, hang=False)
    figure("replica hangs", sent(traffic), len(traffic.failures), recover,
           bound=failures_to_eject)
    assert 0 < len(traffic.failures) <= failures_to_eject
    assert len(traffic.failures) == failed  # none once ejected
    assert all(f.startswith("504") for f in traffic.failures)


def _stat(envoy: Envoy, suffix: str) -> int:
    total = 0
    for line in httpx.get(f"{envoy.admin}/stats").text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("cluster.qwen3") and name.endswith(suffix):
            total += int(value)
    return total


def test_nacked_update_under_traffic(tmp_path: Path) -> None:
    """Envoy rejects an update (a host name in EDS): it keeps routing on the last good one."""
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a")])
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0],
                      extra=["--metrics", "none"])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port)
    upstreams = Upstreams(tmp_path, ports)
    with running(upstreams, cp, envoy), Traffic(envoy.url) as traffic:
        wait_for(lambda: addresses[0] in traffic.served, 15, "traffic")
        doc = yaml.safe_load(pools.read_text())
        doc["pools"][0]["replicas"].append({"address": f"localhost:{ports[1]}",
                                            "node": "node-b"})
        pools.write_text(yaml.safe_dump(doc))
        wait_for(lambda: cp.metric("hybridlb_xds_nacks_total", type="EDS") >= 1, 15, "a NACK")
        before = sent(traffic)
        wait_for(lambda: sent(traffic) > before + 300, 15, "traffic during the NACK")
        started = time.monotonic()
        write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
        wait_for(lambda: addresses[1] in traffic.served, 15, "a good update after the NACK")
        recover = time.monotonic() - started
    figure("Envoy NACKs an update", sent(traffic), len(traffic.failures), recover)
    assert traffic.failures == []
    assert set(traffic.served) == set(addresses)
