"""Picks and ADS answers while the control plane publishes a 10,000-replica change.

Before the picker had its own process, `serve --extproc-port` picked on the event loop that
also parses the pool file and builds snapshots (over a second at 10,000 replicas): picks
that Envoy waits 0.2 s for failed open during every large publish. This runs `serve` both
ways, interleaved (in-process, own process, in-process, ...), each time fresh: 10,000
replicas in 100 pools of 100; picks are asked for one pool at a steady rate straight over
gRPC as Envoy asks them (headers, then the buffered body), each given Envoy's 0.2 s; a pick
not answered in time is one Envoy would have failed open. Meanwhile a probe opens an ADS
stream every 0.1 s and times its first answer. After a quiet spell, the pool file is
rewritten a few times, every replica's capacity changing (a full rebuild each time).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xds_server.bench import report
from xds_server.bench.procs import Managed, scratch, wait_until
from xds_server.bench.xds import write_atomically
from xds_server.ports import free_ports

MODES = {"in-process": ["--extproc-in-process"], "own-process": []}
POOLS, PER_POOL = 100, 100
TARGET = "model-000"
BODY = json.dumps({"model": TARGET, "max_tokens": 1,
                   "prompt": "Summarize the following text. " * 30}).encode()
#: What Envoy waits for a pick (`--extproc-timeout-s` default).
PICK_TIMEOUT_S = 0.2


#: Summary figure -> (part of a run, statistic), each spread over the repeats of a mode.
SUMMARY = {
    "picks_failed_open_publishing": ("picks_publishing", "failed"),
    "picks_publishing_p99_s": ("picks_publishing", "p99"),
    "picks_publishing_max_s": ("picks_publishing", "max"),
    "picks_quiet_p50_s": ("picks_quiet", "p50"),
    "ads_publishing_p99_s": ("ads_publishing", "p99"),
    "ads_publishing_max_s": ("ads_publishing", "max"),
    "ads_quiet_p50_s": ("ads_quiet", "p50"),
}


@dataclass(frozen=True)
class Params:
    repeats: int = 3
    publishes: int = 3
    picks_per_s: float = 200.0
    quiet_s: float = 3.0
    #: Time given to each publish (the pool file is polled every 0.05 s; a publish of
    #: 10,000 replicas takes 1-2 s here).
    publish_window_s: float = 6.0
    ads_probe_interval_s: float = 0.1


def pool_yaml(capacity: int) -> str:
    """100 pools of 100 replicas; 8 replicas per node."""
    lines = ["pools:"]
    index = itertools.count()
    for p in range(POOLS):
        lines += [f"- name: model-{p:03d}", "  replicas:"]
        for _ in range(PER_POOL):
            i = next(index)
            node = i // 8
            lines += [f"  - address: 10.{node >> 8 & 255}.{node & 255}.1:{8000 + i % 8}",
                      f"    node: node-{node:04d}", f"    capacity: {capacity}"]
    return "\n".join(lines) + "\n"


@dataclass
class Sample:
    at: float
    seconds: float
    ok: bool


@dataclass
class Recorder:
    picks: list[Sample] = field(default_factory=list)
    ads: list[Sample] = field(default_factory=list)
    #: How late the driver sent picks against its schedule: its own overhead.
    driver_lag_s: list[float] = field(default_factory=list)


async def _pick(stub: Any, requests: list[Any]) -> None:
    async def stream() -> AsyncIterator[Any]:
        for r in requests:
            yield r

    call = stub.Process(stream())
    try:
        async for response in call:
            if response.HasField("request_body"):
                return
    finally:
        call.cancel()


async def _drive_picks(port: int, params: Params, rec: Recorder, stop: asyncio.Event) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    requests = [
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
            base_pb2.HeaderValue(key="content-length", raw_value=str(len(BODY)).encode())]))),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY, end_of_stream=True)),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)

        async def one() -> None:
            started = time.monotonic()
            try:
                await asyncio.wait_for(_pick(stub, requests), PICK_TIMEOUT_S)
                ok = True
            except (TimeoutError, grpc.aio.AioRpcError):
                ok = False
            rec.picks.append(Sample(started, time.monotonic() - started, ok))

        tasks = set()
        period = 1 / params.picks_per_s
        due = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            rec.driver_lag_s.append(max(0.0, time.monotonic() - due))
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += period
        await asyncio.gather(*tasks)


async def _probe_ads(port: int, params: Params, rec: Recorder, stop: asyncio.Event) -> None:
    """A new ADS stream every interval asking for the listeners (a small answer, so the
    probe measures the control plane's responsiveness, not its bandwidth)."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from xds_server.xds import types
    from xds_server.xds.server import SERVICE

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            f"/{SERVICE}/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        for i in itertools.count():
            if stop.is_set():
                return
            request = discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=f"probe-{i}", cluster="bench"), type_url=types.LISTENER)

            async def ask(request: Any = request) -> None:
                call = method(iter([request]))
                try:
                    async for _ in call:
                        return
                finally:
                    call.cancel()

            started = time.monotonic()
            try:
                await asyncio.wait_for(ask(), 10)
                ok = True
            except (TimeoutError, grpc.aio.AioRpcError):
                ok = False
            rec.ads.append(Sample(started, time.monotonic() - started, ok))
            await asyncio.sleep(params.ads_probe_interval_s)


