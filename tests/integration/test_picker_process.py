"""`serve --extproc-port`: the picker runs in a child process of its own, with real Envoy.

It answers picks from that child, survives the child's death (restarted; requests fail open
meanwhile) and goes away with `serve`; the child holds a node Envoy's requests on its node only
as the control plane's keep shares say (none with `--local-first false`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ControlPlane, Envoy, Upstreams, free_ports, running, wait_for, write_pools

pytestmark = pytest.mark.envoy


class Stack:
    def __init__(self, workdir: Path) -> None:
        ports = free_ports(2)
        # Sorted: idle replicas tie, and a tie goes to the lexically first address (node-a's).
        self.addresses = sorted(f"127.0.0.1:{p}" for p in ports)
        ports = [int(a.rsplit(":", 1)[1]) for a in self.addresses]
        pools = workdir / "pools.yaml"
        write_pools(pools, [(self.addresses[0], "node-a"), (self.addresses[1], "node-b")])
        self.upstreams = Upstreams(workdir, ports)
        self.picker_admin = free_ports(1)[0]
        self.cp = ControlPlane(workdir, pools, listener_port=free_ports(1)[0], extra=[
            "--metrics", "none", "--extproc-port", str(free_ports(1)[0]),
            "--extproc-admin-port", str(self.picker_admin),
            # Generous: a late pick fails open (correct, but not what is tested here).
            "--extproc-timeout-s", "2", "--local-first", "false"])
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port)
        #: An Envoy on node-b, the node of the second replica.
        self.node_envoy = Envoy(workdir, xds_port=self.cp.xds_port, node="node-b",
                                name="envoy-node-b")
        self.failures: list[str] = []
        self.served: list[str] = []

    def picker(self) -> dict[str, int]:
        doc: dict[str, int] = self.cp.state()["picker"]
        return doc

    def picked(self, client: httpx.Client, envoy: Envoy | None = None) -> bool:
        """One request; True if a replica answered it where the picker said. Requests that
        fail are kept in `failures` (wait_for would swallow an assertion)."""
        return bool(self.pick(client, envoy) == self.served[-1])

    def pick(self, client: httpx.Client, envoy: Envoy | None = None) -> str:
        """One request; the replica the picker named first ("" if none), the one that
        answered appended to `served`."""
        r = client.post((envoy or self.envoy).url + "/v1/completions",
                        json={"model": "qwen3", "prompt": "hello"})
        if r.status_code != 200:
            self.failures.append(f"{r.status_code} {r.text[:200]}")
        self.served.append(r.headers.get("x-hybridlb-replica", ""))
        return r.headers.get("x-hybridlb-picked", "").split(",")[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("picker_process"))
    with running(s.upstreams, s.cp, s.envoy, s.node_envoy):
        yield s


def _parent(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, not ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_picks_come_from_a_child_process(stack: Stack) -> None:
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: stack.picked(client), 30, "a pick, obeyed")
        assert all(stack.picked(client) for _ in range(10))
    assert stack.failures == []
    assert stack.cp.proc is not None
    pid = stack.picker()["pid"]
    assert pid != stack.cp.proc.pid
    assert _parent(pid) == stack.cp.proc.pid
    assert f"endpoint picker process {pid} started" in stack.cp.output()


def _picked_total(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('hybridlb_extproc_requests_total{outcome="picked"}'))


def test_the_child_exports_its_own_counters_on_its_admin_port(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.picker_admin}"
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: client.get(url + "/readyz").status_code == 200, 30, "the picker ready")
        before = _picked_total(client.get(url + "/metrics").text)
        wait_for(lambda: stack.picked(client), 30, "a pick, obeyed")
        for _ in range(5):
            stack.pick(client)
        after = _picked_total(client.get(url + "/metrics").text)
        # The control plane's own /metrics has no picks: they happen in the child.
        parent = client.get(f"http://127.0.0.1:{stack.cp.admin_port}/metrics").text
    assert stack.failures == []
    assert after >= before + 6
    assert _picked_total(parent) == 0


def test_without_local_first_a_node_envoys_picks_are_not_held_on_its_node(stack: Stack) -> None:
    """Every keep share is 0: the picker chooses over the whole pool, never for being on the
    asking Envoy's node. The replicas are idle, so the lexically first (node-a's) wins the
    tie unless the previous request's end is not yet counted; held picks would all be
    node-b's."""
    remote = stack.addresses[0]
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: stack.picked(client, stack.node_envoy), 30, "a node Envoy's pick")
        picks = [stack.pick(client, stack.node_envoy) for _ in range(10)]
    assert stack.failures == []
    assert picks == stack.served[-10:]  # every pick obeyed
    assert picks.count(remote) >= 5


def test_a_killed_picker_is_restarted_and_requests_flow_meanwhile(stack: Stack) -> None:
    old = stack.picker()
    with httpx.Client(timeout=10) as client:
        os.kill(old["pid"], signal.SIGKILL)
        # Every request is answered while the picker is gone (fail open) and after.
        def restarted() -> bool:
            stack.picked(client)
            now = stack.picker()
            return now["restarts"] == old["restarts"] + 1 and now["pid"] is not None

        wait_for(restarted, 30, "the picker restarted")
        new = stack.picker()["pid"]
        assert new != old["pid"]
        assert stack.cp.proc is not None and _parent(new) == stack.cp.proc.pid
        wait_for(lambda: stack.picked(client), 30, "picks from the new child")
    assert stack.cp.metric("hybridlb_extproc_process_restarts_total") == old["restarts"] + 1
    assert "killed by SIGKILL" in stack.cp.output()
    assert stack.failures == []


def test_serve_stops_its_picker(stack: Stack) -> None:
    pid = stack.picker()["pid"]
    stack.cp.stop()  # SIGTERM, waits for serve to exit
    assert not Path(f"/proc/{pid}").exists()


def test_a_killed_serve_leaves_no_picker_behind(stack: Stack) -> None:
    """SIGKILL gives serve no chance to stop its child: the child notices it was orphaned."""
    stack.cp.start()
    wait_for(lambda: stack.picker()["pid"] is not None, 20, "a picker")
    pid = stack.picker()["pid"]
    stack.cp.stop(signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             20, "the orphaned picker to exit")
