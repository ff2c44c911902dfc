"""How fast Kubernetes lifecycle reaches Envoy: Ready → routed, deletionTimestamp → draining.

An operator rolling a vLLM Deployment asks two things: how long after a pod turns Ready
does traffic reach it, and how long after `kubectl delete` does it stop getting new
requests. Both are measured through the real chain: the fake Kubernetes API server
(tests/fakekube.py, the real list/watch wire protocol, in its own process), the control
plane (`hybridlb serve --kubernetes`, a real process, official client), one real Envoy.

Pods are added one at a time, interleaved with terminations: each pod is created not
Ready, then turned Ready (t0: the API server has queued the change to every watch), and
Envoy's admin `/clusters` is polled until the pod's address is in the pool's cluster with
no failure flag (t1). Once `--live` pods are up, the oldest is terminated (deletionTimestamp)
and timed until Envoy shows `eds_status_draining` for it (what Envoy 1.40 prints for an EDS
host in DRAINING), then deleted and timed until Envoy drops it. The poll interval bounds the
resolution and is reported. Times on both sides are `time.monotonic()`, which Linux keeps
system-wide, so the API server's process and this one share a clock.

The fake API server lives in tests/, which is not installed: run this from a source
checkout (`hybridlb bench k8s` finds tests/fakekube.py in the current folder or next to the
package).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import yaml

import xds_server
from xds_server.bench import report
from xds_server.bench.procs import Managed, wait_until
from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports

ENVOY = str(Path(sys.executable).with_name("envoy"))
POOL = "qwen3"
TARGET_S = 1.0


def source_checkout() -> Path:
    """The folder that holds tests/fakekube.py: the current one, or the package's parent."""
    for folder in (Path.cwd(), Path(xds_server.__file__).resolve().parents[1]):
        if (folder / "tests" / "fakekube.py").exists():
            return folder
    raise SystemExit("hybridlb bench k8s needs a source checkout (tests/fakekube.py, the "
                     "fake Kubernetes API server): run it from the repository's root")


class FakeApi:
    """The fake API server's process, driven over its stdin (see tests/fakekube.py main)."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.kubeconfig = workdir / "kubeconfig"
        log = workdir / "fakekube.log"
        # tests/ is not installed: put the checkout first on the child's path.
        code = (f"import sys; sys.path.insert(0, {str(source_checkout())!r}); "
                "from tests.fakekube import main; main()")
        self.process = Managed(
            "fakekube", [sys.executable, "-c", code, "--kubeconfig", str(self.kubeconfig)],
            log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        stack.callback(self.process.stop)
        self._stdin: IO[bytes] = _stream(self.process.proc.stdin)
        self._stdout: IO[bytes] = _stream(self.process.proc.stdout)
        self.url = str(self._read()["url"])

    def _read(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            self.process.check_alive()
            raise RuntimeError("the fake API server closed its output")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def send(self, op: str, name: str, **fields: Any) -> float:
        """Apply one change; returns when the server had queued it to every watch."""
        self._stdin.write(json.dumps({"op": op, "name": name, **fields}).encode() + b"\n")
        self._stdin.flush()
        return float(self._read()["t"])


def _stream(value: IO[bytes] | None) -> IO[bytes]:
    assert value is not None
    return value


class EnvoyAdmin:
    """Envoy's `/clusters`, read over one kept-alive connection."""

    def __init__(self, port: int) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def hosts(self) -> dict[str, set[str]]:
        """`address -> health flags` (without "healthy") of the pool's global cluster."""
        self._connection.request("GET", "/clusters")
        text = self._connection.getresponse().read().decode()
        hosts: dict[str, set[str]] = {}
        prefix = f"{POOL}::"
        for line in text.splitlines():
            if line.startswith(prefix):
                parts = line.split("::")
                if len(parts) == 4 and parts[2] == "health_flags":
                    hosts[parts[1]] = set(filter(None, parts[3].split("/"))) - {"healthy"}
        return hosts

    def close(self) -> None:
        self._connection.close()


def _wait(admin: EnvoyAdmin, check: Any, *, poll_s: float, timeout_s: float, what: str) -> float:
    return wait_until(lambda: bool(check(admin.hosts())), timeout_s=timeout_s, what=what,
                      interval_s=poll_s)