def _snapshots(admin: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(admin + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return float(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "hybridlb_snapshots_total"))


async def _picks_answered(port: int) -> bool:
    """A few picks at the driver's rate all answered in time: the picker has its view."""
    rec = Recorder()
    stop = asyncio.Event()
    driving = asyncio.create_task(_drive_picks(port, Params(), rec, stop))
    await asyncio.sleep(0.1)
    stop.set()
    await driving
    return bool(rec.picks) and all(s.ok for s in rec.picks)


def _run(mode: str, params: Params, workdir: Path, pools: Path) -> dict[str, Any]:
    write_atomically(pools, pool_yaml(1))
    xds, admin_port, picker, listener = free_ports(4)
    admin = f"http://127.0.0.1:{admin_port}"
    with ExitStack() as stack:
        cp = Managed(f"cp-{mode}", [
            sys.executable, "-m", "xds_server", "serve", "--static", str(pools),
            "--static-poll-interval-s", "0.05", "--metrics", "none",
            "--xds-host", "127.0.0.1", "--xds-port", str(xds), "--admin-port", str(admin_port),
            "--listener-port", str(listener), "--extproc-port", str(picker), *MODES[mode]],
            workdir / f"cp-{mode}.log")
        stack.callback(cp.stop)

        def ready() -> bool:
            cp.check_alive()
            return bool(urllib.request.urlopen(admin + "/readyz", timeout=5).status == 200)

        wait_until(ready, timeout_s=120, what="control plane ready")
        rec = Recorder()
        windows: list[tuple[float, float]] = []
        snapshots_before = 0.0

        async def drive() -> None:
            # One event loop for all of the run's gRPC: grpc.aio outlives asyncio.run.
            nonlocal snapshots_before
            deadline = time.monotonic() + 120
            while not await _picks_answered(picker):
                cp.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError("the picker did not answer within 120 s")
                await asyncio.sleep(0.2)
            snapshots_before = await asyncio.to_thread(_snapshots, admin)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_drive_picks(picker, params, rec, stop)),
                     asyncio.create_task(_probe_ads(xds, params, rec, stop))]
            await asyncio.sleep(params.quiet_s)
            for k in range(params.publishes):
                started = time.monotonic()
                await asyncio.to_thread(write_atomically, pools, pool_yaml(2 if k % 2 == 0
                                                                           else 1))
                await asyncio.sleep(params.publish_window_s)
                windows.append((started, time.monotonic()))
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(drive())
        cp.check_alive()
        published = _snapshots(admin) - snapshots_before
    quiet_end = windows[0][0]

    def during(samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if any(a <= s.at < b for a, b in windows)]

    def summary(samples: list[Sample]) -> dict[str, Any]:
        return {"n": len(samples), "failed": sum(not s.ok for s in samples),
                **{k: v for k, v in report.distribution([s.seconds for s in samples
                                                          if s.ok]).items() if k != "n"}}

    return {
        "mode": mode,
        "snapshots_published": published,
        "picks_quiet": summary([s for s in rec.picks if s.at < quiet_end]),
        "picks_publishing": summary(during(rec.picks)),
        "ads_quiet": summary([s for s in rec.ads if s.at < quiet_end]),
        "ads_publishing": summary(during(rec.ads)),
        "driver_lag_s": report.distribution(rec.driver_lag_s),
    }


