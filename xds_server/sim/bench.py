"""Benchmark: how many simulated ranks, and how many requests per second, one core sustains
with the timing model honoured.

The simulator runs in real time (`--time-scale 1`) in its own process pinned to one core;
the load generator runs in this process on another core. Load is Poisson, non-streamed
completions of 512 prompt tokens (as token ids) and 128 output tokens (`ignore_eos`), the
workload the default timing model was fitted to, spread round robin over the servers.

"Honoured" is judged by the scheduling error: for every engine step, how late (wall clock)
it ended compared with the simulated timeline, read from each server's `GET /sim/steps`.
Two sweeps, repeated and interleaved: ranks at a fixed light per-rank load (the cost of many
busy engine loops), and request rate at a fixed number of ranks (the cost of HTTP). Idle
ranks are measured too (they should cost nothing). Output: JSON (parameters, git commit,
every run), a markdown table and a PNG plot.

    python -m xds_server.sim.bench --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from xds_server.sim.engine import EngineSettings
from xds_server.sim.server import ServerSettings

MODEL = ServerSettings().model_name
PROMPT_TOKENS = 512
OUTPUT_TOKENS = 128
HONOURED_P99_LATENESS_S = 0.005
"""A step may end up to 5 ms late at p99: about two steps of the default model, less than a
client can tell from network jitter. (The median is bounded below by epoll's 1 ms timer
resolution: about 0.5 ms late even on an idle core.)"""


@dataclass(frozen=True)
class BenchParams:
    rank_sweep: tuple[int, ...] = (8, 16, 32, 64, 128)
    rank_sweep_rate_per_rank: float = 4.0
    rate_sweep: tuple[float, ...] = (100.0, 200.0, 400.0, 800.0)
    rate_sweep_ranks: int = 16
    """16 default ranks saturate near 16 x 95 = 1520 req/s, so the rate sweep stays below
    the model's capacity and measures the simulator, not simulated queueing."""
    ranks_per_replica: int = 8
    idle_ranks: int = 256
    duration_s: float = 5.0
    warmup_s: float = 1.0
    repeats: int = 3
    seed: int = 1


@dataclass
class RunResult:
    sweep: str
    ranks: int
    target_rps: float
    repeat: int
    offered_rps: float = 0.0
    sent: int = 0
    ok: int = 0
    failed: int = 0
    achieved_rps: float = 0.0
    sim_cpu_share: float = 0.0
    loadgen_cpu_share: float = 0.0
    other_cpu_share_on_sim_core: float = 0.0
    steps: int = 0
    step_planned_p50_s: float = 0.0
    lateness_p50_s: float = 0.0
    lateness_p99_s: float = 0.0
    lateness_max_s: float = 0.0
    e2e_p50_s: float = 0.0
    e2e_p99_s: float = 0.0
    honoured: bool = False
    notes: list[str] = field(default_factory=list)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class SimProcess:
    """A `python -m xds_server.sim` child pinned to one core."""

    def __init__(self, *, replicas: int, ranks: int, core: int | None) -> None:
        self.replicas, self.ranks, self.core = replicas, ranks, core
        self.addresses: list[str] = []
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> SimProcess:
        core = self.core

        def pin() -> None:
            if core is not None:
                os.sched_setaffinity(0, {core})

        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.sim", "--log-level", "WARNING", "--port", "0",
            "--replicas", str(self.replicas), "--ranks", str(self.ranks), "--time-scale", "1",
            stdout=asyncio.subprocess.PIPE, preexec_fn=pin,
        )
        assert self._process.stdout is not None
        line = (await asyncio.wait_for(self._process.stdout.readline(), 30)).decode()
        if not line.startswith("hybridlb sim: ready on "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.addresses = line.split(" on ", 1)[1].strip().split(", ")
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def __aexit__(self, *_exc: object) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._process.wait(), 30)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


async def _fetch_steps(session: aiohttp.ClientSession, addresses: Sequence[str]
                       ) -> list[tuple[float, float]]:
    steps: list[tuple[float, float]] = []
    for address in addresses:
        async with session.get(f"http://{address}/sim/steps") as response:
            body = await response.json()
        scale = float(body["time_scale"])
        steps.extend((planned * scale, late * scale) for planned, late in body["steps"])
    return steps


