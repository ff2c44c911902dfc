"""`hybridlb demo` as a user runs it: a real subprocess that starts the simulator, the control
plane, real Envoys and (when installed) Prometheus, drives load, and must leave nothing
behind, whether it ends by itself or is interrupted."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.envoy


def demo(out: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xds_server", "demo", "--out", str(out), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def assert_nothing_left(summary: dict[str, Any]) -> None:
    processes = summary["processes"]
    names = {p["name"] for p in processes}
    assert {"sim", "control-plane", "envoy-central"} <= names
    assert sum(1 for n in names if n.startswith("envoy-node-")) == 3
    for p in processes:
        assert not _alive(p["pid"]), p
        for port in p["ports"]:
            owner = _listener(port)
            # Another test may have been handed the port since; it must not be ours.
            assert owner is None or owner not in {q["pid"] for q in processes}, (p, port)
            if owner is None:
                with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    pass


def _in_flight(sim_log: Path) -> int:
    """Requests the simulator holds, from the addresses its log announces."""
    line = next(t for t in sim_log.read_text().splitlines() if "hybridlb sim: ready on" in t)
    addresses = line.split("ready on ", 1)[1].split(", ")
    return sum(httpx.get(f"http://{a}/sim/state").json()["in_flight"] for a in addresses)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listener(port: int) -> int | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid or -1
    return None


def test_demo_serves_every_request_and_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = demo(tmp_path, "--duration", "20")
    output, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["cancelled"] == 0, summary["errors"]
    assert summary["sent"] == summary["succeeded"] > 0
    assert summary["sent"] == summary["planned"]
    assert summary["burst_requests"] > 0
    replicas = summary["replicas"]
    assert len(replicas) == 6
    for address, r in replicas.items():
        assert r["succeeded"] > 0 and r["failed"] == 0, (address, r)
        assert len(r["ranks"]) == 2, (address, r)  # both DP ranks behind each server
    envoys = summary["envoys"]
    assert len(envoys) == 4
    for name, e in envoys.items():
        assert e["sent"] == e["succeeded"] > 0, (name, e)
    assert sum(e["sent"] for e in envoys.values()) == summary["sent"]
    # The picker (on by default) chose the replicas; node Envoys keep most of their traffic
    # on their own node (the picker holds it there).
    assert summary["picked"] > summary["succeeded"] / 2
    assert summary["local_share"] > 0.5
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "failed 0" in output
    assert_nothing_left(summary)


def test_ctrl_c_twice_abandons_requests_in_flight_and_still_stops_everything(
    tmp_path: Path,
) -> None:
    # The default run has the endpoint picker; this one routes by the weights alone.
    proc = demo(tmp_path, "--duration", "120", "--no-extproc")
    assert proc.stdout is not None
    for line in proc.stdout:  # the start-up's progress lines; the load begins after the last
        if "waiting for the first loads" in line:
            break
    else:
        pytest.fail(f"the demo never started: exit {proc.wait()}")
    # Requests must be in flight when the second Ctrl-C comes: wait until a replica has some.
    wait_for(lambda: _in_flight(tmp_path / "logs" / "sim.log") > 0, 30, "requests in flight")
    proc.send_signal(signal.SIGINT)
    # Two signals sent at once may merge into one: the second goes after the first took hold.
    for line in proc.stdout:
        if line.startswith("interrupted: no new requests"):
            break
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["failed"] == 0, summary["errors"]
    assert summary["sent"] == summary["succeeded"] + summary["cancelled"] > 0
    assert summary["sent"] < summary["planned"]
    assert summary["picked"] == 0  # --no-extproc: Envoy's balancer over the weights
    assert_nothing_left(summary)