def main(args: argparse.Namespace) -> int:
    params = Params(repeats=args.repeats, publishes=args.publishes)
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    with scratch("hybridlb-bench-publish-") as workdir:
        pools = workdir / "pools.yaml"
        for r in range(params.repeats):
            for mode in MODES:
                report.progress(f"repeat {r + 1}/{params.repeats}: picker {mode}, "
                                f"{params.publishes} publishes of {POOLS * PER_POOL} replicas")
                result = _run(mode, params, workdir, pools)
                result["repeat"] = r
                runs.append(result)
                report.progress(f"  {mode}: {result['picks_publishing']['failed']} of "
                                f"{result['picks_publishing']['n']} picks late while "
                                f"publishing, {result['snapshots_published']:.0f} snapshots")
    summary = {mode: {
        key: report.spread(r[part][stat] for r in runs if r["mode"] == mode)
        for key, (part, stat) in SUMMARY.items()
    } for mode in MODES}
    doc = {"benchmark": "publish", "params": {**params.__dict__, "pools": POOLS,
                                              "replicas_per_pool": PER_POOL,
                                              "pick_timeout_s": PICK_TIMEOUT_S},
           **report.git_commit(), "machine": report.machine(), "runs": runs,
           "summary": summary}
    report.write_json(out / "publish.json", doc)
    text = markdown(doc)
    (out / "publish.md").write_text(text)
    print(text)
    return 0


def markdown(doc: dict[str, Any]) -> str:
    p, s = doc["params"], doc["summary"]
    n = sum(r["picks_publishing"]["n"] for r in doc["runs"]) // max(1, len(doc["runs"]))

    def ms(x: dict[str, float]) -> str:
        return report.with_spread(x, fmt=report.milliseconds)

    def count(x: dict[str, float]) -> str:
        return f"{x['median']:.0f} ({x['min']:.0f}-{x['max']:.0f})"

    rows = [[mode, count(s[mode]["picks_failed_open_publishing"]),
             ms(s[mode]["picks_publishing_p99_s"]), ms(s[mode]["picks_publishing_max_s"]),
             ms(s[mode]["picks_quiet_p50_s"]), ms(s[mode]["ads_publishing_p99_s"]),
             ms(s[mode]["ads_publishing_max_s"]), ms(s[mode]["ads_quiet_p50_s"])]
            for mode in MODES]
    lag = max(r["driver_lag_s"]["p99"] for r in doc["runs"])
    return (
        f"# Picks and ADS during a {p['pools'] * p['replicas_per_pool']:,}-replica publish\n\n"
        f"`serve --extproc-port` with the picker in-process (`--extproc-in-process`) and in its "
        f"own process (the default), interleaved, {p['repeats']} repeats, a fresh `serve` each. "
        f"{p['pools']} pools of {p['replicas_per_pool']} replicas; {p['publishes']} rewrites of "
        f"the pool file changing every replica's capacity, {p['publish_window_s']:.0f} s each; "
        f"picks of one pool at {p['picks_per_s']:.0f}/s over gRPC (~{n} per run while "
        f"publishing), a pick later than {p['pick_timeout_s']} s counts as failed open; a new "
        f"ADS stream every {p['ads_probe_interval_s']} s, timed to its first answer. "
        f"Median (min-max) over repeats; the driver's own lateness p99 was at most "
        f"{lag * 1000:.1f} ms.\n\n"
        + report.markdown_table(
            ["picker", "picks failed open while publishing", "answered pick p99", "answered max",
             "pick p50 (quiet)", "ADS first answer p99", "ADS max", "ADS p50 (quiet)"], rows)
        + f"\n\nCommit {doc['commit']}{' (dirty tree)' if doc['dirty'] else ''}; "
        f"{doc['machine']['nproc']} cores, load average at start "
        f"{doc['machine']['loadavg_at_start'][0]:.1f}.\n")
