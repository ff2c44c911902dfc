"""Affinity without the picker: a session header sticks to a replica, within a load bound."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.harness import ControlPlane, Envoy, Sim, free_ports, running

pytestmark = pytest.mark.envoy
MODEL = "Qwen/Qwen3-0.6B"


def test_a_session_sticks_to_its_replica_and_a_hot_one_is_bounded(tmp_path: Path) -> None:
    sim = Sim(tmp_path, replicas=4, nodes=2)
    with running(sim):
        cp = ControlPlane(tmp_path, sim.pools, listener_port=free_ports(1)[0],
                          extra=["--metrics", "none", "--hash-balance-factor", "125"])
        envoy = Envoy(tmp_path, xds_port=cp.xds_port)
        with running(cp, envoy), httpx.Client(timeout=60) as client:
            def ask(session: str, max_tokens: int = 2) -> str:
                r = client.post(envoy.url + "/v1/completions", headers={"x-session-id": session},
                                json={"model": MODEL, "prompt": "hi", "max_tokens": max_tokens})
                assert r.status_code == 200
                return r.headers["x-hybridlb-replica"]

            for session in ("alice", "bob", "carol"):
                assert len({ask(session) for _ in range(8)}) == 1, session
            assert len({ask(f"user-{i}") for i in range(40)}) > 1

            # One hot session, many concurrent requests: the bound spreads the overflow.
            sim.fault(sim.addresses[0], slowdown=5.0)
            for address in sim.addresses[1:]:
                sim.fault(address, slowdown=5.0)
            try:
                with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
                    served = Counter(pool.map(lambda _: ask("hot", 60), range(16)))
            finally:
                for address in sim.addresses:
                    sim.fault(address, slowdown=1.0)
            assert len(served) > 1, served
            assert max(served.values()) < 16
