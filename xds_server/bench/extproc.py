"""What the ext_proc endpoint picker costs: latency added per request, and picks per core.

Three identical Envoys in front of the same instant upstreams, one control plane each; the
only difference is that B's listener asks the picker (a `hybridlb extproc` process) before
routing, and C's asks a picker that decides nothing (`fixed_picker`: the real protocol, its
first answer replayed), which tells the exchange's cost from the decision's. Requests go to
A, B, C, A, B, C ... one at a time, so all see the same machine at the same moment; each
repeat reports the medians and p99 of each and the differences to A.
Then the picker alone is driven over gRPC by a separate process at full speed, and its
rate is divided by the CPU it used: picks per CPU-second, i.e. per core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from xds_server.bench import report
from xds_server.bench.procs import Managed, wait_until
from xds_server.commands.bootstrap import build_bootstrap
from xds_server.ports import free_ports

ENVOY = str(Path(sys.executable).with_name("envoy"))
SIDES = ("without", "with", "fixed")
LABELS = {"without": "without picker", "with": "with picker",
          "fixed": "with a picker that decides nothing"}
BODY = json.dumps({
    "model": "bench", "max_tokens": 1, "prompt": "Summarize the following text. " * 30,
}).encode()


def _start(stack: ExitStack, name: str, args: list[str], workdir: Path) -> Managed:
    process = Managed(name, args, workdir / f"{name}.log")
    stack.callback(process.stop)
    return process


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


async def _one(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, data=BODY,
                            headers={"content-type": "application/json"}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - started


async def _alternate(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():  # warm connections and the picker's state
            for _ in range(50):
                await _one(session, url)
        for _ in range(n):
            for name, url in urls.items():
                latencies[name].append(await _one(session, url))
    return latencies


async def _hammer(port: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """Drive the picker's Process stream as Envoy does: headers, then the whole body."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    headers = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                 base_pb2.HeaderValue(key="content-length", raw_value=str(len(BODY)).encode())]
    )))
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True))
    deadline = time.monotonic() + seconds
    done = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)

        async def requests() -> AsyncIterator[ep.ProcessingRequest]:
            yield headers
            yield body

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async for _ in stub.Process(requests()):
                    pass
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": done, "seconds": seconds}


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    params = {"requests_per_repeat": args.requests, "repeats": args.repeats,
              "hammer_seconds": args.hammer_seconds, "hammer_concurrency": args.concurrency,
              "body_bytes": len(BODY)}
    with tempfile.TemporaryDirectory(prefix="hybridlb-bench-extproc-") as tmp, \
            ExitStack() as stack:
        workdir = Path(tmp)
        upstream_ports = free_ports(2)
        for i, port in enumerate(upstream_ports):
            _start(stack, f"upstream{i}", [sys.executable, "-m", "xds_server.bench.instant",
                                           str(port)], workdir)
        pools = workdir / "pools.yaml"
        pools.write_text(yaml.safe_dump({"pools": [{"name": "bench", "replicas": [
            {"address": f"127.0.0.1:{p}", "node": f"node-{i}"}
            for i, p in enumerate(upstream_ports)]}]}))
        picker_port, picker_admin, fixed_port = free_ports(3)
        pickers = {"with": picker_port, "fixed": fixed_port}
        urls: dict[str, str] = {}
        planes: dict[str, str] = {}
        for name in SIDES:
            xds, admin, listener, envoy_admin = free_ports(4)
            extra = (["--extproc-address", f"127.0.0.1:{pickers[name]}"] if name in pickers
                     else [])
            _start(stack, f"cp-{name}", [
                sys.executable, "-m", "xds_server", "serve", "--static", str(pools),
                "--metrics", "none", "--xds-host", "127.0.0.1", "--xds-port", str(xds),
                "--admin-port", str(admin), "--listener-host", "127.0.0.1", *extra], workdir)
            planes[name] = f"http://127.0.0.1:{admin}"
            bootstrap = workdir / f"envoy-{name}.yaml"
            bootstrap.write_text(yaml.safe_dump(build_bootstrap(
                xds_host="127.0.0.1", xds_port=xds, admin_port=envoy_admin,
                listener_port=listener, node_id=f"envoy-{name}")))
            _start(stack, f"envoy-{name}", [ENVOY, "-c", str(bootstrap), "--use-dynamic-base-id",
                                            "--concurrency", "1", "-l", "warning"], workdir)
            urls[name] = f"http://127.0.0.1:{listener}/v1/completions"
        picker = _start(stack, "picker", [
            sys.executable, "-m", "xds_server", "extproc", "--host", "127.0.0.1",
            "--port", str(picker_port), "--control-plane", planes["with"],
            "--admin-port", str(picker_admin)], workdir)
        _start(stack, "fixed-picker", [sys.executable, "-m", "xds_server.bench.fixed_picker",
                                       str(fixed_port), planes["fixed"]], workdir)
        for name, url in urls.items():
            wait_until(_prober(url), timeout_s=120, what=f"envoy {name}")
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{picker_admin}/readyz"), timeout_s=30,
                   what="picker")
        repeats = []
        for r in range(args.repeats):
            report.progress(f"repeat {r + 1}/{args.repeats}: {args.requests} requests each, "
                            "taking turns: without, with the picker, with the fixed picker")
            lat = asyncio.run(_alternate(urls, args.requests))
            repeats.append({name: report.distribution(values) for name, values in lat.items()})
        picks_before = _picked(picker_admin)
        report.progress(f"picker alone: {args.concurrency} streams for {args.hammer_seconds:.0f} s")
        cpu_before = picker.meter.usage().cpu_s
        hammer = asyncio.run(_hammer(picker_port, args.hammer_seconds, args.concurrency))
        cpu = picker.meter.usage().cpu_s - cpu_before
        hammer["picked"] = _picked(picker_admin) - picks_before
        hammer["picker_cpu_s"] = cpu
        hammer["picks_per_s"] = hammer["picked"] / args.hammer_seconds
        hammer["picks_per_cpu_s"] = hammer["picked"] / cpu if cpu else float("nan")
    added = {side: {q: [r[side][q] - r["without"][q] for r in repeats] for q in ("p50", "p99")}
             for side in ("with", "fixed")}
    added_p50, added_p99 = added["with"]["p50"], added["with"]["p99"]
    summary = {"added_p50_s": report.spread(added_p50), "added_p99_s": report.spread(added_p99),
               "fixed_added_p50_s": report.spread(added["fixed"]["p50"]),
               "fixed_added_p99_s": report.spread(added["fixed"]["p99"]),
               "target_p50_under_1ms": report.spread(added_p50)["median"] < 0.001}
    doc = {"benchmark": "extproc", "params": params, **report.git_commit(),
           "machine": report.machine(), "repeats": repeats, "summary": summary,
           "picker_alone": hammer}
    report.write_json(out / "extproc.json", doc)
    table = report.markdown_table(
        ["", "p50", "p99"],
        [[LABELS[name],
          *(report.with_spread(report.spread(r[name][q] for r in repeats), fmt=report.milliseconds)
            for q in ("p50", "p99"))]
         for name in SIDES]
        + [[f"added by the {what}",
            *(report.with_spread(report.spread(added[side][q]), fmt=report.milliseconds)
              for q in ("p50", "p99"))]
           for side, what in (("with", "picker"), ("fixed", "exchange alone (fixed picker)"))])
    text = (f"# ext_proc picker cost\n\nMedian (min-max) over {args.repeats} interleaved "
            f"repeats of {args.requests} requests per side, one at a time, "
            f"{len(BODY)}-byte chat body, instant upstream.\n\n{table}\n\n"
            f"Picker alone: {hammer['picks_per_s']:.0f} picks/s with {args.concurrency} "
            f"streams, {hammer['picks_per_cpu_s']:.0f} picks per CPU-second (one core).\n")
    (out / "extproc.md").write_text(text)
    _plot(out / "extproc.png", repeats)
    print(text)
    return 0


def _plot(path: Path, repeats: list[dict[str, dict[str, float]]]) -> None:
    """p50 and p99 of each repeat, for each side, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, q in zip(axes, ("p50", "p99"), strict=True):
        xs = range(len(repeats))
        for i, side in enumerate(SIDES):
            ax.bar([x + (i - 1) * 0.27 for x in xs], [r[side][q] * 1000 for r in repeats],
                   0.27, label=LABELS[side])
        ax.set_title(f"{q} latency per repeat")
        ax.set_xlabel("repeat")
        ax.set_ylabel("ms")
        ax.set_xticks(list(xs))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _prober(url: str) -> Callable[[], bool]:
    async def probe() -> bool:
        async with aiohttp.ClientSession() as session:
            await _one(session, url)
        return True

    return lambda: asyncio.run(probe())


def _picked(admin_port: int) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "hybridlb_extproc_requests_total"
                     and s.labels.get("outcome") == "picked"))