def run_once(args: argparse.Namespace, workdir: Path, repeat: int) -> dict[str, list[float]]:
    """One fresh API server, control plane and Envoy; `args.pods` pods through their life."""
    times: dict[str, list[float]] = {"ready_to_routed": [], "deletion_to_draining": [],
                                     "deleted_to_removed": []}
    with ExitStack() as stack:
        api = FakeApi(stack, workdir)
        xds_port, admin_port, listener_port, envoy_admin = free_ports(4)
        cp = Managed("control-plane", [
            sys.executable, "-m", "xds_server", "serve", "--kubernetes",
            "--kubeconfig", str(api.kubeconfig), "--namespace", "default",
            "--selector", "app=vllm", "--metrics", "none",
            "--xds-host", "127.0.0.1", "--xds-port", str(xds_port),
            "--admin-port", str(admin_port), "--listener-host", "127.0.0.1",
            "--listener-port", str(listener_port)], workdir / "control-plane.log")
        stack.callback(cp.stop)
        bootstrap = workdir / "envoy.yaml"
        bootstrap.write_text(yaml.safe_dump(build_bootstrap(
            xds_host="127.0.0.1", xds_port=xds_port, node="", node_id="bench-k8s",
            admin_port=envoy_admin, listener_port=listener_port)))
        envoy = Managed("envoy", [ENVOY, "-c", str(bootstrap), "--use-dynamic-base-id",
                                  "-l", "warning", "--concurrency", "1"], workdir / "envoy.log")
        stack.callback(envoy.stop)
        admin = EnvoyAdmin(envoy_admin)
        stack.callback(admin.close)

        def ready(_: dict[str, set[str]]) -> bool:
            cp.check_alive()
            envoy.check_alive()
            return _http_ok(envoy_admin, "/ready")

        wait_until(lambda: ready({}), timeout_s=60, what="Envoy ready")
        wait_until(lambda: _http_ok(admin_port, "/readyz"), timeout_s=60,
                   what="control plane ready")
        live: list[tuple[str, str]] = []
        for i in range(args.pods):
            name = f"vllm-{repeat}-{i}"
            address = f"10.{repeat % 200 + 1}.{i // 250}.{i % 250 + 1}:8000"
            api.send("create", name, ip=address.split(":")[0], port=8000,
                     node=f"node-{i % 4}", ready=False)
            time.sleep(args.gap_s)  # Pending: the control plane sees it, no route yet
            t0 = api.send("ready", name)
            t1 = _wait(admin, lambda h, a=address: a in h and not h[a], poll_s=args.poll_s,
                       timeout_s=30, what=f"{name} routed")
            times["ready_to_routed"].append(t1 - t0)
            live.append((name, address))
            time.sleep(args.gap_s)
            if len(live) > args.live:
                old, old_address = live.pop(0)
                t0 = api.send("terminate", old)
                t1 = _wait(admin, lambda h, a=old_address: h.get(a) == {"eds_status_draining"},
                           poll_s=args.poll_s, timeout_s=30, what=f"{old} draining")
                times["deletion_to_draining"].append(t1 - t0)
                time.sleep(args.gap_s)
                t0 = api.send("delete", old)
                t1 = _wait(admin, lambda h, a=old_address: a not in h, poll_s=args.poll_s,
                           timeout_s=30, what=f"{old} removed")
                times["deleted_to_removed"].append(t1 - t0)
                time.sleep(args.gap_s)
            if (i + 1) % 20 == 0:
                report.progress(f"repeat {repeat + 1}: {i + 1}/{args.pods} pods")
    return times


def _http_ok(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    finally:
        connection.close()


def summarize(repeats: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per measure: p50/p99 over every pod of every repeat, and each repeat's own p50/p99
    with their spread (BENCH.md: a figure whose repeats disagree is noise)."""
    out: dict[str, Any] = {}
    for key in repeats[0]:
        pooled = [v for r in repeats for v in r[key]]
        out[key] = {
            "all": report.distribution(pooled),
            "p50_over_repeats": report.spread(report.percentile(r[key], 50) for r in repeats),
            "p99_over_repeats": report.spread(report.percentile(r[key], 99) for r in repeats),
        }
    return out


LABELS = {"ready_to_routed": "Ready → routed by Envoy",
          "deletion_to_draining": "deletionTimestamp → draining in Envoy",
          "deleted_to_removed": "deleted → gone from Envoy"}


def markdown(doc: dict[str, Any]) -> str:
    params = doc["parameters"]
    rows = []
    for key, label in LABELS.items():
        s = doc["summary"][key]
        rows.append([label, str(s["all"]["n"]), report.seconds(s["all"]["p50"]),
                     report.seconds(s["all"]["p99"]), report.seconds(s["all"]["max"]),
                     report.with_spread(s["p99_over_repeats"]),
                     "yes" if s["all"]["p99"] < TARGET_S else "no"])
    return (
        "# Kubernetes lifecycle → Envoy (`hybridlb bench k8s`)\n\n"
        f"{params['pods']} pods per repeat x {params['repeats']} repeats, one at a time, "
        f"{params['live']} live at once, {params['gap_s']} s between changes; Envoy's "
        f"/clusters polled every {params['poll_s'] * 1000:.0f} ms (the resolution). Real "
        "control plane and Envoy processes; the fake API server in its own process.\n\n"
        + report.markdown_table(
            ["from → to", "pods", "p50", "p99", "max", "p99 per repeat (median, min-max)",
             f"p99 < {TARGET_S:.0f} s"], rows)
    )


def plot(repeats: list[dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key, label in LABELS.items():
        values = sorted(v * 1000 for r in repeats for v in r[key])
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"{label} (n={len(values)})")
    ax.axvline(TARGET_S * 1000, color="grey", linestyle="--", linewidth=1, label="1 s target")
    ax.set_xlabel("ms")
    ax.set_ylabel("share of pods")
    ax.set_title("Kubernetes change → Envoy (CDF)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    source_checkout()
    repeats: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp:
        for repeat in range(args.repeats):
            workdir = Path(tmp) / f"repeat-{repeat}"
            workdir.mkdir()
            report.progress(f"repeat {repeat + 1}/{args.repeats}")
            repeats.append(run_once(args, workdir, repeat))
    doc = {
        "benchmark": "k8s",
        "parameters": {"pods": args.pods, "repeats": args.repeats, "live": args.live,
                       "gap_s": args.gap_s, "poll_s": args.poll_s, "target_s": TARGET_S},
        "git": report.git_commit(),
        "machine": report.machine(),
        "summary": summarize(repeats),
        "repeats": repeats,
    }
    report.write_json(out / "k8s.json", doc)
    (out / "k8s.md").write_text(markdown(doc))
    plot(repeats, out / "k8s.png")
    print(markdown(doc))
    return 0
