"""DP ranks behind one server: the picker names the least-loaded LOCAL rank of the replica it
picks (X-data-parallel-rank), translated from vLLM's global `engine` label; the simulator
refuses an out-of-range index as vLLM does, and says which global rank served."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ControlPlane, Envoy, Sim, free_ports, running, wait_for
from tests.integration.test_extproc import MODEL, PickerProcess

pytestmark = pytest.mark.envoy


class Stack:
    def __init__(self, workdir: Path) -> None:
        # Two servers of two ranks each: global ranks 0,1 and 2,3.
        self.sim = Sim(workdir, replicas=2, nodes=2, ranks=2, extra=["--max-num-seqs", "2"])
        picker_port = free_ports(1)[0]
        self.cp = ControlPlane(
            workdir, self.sim.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2", "--max-num-seqs", "2",
                   "--extproc-address", f"127.0.0.1:{picker_port}", "--extproc-timeout-s", "2"])
        self.picker = PickerProcess(workdir, picker_port, self.cp.admin,
                                    extra=("--pin-rank", "true"))
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("ranks"))
    with running(s.sim, s.cp, s.picker, s.envoy):
        yield s


def post(url: str, headers: dict[str, str] | None = None, **kw: object) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120, headers=headers,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 4, **kw})


def test_the_picker_sends_each_request_to_the_idle_rank_of_its_replica(stack: Stack) -> None:
    a, b = stack.sim.addresses
    # Queues on local rank 0 of the first server (global 0) and local rank 1 of the second
    # (global 3): the idle ranks are global 1 (local 1) and global 2 (local 0).
    pinned = {a: "0", b: "1"}
    idle_global = {a: "1", b: "2"}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=24)
    flood = [pool.submit(post, f"http://{address}", {"X-data-parallel-rank": rank},
                         max_tokens=2000)
             for address, rank in pinned.items() for _ in range(12)]
    try:
        def queued() -> bool:
            view = stack.picker.view()
            ranks = {address: {k["index"]: k for k in view[address]["ranks"]}
                     for address in (a, b)}
            return (ranks[a][0]["waiting"] >= 6 and ranks[b][1]["waiting"] >= 6
                    and ranks[a][1]["waiting"] == 0 and ranks[b][0]["waiting"] == 0)

        wait_for(queued, 30, "the picker seeing one queued rank per server")
        responses = [post(stack.envoy.url) for _ in range(8)]
        assert all(r.status_code == 200 for r in responses), [r.text[:200] for r in responses]
        served = [(r.headers["x-hybridlb-replica"], r.headers["x-hybridlb-rank"])
                  for r in responses]
        # Each went where the picker said, to the rank it said (deep queues: the picker's own
        # pending picks do not outweigh them within these few requests).
        assert all(r.headers["x-hybridlb-picked"].split(",")[0] == r.headers["x-hybridlb-replica"]
                   for r in responses)
        assert all(rank == idle_global[replica] for replica, rank in served), served
    finally:
        for f in flood:
            f.result(timeout=300)
        pool.shutdown()