async def _drive(
    session: aiohttp.ClientSession, addresses: Sequence[str], *, rate_rps: float,
    duration_s: float, rng: random.Random,
) -> tuple[int, int, int, list[float]]:
    """Poisson arrivals for `duration_s`; returns sent, ok, failed and client e2e times."""
    body = {"model": MODEL, "prompt": [1] * PROMPT_TOKENS, "max_tokens": OUTPUT_TOKENS,
            "ignore_eos": True}
    payload = json.dumps(body).encode()
    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0}

    async def one(address: str) -> None:
        started = time.perf_counter()
        try:
            async with session.post(f"http://{address}/v1/completions", data=payload,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        counts["ok" if ok else "failed"] += 1
        if ok:
            latencies.append(time.perf_counter() - started)

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    next_at = 0.0
    index = 0
    while next_at < duration_s:
        delay = start + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(addresses[index % len(addresses)])))
        index += 1
        next_at += rng.expovariate(rate_rps)
    await asyncio.gather(*tasks)
    return len(tasks), counts["ok"], counts["failed"], latencies


async def _run_point(params: BenchParams, *, sweep: str, ranks: int, rate_rps: float,
                     repeat: int, sim_core: int | None) -> RunResult:
    result = RunResult(sweep=sweep, ranks=ranks, target_rps=rate_rps, repeat=repeat)
    per_replica = min(ranks, params.ranks_per_replica)
    replicas = max(1, ranks // per_replica)
    rng = random.Random(params.seed * 1000 + repeat)
    connector = aiohttp.TCPConnector(limit=0)
    async with SimProcess(replicas=replicas, ranks=per_replica, core=sim_core) as sim, \
            aiohttp.ClientSession(connector=connector) as session:
        sim_proc, me = psutil.Process(sim.pid), psutil.Process()
        if params.warmup_s > 0:
            await _drive(session, sim.addresses, rate_rps=rate_rps,
                         duration_s=params.warmup_s, rng=rng)
        await _fetch_steps(session, sim.addresses)  # forget the warm-up's steps
        core_before = _core_busy_s(sim_core)
        sim_cpu, my_cpu, wall = sim_proc.cpu_times(), me.cpu_times(), time.perf_counter()
        sent, ok, failed, latencies = await _drive(
            session, sim.addresses, rate_rps=rate_rps, duration_s=params.duration_s, rng=rng)
        elapsed = time.perf_counter() - wall
        sim_after, my_after = sim_proc.cpu_times(), me.cpu_times()
        core_busy_s = _core_busy_s(sim_core) - core_before
        steps = await _fetch_steps(session, sim.addresses)
    result.sent, result.ok, result.failed = sent, ok, failed
    # Completions per second of the arrival window (the tail after it only drains).
    result.achieved_rps = ok / params.duration_s
    result.offered_rps = sent / params.duration_s
    result.sim_cpu_share = (sim_after.user + sim_after.system - sim_cpu.user
                            - sim_cpu.system) / elapsed
    # Other processes on the simulator's core (this machine is shared): a noise flag.
    result.other_cpu_share_on_sim_core = max(
        0.0, core_busy_s / elapsed - result.sim_cpu_share) if sim_core is not None else 0.0
    if result.other_cpu_share_on_sim_core > 0.1:
        result.notes.append("other processes used the simulator's core")
    result.loadgen_cpu_share = (my_after.user + my_after.system - my_cpu.user
                                - my_cpu.system) / elapsed
    lateness = [late for _planned, late in steps]
    result.steps = len(steps)
    result.step_planned_p50_s = _percentile([planned for planned, _ in steps], 0.5)
    result.lateness_p50_s = _percentile(lateness, 0.5)
    result.lateness_p99_s = _percentile(lateness, 0.99)
    result.lateness_max_s = max(lateness, default=0.0)
    result.e2e_p50_s = _percentile(latencies, 0.5)
    result.e2e_p99_s = _percentile(latencies, 0.99)
    result.honoured = (failed == 0 and result.lateness_p99_s <= HONOURED_P99_LATENESS_S)
    if result.loadgen_cpu_share > 0.9:
        result.notes.append("load generator saturated its core")
    return result


async def _idle_cost(params: BenchParams, sim_core: int | None) -> dict[str, float]:
    per_replica = params.ranks_per_replica
    replicas = max(1, params.idle_ranks // per_replica)
    async with SimProcess(replicas=replicas, ranks=per_replica, core=sim_core) as sim:
        process = psutil.Process(sim.pid)
        before, wall = process.cpu_times(), time.perf_counter()
        await asyncio.sleep(params.duration_s)
        after, elapsed = process.cpu_times(), time.perf_counter() - wall
    cpu = max(0.0, after.user + after.system - before.user - before.system)
    return {"ranks": float(replicas * per_replica), "seconds": elapsed,
            "cpu_share": cpu / elapsed}


def _core_busy_s(core: int | None) -> float:
    if core is None:
        return 0.0
    times = psutil.cpu_times(percpu=True)[core]
    return float(times.user + times.nice + times.system + times.irq + times.softirq)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cores() -> tuple[int | None, int | None]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def _summaries(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Median and spread over repeats, per sweep point."""
    points: dict[tuple[str, int, float], list[RunResult]] = {}
    for result in results:
        points.setdefault((result.sweep, result.ranks, result.target_rps), []).append(result)
    rows = []
    for (sweep, ranks, rate), runs in points.items():
        def stat(name: str, runs: list[RunResult] = runs) -> dict[str, float]:
            values = [float(getattr(run, name)) for run in runs]
            return {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}

        rows.append({
            "sweep": sweep, "ranks": ranks, "offered_rps": rate, "repeats": len(runs),
            "achieved_rps": stat("achieved_rps"),
            "loadgen_cpu_share": stat("loadgen_cpu_share"),
            "other_cpu_share_on_sim_core": stat("other_cpu_share_on_sim_core"),
            "sim_cpu_share": stat("sim_cpu_share"),
            "lateness_p50_ms": {k: v * 1e3 for k, v in stat("lateness_p50_s").items()},
            "lateness_p99_ms": {k: v * 1e3 for k, v in stat("lateness_p99_s").items()},
            "step_p50_ms": stat("step_planned_p50_s")["median"] * 1e3,
            "e2e_p50_s": stat("e2e_p50_s")["median"],
            "failed": sum(run.failed for run in runs),
            "honoured": all(run.honoured for run in runs),
        })
    return rows


def _markdown(rows: Sequence[dict[str, Any]], idle: dict[str, float]) -> str:
    lines = [
        "| sweep | ranks | offered req/s | achieved req/s | sim CPU (1 core) | step p50 ms | "
        "lateness p50 ms | lateness p99 ms (min-max) | e2e p50 s | loadgen CPU | "
        "others on sim core | failed | honoured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        late99 = row["lateness_p99_ms"]
        lines.append(
            f"| {row['sweep']} | {row['ranks']} | {row['offered_rps']:.0f} | "
            f"{row['achieved_rps']['median']:.0f} | {row['sim_cpu_share']['median']:.0%} | "
            f"{row['step_p50_ms']:.2f} | {row['lateness_p50_ms']['median']:.2f} | "
            f"{late99['median']:.2f} ({late99['min']:.2f}-{late99['max']:.2f}) | "
            f"{row['e2e_p50_s']:.3f} | {row['loadgen_cpu_share']['median']:.0%} | "
            f"{row['other_cpu_share_on_sim_core']['median']:.0%} | {row['failed']} | "
            f"{'yes' if row['honoured'] else 'no'} |"
        )
    lines.append("")
    lines.append(f"Idle: {idle['ranks']:.0f} ranks used {idle['cpu_share']:.1%} of a core.")
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, sweep, x_name, x_label in (
        (axes[0], "ranks", "ranks", "simulated ranks (busy, light load each)"),
        (axes[1], "rate", "offered_rps", "offered requests/s (fixed ranks)"),
    ):
        points = sorted((row for row in rows if row["sweep"] == sweep),
                        key=lambda row: row[x_name])
        xs = [row[x_name] for row in points]
        for key, label in (("lateness_p50_ms", "step lateness p50"),
                           ("lateness_p99_ms", "step lateness p99")):
            # a log axis needs positive values; lateness under 10 µs is "on time" anyway
            floor = 0.01
            medians = [max(floor, row[key]["median"]) for row in points]
            errors = [
                [m - max(floor, row[key]["min"]) for m, row in zip(medians, points, strict=True)],
                [max(floor, row[key]["max"]) - m for m, row in zip(medians, points, strict=True)],
            ]
            axis.errorbar(xs, medians, yerr=errors, marker="o", capsize=3, label=label)
        axis.axhline(HONOURED_P99_LATENESS_S * 1e3, color="grey", linestyle=":",
                     label="honoured limit (p99)")
        axis.set_yscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel("ms late (wall clock)")
        cpu = axis.twinx()
        cpu.plot(xs, [row["sim_cpu_share"]["median"] * 100 for row in points], color="black",
                 linestyle="--", marker="x", label="sim CPU %")
        cpu.set_ylabel("simulator CPU, % of one core")
        cpu.set_ylim(0, 110)
        axis.legend(loc="upper left", fontsize=8)
        cpu.legend(loc="lower right", fontsize=8)
    figure.suptitle("vLLM simulator on one core: scheduling error vs load")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


async def run_sim_bench(params: BenchParams, out: Path) -> dict[str, Any]:
    """Run both sweeps (interleaved repeats), write JSON, markdown and PNG into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    sim_core, loadgen_core = _cores()
    original_affinity = os.sched_getaffinity(0)
    if loadgen_core is not None:
        os.sched_setaffinity(0, {loadgen_core})
    results: list[RunResult] = []
    try:
        points = [("ranks", ranks, ranks * params.rank_sweep_rate_per_rank)
                  for ranks in params.rank_sweep]
        points += [("rate", params.rate_sweep_ranks, rate) for rate in params.rate_sweep]
        for repeat in range(params.repeats):
            for sweep, ranks, rate in points:
                result = await _run_point(params, sweep=sweep, ranks=ranks, rate_rps=rate,
                                          repeat=repeat, sim_core=sim_core)
                print(f"[{repeat}] {sweep:5} ranks={ranks:4} rate={rate:6.0f} "
                      f"achieved={result.achieved_rps:6.1f} cpu={result.sim_cpu_share:4.0%} "
                      f"late p50={result.lateness_p50_s * 1e3:.2f}ms "
                      f"p99={result.lateness_p99_s * 1e3:.2f}ms failed={result.failed} "
                      f"others-on-core={result.other_cpu_share_on_sim_core:.0%}",
                      flush=True)
                results.append(result)
        idle = await _idle_cost(params, sim_core)
    finally:
        os.sched_setaffinity(0, original_affinity)
    rows = _summaries(results)
    report: dict[str, Any] = {
        "benchmark": "sim",
        "git_commit": _git_commit(),
        "params": asdict(params),
        "workload": {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                     "arrivals": "poisson", "stream": False},
        "timing_model": asdict(EngineSettings()),
        "frontend_overhead_s": ServerSettings().frontend_overhead_s,
        "honoured_p99_lateness_s": HONOURED_P99_LATENESS_S,
        "cores": {"sim": sim_core, "loadgen": loadgen_core, "machine": os.cpu_count()},
        "summary": rows,
        "idle": idle,
        "runs": [asdict(result) for result in results],
    }
    (out / "sim_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sim_bench.md").write_text(_markdown(rows, idle))
    _plot(rows, out / "sim_bench.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xds_server.sim.bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchParams()
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s,
                        help=f"measured seconds per run (default {defaults.duration_s})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help=f"repeats of every point, interleaved (default {defaults.repeats})")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(defaults.rank_sweep),
                        help=f"rank sweep (default {list(defaults.rank_sweep)})")
    parser.add_argument("--rates", type=float, nargs="+", default=list(defaults.rate_sweep),
                        help=f"request-rate sweep, req/s (default {list(defaults.rate_sweep)})")
    args = parser.parse_args(argv)
    params = BenchParams(rank_sweep=tuple(args.ranks), rate_sweep=tuple(args.rates),
                         duration_s=args.duration_s, repeats=args.repeats)
    report = asyncio.run(run_sim_bench(params, args.out))
    print(_markdown(report["summary"], report["idle"]))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
