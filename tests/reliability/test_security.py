"""Least exposure: the admin server is read-only and binds where told, no credential reaches
the logs, and the container runs as a non-root user.

(RBAC least privilege is checked in tests/unit/test_deploy.py; TLS in test_tls.py.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fakekube import TOKEN, FakeKube, make_pod
from tests.harness import ControlPlane, free_ports, running, wait_for, write_pools

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).parents[2]
ADMIN_PATHS = ["/healthz", "/readyz", "/metrics", "/debug/state", "/", "/quitquitquit",
               "/debug/state/x", "/config", "/pools"]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("security")
    pools = workdir / "pools.yaml"
    write_pools(pools, [(f"127.0.0.1:{free_ports(1)[0]}", "node-a")])
    control = ControlPlane(workdir, pools, listener_port=free_ports(1)[0],
                           extra=["--metrics", "none"])
    with running(control):
        yield control


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_admin_has_no_write_endpoint(cp: ControlPlane, method: str) -> None:
    for path in ADMIN_PATHS:
        status = httpx.request(method, cp.admin + path, content=b"{}").status_code
        assert status in (404, 405), (method, path, status)
    assert httpx.get(cp.admin + "/healthz").status_code == 200  # and it is still up


def test_admin_binds_only_the_configured_address(cp: ControlPlane) -> None:
    """The default admin host is loopback: nothing of it listens on other addresses."""
    assert cp.proc is not None
    listening = [c.laddr for c in psutil.Process(cp.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    admin = [a for a in listening if a.port == cp.admin_port]
    loopback = {"127.0.0.1", "::ffff:127.0.0.1"}  # gRPC listens on a v4-mapped v6 socket
    assert admin and all(a.ip in loopback for a in admin)
    xds = [a for a in listening if a.port == cp.xds_port]
    assert xds and all(a.ip in loopback for a in xds)  # --xds-host 127.0.0.1


def test_bearer_token_never_reaches_the_log_at_debug(tmp_path: Path) -> None:
    with FakeKube() as kube:
        kube.create(make_pod("vllm-0", ip="10.0.0.1",
                             annotations={"hybridlb.io/pool": "qwen3"}))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        control = ControlPlane(
            tmp_path, None, listener_port=free_ports(1)[0],
            source=["--kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", "default",
                    "--selector", "app=vllm"],
            extra=["--metrics", "none", "--kubernetes-watch-timeout-s", "1"])
        control.args[3:3] = ["--log-level", "DEBUG"]
        with running(control):
            wait_for(lambda: len(kube.watches()) >= 2, 20, "a resumed watch")
            kube.fail_next(401)  # an error path logs too
            wait_for(lambda: control.metric("hybridlb_source_errors_total") > 0, 20, "an error")
        log = control.output()
    assert re.search(r"\bDEBUG\b", log), "the test must run the process at DEBUG"
    assert "qwen3" in log  # the pod was discovered
    assert TOKEN not in log
    assert "Bearer" not in log and "authorization" not in log.lower()


def test_container_runs_as_a_non_root_user() -> None:
    users = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
