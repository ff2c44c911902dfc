"""Routing quality: the project's weights against Envoy's own balancers and an oracle.

One process tree, one run (BENCH.md): the fleet (simulated replicas on three nodes, four
Envoys, Prometheus) stays up; for each repeat, each policy in turn gets a control plane with
its `serve` flags and then every load point of the case, so policies are interleaved
(A B C ... A B C ...) and each repeat replays the same seeded schedules against each.
Figures that matter are ratios to the oracle in the same repeat.

Cases: `main` (every policy, the load sweep, a burst, long shared-prefix prompts, a slow
replica), `herding` (issue 5: 1 s vs 5 s stale loads, damped vs undamped), `hybrid`
(issue 6: on-node share and p99 TTFT of hybrid vs global weights vs round robin) and `ranks`
(issue 16: the picker choosing the DP rank vs leaving it to the replica, at 85% and with one
slow rank).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from xds_server.bench import report
from xds_server.bench.fleet import ENVOYS, Fleet, instant_endpoint
from xds_server.bench.oracle import OracleReplayer
from xds_server.bench.procs import scratch
from xds_server.bench.report import progress
from xds_server.bench.routing_report import write_outputs
from xds_server.bench.routing_stats import (
    cross_node,
    full_rank_share,
    latency,
    mean_cv,
    node_depth_ratio,
    on_node_share,
    per_rank_depths,
    picked_share,
)
from xds_server.ports import free_ports
from xds_server.sim.engine import EngineSettings
from xds_server.sim.server import ServerSettings
from xds_server.workload import Burst, Entry, LengthMix, Replayer, schedule

#: The simulator's served model; the `x-model` header picks the pool in Envoy.
MODEL = "Qwen/Qwen3-0.6B"
MODEL_HEADERS = {"x-model": "qwen3"}
#: workload.py's ShareGPT-like prompts; outputs a median of 60 tokens (not 150), clipped at
#: 160, so that two cores can stream a saturating load and a point drains in seconds.
SHAREGPT_SHORT = LengthMix(output_median=60.0, output_max=160)
#: Long prompts that share a system prompt: at least 1024 tokens, a ShareGPT-ish tail on top.
#: The Replayer's prompts all start with the same text, so this is a shared prefix as well.
SHARED_PREFIX = LengthMix(prompt_median=1200.0, prompt_sigma=0.3, prompt_min=1024,
                          output_median=60.0, output_max=160)
#: Where another engineer's per-request picker goes; included when `serve` can host it.
EXTPROC_SLOT = "weights+extproc-picker"
UNDAMPED = ("--smoothing-s", "0", "--max-step-per-s", "0", "--deadband", "0")


@dataclass(frozen=True)
class Policy:
    """A routing policy: `serve` flags, or None for the oracle (no proxy, no control plane)."""

    name: str
    flags: tuple[str, ...] | None
    what: str
    needs_prometheus: bool = False


@dataclass(frozen=True)
class Point:
    """One workload: a load (share of measured capacity) and what makes it special."""

    name: str
    load: float
    kind: str = "poisson"  # poisson | bursty | prefix | hetero | skewed | slow-rank


@dataclass(frozen=True)
class Plan:
    """Everything that sizes a run; written into the JSON as the run's parameters."""

    case: str
    quick: bool
    repeats: int
    duration_s: float
    points: tuple[Point, ...]
    policies: tuple[Policy, ...]
    time_scale: float
    max_num_seqs: int
    seed: int = 20250
    sample_interval_s: float = 0.2
    drain_timeout_s: float = 20.0
    probe_s: float = 16.0
    lengths: LengthMix = field(default_factory=lambda: SHAREGPT_SHORT)
    prefix_lengths: LengthMix = field(default_factory=lambda: SHARED_PREFIX)
    burst_entry: str = "node-a"
    slow_replica_slowdown: float = 3.0
    #: The local rank a `slow-rank` point slows (by `slow_replica_slowdown`) in the slow
    #: replica; its other rank runs at full speed.
    slow_rank: int = 1
    #: A cross-node hop in simulated seconds: once per request, and per streamed chunk.
    hop_s: float = 0.0
    hop_chunk_s: float = 0.0


def policies(prometheus_url: bool, seqs: int) -> dict[str, Policy]:
    """Every policy the cases draw from, by name."""
    room = ("--max-num-seqs", str(seqs))
    prom: tuple[str, ...] = ("--metrics", "prometheus", "--prometheus-url", "PROMETHEUS")
    stale5 = prom if prometheus_url else ("--metrics", "scrape", "--scrape-interval-s", "5")
    return {p.name: p for p in (
        Policy("round-robin", ("--metrics", "none", "--lb-policy", "round_robin",
                               "--local-first", "false"),
               "Envoy round robin (a Kubernetes Service)"),
        Policy("least-request", ("--metrics", "none", "--local-first", "false"),
               "Envoy least-request, each Envoy on its own in-flight counts"),
        Policy("weights-scrape", ("--metrics", "scrape", "--local-first", "false", *room),
               "weights from a direct 1 s scrape, global"),
        Policy("weights-prometheus", (*prom, "--local-first", "false", *room),
               "weights from Prometheus (5 s scrape), global", needs_prometheus=True),
        Policy("hybrid", ("--metrics", "scrape", "--local-first", "true"),
               "serve's defaults, no picker: Envoy's least-request over weights that carry "
               "only lasting differences (capacity times measured decode speed; 1 s "
               "scrape); keep shares and locality weights planned from the Envoys' load "
               "reports (each node its effective capacity's part of the traffic, a hot "
               "entry's excess spilled to the nodes short of theirs); --max-num-seqs left "
               "at its default (256): the room is read from vLLM"),
        Policy("hybrid-rr", ("--metrics", "scrape", "--local-first", "true",
                             "--lb-policy", "round_robin"),
               "the default's weights, keep shares and locality weights with Envoy's "
               "weighted round robin inside each cluster instead of least-request"),
        Policy("hybrid-global", ("--metrics", "scrape", "--local-first", "false"),
               "the default's weights with local-first off: every Envoy over the whole pool"),
        Policy("hybrid-picker", ("--metrics", "scrape", "--local-first", "true",
                                 "--extproc-port", "EXTPROC_PORT"),
               "the default deployment (deploy/, the demo): `hybrid` with the ext_proc "
               "endpoint picker hosted by the control plane: each request to the replica "
               "with the shortest expected wait and its least-loaded rank, counting the "
               "picker's own requests not yet ended; held on the asking Envoy's node while "
               "that node's pick queues no longer than the pool's"),
        Policy("hybrid-picker-global", ("--metrics", "scrape", "--local-first", "false",
                                        "--extproc-port", "EXTPROC_PORT"),
               "the default's weights with the ext_proc picker and local-first off: each "
               "request to the replica with the shortest expected wait in the whole pool"),
        Policy("hybrid-prometheus", (*prom, "--local-first", "true"),
               "`hybrid` fed by Prometheus (5 s scrape)", needs_prometheus=True),
        Policy("hybrid-picker-prometheus", (*prom, "--local-first", "true",
                                            "--extproc-port", "EXTPROC_PORT"),
               "the default deployment with prometheus-url set: `hybrid-picker` with the "
               "weights and the picker's readings from Prometheus (5 s scrape)",
               needs_prometheus=True),
        Policy("hybrid-queue", ("--metrics", "scrape", "--local-first", "true", *room,
                                "--load-model", "queue"),
               "the previous default: weights from each reading's free room (1 s scrape), "
               "node-local first up to --room-threshold 0.7, --max-num-seqs set to the "
               "replicas' own"),
        Policy("envoy-orca-wrr", ("--metrics", "none", "--local-first", "false",
                                  "--lb-policy", "orca_wrr"),
               "Envoy's client_side_weighted_round_robin on vLLM's ORCA reports: vLLM sends "
               "no request rate (and no report on a stream), so every weight stays equal: "
               "round robin"),
        Policy("envoy-load-aware-locality", ("--metrics", "none", "--local-first", "false",
                                             "--lb-policy", "load_aware_locality"),
               "Envoy's load_aware_locality (node = locality, least-request inside): vLLM "
               "reports no utilization it reads, so a node's Envoy stays local (less a 3% "
               "probe) and the central one spreads by host count"),
        Policy("oracle", None, "client-side join-shortest-expected-wait on true queues"),
        Policy(EXTPROC_SLOT, ("--metrics", "scrape", "--local-first", "false", *room,
                              "--extproc-port", "EXTPROC_PORT"),
               "weights (1 s scrape) + the ext_proc endpoint picker hosted in the control "
               "plane (fails open to the weights)"),
        Policy("picker-rank", ("--metrics", "scrape", "--local-first", "false", *room,
                               "--extproc-port", "EXTPROC_PORT", "--extproc-pin-rank", "true"),
               "weights (1 s scrape) + the ext_proc picker, which also names the picked "
               "replica's least-loaded DP rank (X-data-parallel-rank)"),
        Policy("picker-no-rank", ("--metrics", "scrape", "--local-first", "false", *room,
                                  "--extproc-port", "EXTPROC_PORT",
                                  "--extproc-pin-rank", "false"),
               "the same picker naming only the replica: the replica's own DP balancer "
               "(vLLM's, on counts up to 100 ms old) chooses the rank"),
        Policy("fresh-damped", ("--metrics", "scrape", "--local-first", "false", *room),
               "1 s old loads (direct scrape), damped"),
        Policy("weights-steady", ("--metrics", "scrape", "--local-first", "false", *room,
                                  "--smoothing-s", "10", "--deadband", "0.25"),
               "weights from a 1 s scrape, moved only by lasting differences (10 s smoothing, "
               "25% deadband)"),
        Policy("fresh-undamped", ("--metrics", "scrape", "--local-first", "false", *room,
                                  *UNDAMPED), "1 s old loads, undamped"),
        Policy("stale-damped", (*stale5, "--local-first", "false", *room),
               "5 s old loads, damped", needs_prometheus=prometheus_url),
        Policy("stale-undamped", (*stale5, "--local-first", "false", *room, *UNDAMPED),
               "5 s old loads, undamped", needs_prometheus=prometheus_url),
    )}


#: Policies each case compares, in the order they take turns.
CASE_POLICIES = {
    "main": ("round-robin", "least-request", "envoy-orca-wrr", "envoy-load-aware-locality",
             "hybrid", "hybrid-picker", "hybrid-prometheus", "oracle"),
    "herding": ("fresh-damped", "fresh-undamped", "stale-damped", "stale-undamped", "oracle"),
    "hybrid": ("round-robin", "weights-scrape", "hybrid", "oracle"),
}
CASE_POLICIES["prefix"] = CASE_POLICIES["main"]
CASE_POLICIES["extproc"] = ("round-robin", "least-request", "hybrid", "hybrid-picker",
                            "hybrid-picker-global", "oracle")
CASE_POLICIES["ranks"] = ("round-robin", "picker-rank", "picker-no-rank", "oracle")
SWEEP = (Point("50%", 0.5), Point("70%", 0.7), Point("85%", 0.85), Point("95%", 0.95))
CASE_POINTS = {
    "main": (*SWEEP, Point("bursty", 0.7, "bursty"), Point("slow-replica", 0.85, "hetero"),
             Point("skewed-entry", 0.85, "skewed")),
    # Not in `main` to keep the default run near 20 minutes on 2 cores; the simulator has
    # no prefix cache, so this only exercises routing of long prompts with one prefix.
    "prefix": (Point("shared-prefix", 0.7, "prefix"),),
    "extproc": (Point("85%", 0.85), Point("95%", 0.95), Point("bursty", 0.7, "bursty"),
                Point("slow-replica", 0.85, "hetero"), Point("skewed-entry", 0.85, "skewed")),
    "herding": (Point("85%", 0.85), Point("95%", 0.95)),
    "ranks": (Point("85%", 0.85), Point("slow-rank", 0.85, "slow-rank")),
    "hybrid": SWEEP,
}


def make_plan(args: argparse.Namespace) -> Plan:
    case = args.case
    points = CASE_POINTS[case]
    if args.quick:
        points = tuple(p for p in points if p.name in ("85%", "95%"))[:1]
    if args.points:
        wanted = [name.strip() for name in args.points.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {p.name for p in CASE_POINTS[case]})
        if unknown:
            raise SystemExit(f"hybridlb bench routing: case {case} has no point "
                             f"{', '.join(unknown)}; it has "
                             f"{', '.join(p.name for p in CASE_POINTS[case])}")
        points = tuple(p for p in CASE_POINTS[case] if p.name in wanted)
    repeats = (1 if args.quick else 3) if args.repeats is None else args.repeats
    duration_s = (6.0 if args.quick else 5.0) if args.point_s is None else args.point_s
    if repeats < 1 or duration_s <= 0:
        raise SystemExit("hybridlb bench routing: --repeats must be 1 or more and --point-s "
                         "above 0")
    return Plan(
        case=case, quick=args.quick, repeats=repeats,
        duration_s=duration_s, points=points, policies=(),
        time_scale=args.time_scale, max_num_seqs=args.max_num_seqs,
        hop_s=args.hop_ms / 1000, hop_chunk_s=args.hop_chunk_ms / 1000,
        probe_s=12.0 if args.quick else 20.0,
    )


def point_fault(plan: Plan, point: Point) -> dict[str, Any]:
    """The simulator fault a point sets on the slow replica while it runs ({}: none)."""
    if point.kind == "hetero":
        return {"slowdown": plan.slow_replica_slowdown}
    if point.kind == "slow-rank":
        return {"slowdown": plan.slow_replica_slowdown, "slow_rank": plan.slow_rank}
    return {}


def timing_model(plan: Plan) -> dict[str, Any]:
    """The simulator's timing model as run: its defaults with this run's overrides."""
    model = dataclasses.asdict(EngineSettings())
    model["frontend_overhead_s"] = ServerSettings().frontend_overhead_s
    model.update(time_scale=plan.time_scale, max_num_seqs=plan.max_num_seqs)
    return model


def sim_args(plan: Plan) -> list[str]:
    return ["--time-scale", str(plan.time_scale), "--max-num-seqs", str(plan.max_num_seqs),
            "--hop-s", str(plan.hop_s), "--hop-chunk-s", str(plan.hop_chunk_s)]


#: The node each entry sends from; the central Envoy is on no GPU node, so every request
#: through it crosses a hop.
ORIGINS = {name: node or "central" for name, node in ENVOYS.items()}


@dataclass
class Sampler:
    """Every replica's true queue every `interval_s`, while a point runs."""

    addresses: Sequence[str]
    interval_s: float
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, started: float) -> None:
        async def one(address: str) -> tuple[str, Any]:
            async with session.get(f"http://{address}/sim/state") as response:
                return address, await response.json()

        while True:
            tick = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                states = dict(await asyncio.gather(*(one(a) for a in self.addresses)))
                self.samples.append((tick - started, per_rank_depths(states)))
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - tick)))


@dataclass
class ControlSampler:
    """The control plane's published weights, locality weights and keep shares, and the
    Envoys' ingress it read, every `interval_s` (what the policy did and from what, beside
    the queues it did it to): /debug/state."""

    admin: str
    interval_s: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, started: float) -> None:
        while True:
            tick = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{self.admin}/debug/state") as response:
                    doc = await response.json()
                pool = doc["pools"][0]
                self.samples.append({
                    "t": round(tick - started, 2), "xds_version": doc["xds_version"],
                    "keep": {n: v["keep_per_mille"] for n, v in pool["nodes"].items()},
                    "localities": {n: v["weight"] for n, v in pool["nodes"].items()},
                    "weights": {r["address"]: r["weight"] for r in pool["replicas"]},
                    # What the policy read each replica's load against: its load per slot
                    # (averaged) and the room per rank it believes, and each node's load.
                    "utilization": {r["address"]: (r["weight_inputs"] or {}).get("utilization")
                                    for r in pool["replicas"]},
                    "slots": {r["address"]: (r["weight_inputs"] or {}).get("slots")
                              for r in pool["replicas"]},
                    "node_utilization": {n: v["utilization"] for n, v in pool["nodes"].items()},
                    "ingress": doc.get("ingress", {}).get(pool["name"], {}),
                })
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - tick)))


class Bench:
    """One run of a case: owns the fleet, the measurements and the progress display."""

    def __init__(self, plan: Plan, fleet: Fleet) -> None:
        self.plan = plan
        self.fleet = fleet
        self.runs: list[dict[str, Any]] = []
        self.series: dict[str, list[tuple[float, dict[str, float]]]] = {}
        self.control: dict[str, list[dict[str, Any]]] = {}
        self.capacity_rps = math.nan
        self.started = time.monotonic()
        self.done_points = 0
        self.total_points = plan.repeats * len(plan.policies) * len(plan.points)
        self.point_s: list[float] = []

    def entries(self, point: Point | None = None) -> list[Entry]:
        if point is not None and point.kind == "skewed":
            # An uneven ingress: one node's Envoy takes half of all requests while its node
            # holds under a third of the ranks; the others share the other half.
            hot = self.plan.burst_entry
            rest = 0.5 / (len(ENVOYS) - 1)
            return [Entry(name, 0.5 if name == hot else rest) for name in ENVOYS]
        return [Entry(name) for name in ENVOYS]

    def arrivals(self, point: Point, repeat: int, rate: float) -> list[Any]:
        plan = self.plan
        bursts: tuple[Burst, ...] = ()
        if point.kind == "bursty":
            # A hot node: for the middle third, its Envoy gets as much again as the whole base.
            bursts = (Burst(start_s=plan.duration_s / 3, duration_s=plan.duration_s / 3,
                            rate_rps=rate * 0.6, entry=plan.burst_entry),)
        return schedule(seed=plan.seed + repeat, rate_rps=rate, duration_s=plan.duration_s,
                        entries=self.entries(point),
                        lengths=plan.prefix_lengths if point.kind == "prefix" else plan.lengths,
                        bursts=bursts)

    def slow_replica(self) -> str:
        return next(a for a, n in self.fleet.replica_nodes.items() if n == "node-a")

    async def wait_idle(self, session: aiohttp.ClientSession, timeout_s: float = 30) -> None:
        """Until no replica has anything queued, running or in its front end."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 0
            for address in self.fleet.replica_nodes:
                async with session.get(f"http://{address}/sim/state") as response:
                    state = await response.json()
                busy += int(state["in_flight"]) + sum(
                    int(r["running"]) + int(r["waiting"]) for r in state["ranks"])
            if busy == 0:
                return
            await asyncio.sleep(0.2)
        progress(f"warning: replicas still busy after {timeout_s:.0f} s")

    def replayer(self, policy: Policy, repeat: int) -> Replayer:
        if policy.flags is None:
            visible = ServerSettings().frontend_overhead_s * self.plan.time_scale + 0.05
            return OracleReplayer(urls={n: "" for n in ENVOYS}, model=MODEL,
                                  headers=MODEL_HEADERS, origin_nodes=ORIGINS,
                                  addresses=list(self.fleet.replica_nodes),
                                  visible_after_s=visible, seed=repeat)
        return Replayer(urls=self.fleet.envoy_urls, model=MODEL, headers=MODEL_HEADERS,
                        origin_nodes=ORIGINS)

    async def replay(self, session: aiohttp.ClientSession, replayer: Replayer,
                     arrivals: Sequence[Any]) -> bool:
        await replayer.run(arrivals, session)
        drained = await replayer.drain(self.plan.drain_timeout_s)
        if not drained:
            await replayer.cancel()
        return drained

    async def probe_capacity(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Overload every replica directly; completions per second are the fleet's capacity.

        Straight to the replicas, each offered load in proportion to its ranks, so neither a
        proxy nor a router (the oracle reads eight states per request) limits the figure.
        """
        plan = self.plan
        estimate = estimate_capacity(plan, self.fleet.replica_ranks)
        rate = 1.5 * estimate
        entries = [Entry(a, share=r) for a, r in self.fleet.replica_ranks.items()]
        arrivals = schedule(seed=plan.seed - 1, rate_rps=rate, duration_s=plan.probe_s,
                            entries=entries, lengths=plan.lengths)
        direct = Replayer(urls={a: f"http://{a}" for a in self.fleet.replica_ranks},
                          model=MODEL)
        progress(f"capacity probe: {rate:.1f} req/s for {plan.probe_s:.0f} s "
                 f"(model estimate {estimate:.1f} req/s)")
        await direct.run(arrivals, session)
        await direct.cancel()
        warm = plan.probe_s * 0.4
        finished = [r for r in direct.results
                    if r.ok and r.e2e_s is not None and warm <= r.sent_s + r.e2e_s
                    <= plan.probe_s]
        measured = len(finished) / (plan.probe_s - warm)
        await self.wait_idle(session)
        progress(f"capacity: {measured:.1f} req/s")
        self.capacity_rps = measured
        return {"offered_rps": rate, "model_estimate_rps": estimate, "measured_rps": measured,
                "window_s": [warm, plan.probe_s]}

    async def overhead(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        """The client against an instant endpoint at the heaviest rate it will offer."""
        rate = 0.95 * self.capacity_rps * 1.6
        arrivals = schedule(seed=self.plan.seed, rate_rps=rate, duration_s=6.0,
                            entries=self.entries(), lengths=self.plan.lengths)
        replayer = Replayer(urls={n: url for n in ENVOYS}, model=MODEL)
        cpu = time.process_time()
        await self.replay(session, replayer, arrivals)
        cpu = time.process_time() - cpu
        doc: dict[str, Any] = dict(latency(replayer.results, 6.0))
        doc.update(rate_rps=rate, cpu_s=cpu, cpu_s_per_request=cpu / max(1, len(arrivals)))
        progress(f"client overhead: TTFT p50 {report.seconds(doc['ttft_p50_s'])}, "
                 f"p99 {report.seconds(doc['ttft_p99_s'])}, "
                 f"{doc['cpu_s_per_request'] * 1000:.2f} ms CPU per request")
        return doc

    def show(self, policy: Policy, point: Point, repeat: int, rate: float) -> None:
        left = self.total_points - self.done_points
        each = (sum(self.point_s) / len(self.point_s) if self.point_s
                else self.plan.duration_s + 6)
        progress(f"repeat {repeat + 1}/{self.plan.repeats} · {policy.name} · {point.name} "
                 f"({rate:.1f} req/s) · point {self.done_points + 1}/{self.total_points} · "
                 f"~{left * each / 60:.1f} min left")

    async def run_point(self, session: aiohttp.ClientSession, policy: Policy, point: Point,
                        repeat: int) -> None:
        plan = self.plan
        began = time.monotonic()
        rate = point.load * self.capacity_rps
        self.show(policy, point, repeat, rate)
        fault = point_fault(plan, point)
        slow = self.slow_replica() if fault else ""
        if slow:
            self.fleet.fault(slow, fault)
        arrivals = self.arrivals(point, repeat, rate)
        replayer = self.replayer(policy, repeat)
        sampler = Sampler(list(self.fleet.replica_nodes), plan.sample_interval_s)
        control = ControlSampler(self.fleet.admin)
        cpu = time.process_time()
        others = self.fleet.cpu_by_role()
        t0 = time.monotonic()
        sampling = [asyncio.create_task(sampler.run(session, t0))]
        if policy.flags is not None and repeat == 0:
            sampling.append(asyncio.create_task(control.run(session, t0)))
        try:
            drained = await self.replay(session, replayer, arrivals)
        finally:
            for task in sampling:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if slow:
                self.fleet.fault(slow, {"clear": True})
        cpu = time.process_time() - cpu
        others = {k: v - others.get(k, 0.0) for k, v in self.fleet.cpu_by_role().items()}
        window = [s for t, s in sampler.samples if t <= plan.duration_s]
        run: dict[str, Any] = {
            "policy": policy.name, "point": point.name, "kind": point.kind, "load": point.load,
            "repeat": repeat, "offered_rps": rate, "arrivals": len(arrivals),
            "drained": drained,
            **latency(replayer.results, plan.duration_s),
            "imbalance_cv": mean_cv(window),
            "on_node_share": on_node_share(replayer.results, ENVOYS, self.fleet.replica_nodes),
            "served_by_node": _served_by_node(replayer, self.fleet.replica_nodes),
            "picked_share": picked_share(replayer.results),
            "full_rank_share": full_rank_share(replayer.results, plan.max_num_seqs),
            **cross_node(replayer.results, ORIGINS, self.fleet.replica_nodes),
            "client_cpu_s": cpu,
            # Where the machine's time went: a policy that costs CPU slows everything here.
            "cpu_s_by_role": others,
            "cp_cpu_s": others.get("cp", math.nan),
            # Other work on this shared machine moves every figure: say how busy it was.
            "loadavg_1m": os.getloadavg()[0],
            "errors": sorted({r.error for r in replayer.results if r.error})[:5],
        }
        if point.kind == "skewed":
            run["hot_node_depth_ratio"] = node_depth_ratio(
                (s for _, s in sampler.samples), self.fleet.replica_nodes, plan.burst_entry)
        if isinstance(replayer, OracleReplayer):
            run["oracle_decision_p50_s"] = report.percentile(replayer.decision_s, 50)
            run["oracle_decision_p99_s"] = report.percentile(replayer.decision_s, 99)
        self.runs.append(run)
        if repeat == 0 and point.name in ("85%", "slow-replica", "slow-rank", "skewed-entry"):
            self.series[f"{point.name}/{policy.name}"] = sampler.samples
        if control.samples:
            self.control[f"{point.name}/{policy.name}"] = control.samples
        await self.wait_idle(session)
        self.fleet.check_alive()
        self.done_points += 1
        self.point_s.append(time.monotonic() - began)
        progress(f"  {policy.name} {point.name}: TTFT p99 {report.seconds(run['ttft_p99_s'])}, "
                 f"failed {run['failed']}, CV {run['imbalance_cv']:.2f}, "
                 f"on-node {run['on_node_share']:.2f}")

    async def run(self, instant_url: str) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.plan.drain_timeout_s + 120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            capacity = await self.probe_capacity(session)
            overhead = await self.overhead(session, instant_url)
            restarts: list[float] = []
            for repeat in range(self.plan.repeats):
                # Rotate the order each repeat so no policy always runs right after another.
                order = list(self.plan.policies)
                shift = repeat % len(order)
                for policy in order[shift:] + order[:shift]:
                    if policy.flags is None:
                        self.fleet.stop_control_plane()
                    else:
                        began = time.monotonic()
                        placeholders = {"PROMETHEUS": self.fleet.prometheus_url,
                                        "EXTPROC_PORT": str(free_ports(1)[0])}
                        flags = [placeholders.get(f, f) for f in policy.flags]
                        progress(f"control plane for {policy.name}")
                        self.fleet.start_control_plane(policy.name, flags)
                        progress(f"  ready after {self.fleet.last_ready_s:.1f} s, every Envoy "
                                 f"ACKed after {self.fleet.last_acked_s:.1f} s")
                        # The first loads and weights land after a scrape or two.
                        await asyncio.sleep(2.0)
                        restarts.append(time.monotonic() - began)
                    for point in self.plan.points:
                        await self.run_point(session, policy, point, repeat)
            self.fleet.stop_control_plane()
        return {"capacity": capacity, "client_overhead": overhead,
                "control_plane_restart_s": report.spread(restarts)}


def _served_by_node(replayer: Replayer, replica_nodes: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in replayer.results:
        node = replica_nodes.get(r.replica, "none")
        counts[node] = counts.get(node, 0) + 1
    return counts


def estimate_capacity(plan: Plan, ranks: dict[str, int]) -> float:
    """Requests per wall second the fleet serves at full batches, from the timing model."""
    engine = EngineSettings()
    out = plan.lengths.mean_output_tokens()
    prompt = plan.lengths.mean_prompt_tokens()
    seqs = plan.max_num_seqs
    # A full rank decodes `seqs` tokens a step and prefills each prompt once along the way.
    step = (engine.step_base_s + engine.decode_token_s * seqs
            + engine.prefill_token_s * prompt * seqs / out)
    per_rank = seqs / (out * step)
    return per_rank * sum(ranks.values()) / plan.time_scale


def main(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    names = CASE_POLICIES[plan.case]
    if args.policies:
        # Any policy the bench knows, in the order given: a case is a default, not a limit.
        known = tuple(policies(True, plan.max_num_seqs))
        names = tuple(dict.fromkeys(n.strip() for n in args.policies.split(",") if n.strip()))
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SystemExit(f"hybridlb bench routing: no policy {', '.join(unknown)}; "
                             f"there are {', '.join(known)}")
    out = Path(args.out)
    with_prometheus = shutil.which("prometheus") is not None
    available = policies(with_prometheus, plan.max_num_seqs)
    skipped: dict[str, str] = {}
    chosen = []
    for name in names:
        policy = available[name]
        if policy.needs_prometheus and not with_prometheus:
            skipped[name] = "Debian's prometheus is not installed"
            continue
        chosen.append(policy)
    plan = dataclasses.replace(plan, policies=tuple(chosen))
    bench_started = time.monotonic()
    doc: dict[str, Any] = {
        "benchmark": "routing", "case": plan.case, "params": dataclasses.asdict(plan),
        "git": report.git_commit(), "machine": report.machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing_model": timing_model(plan), "skipped_policies": skipped,
        "fleet": {}, "policies": {p.name: p.what for p in plan.policies},
    }
    try:
        with scratch("hybridlb-bench-routing-") as workdir, contextlib.ExitStack() as stack:
            progress(f"routing bench, case {plan.case}{' (quick)' if plan.quick else ''}: "
                     f"{len(plan.policies)} policies x {len(plan.points)} points x "
                     f"{plan.repeats} repeats; logs in {workdir}")
            fleet = Fleet(workdir=workdir, stack=stack, sim_args=sim_args(plan),
                          with_prometheus=with_prometheus)
            fleet.start()
            doc["fleet"] = {"replicas": fleet.replica_nodes, "ranks": fleet.replica_ranks,
                            "envoys": ENVOYS, "prometheus": with_prometheus,
                            "prometheus_interval_s": fleet.prometheus_interval_s}
            bench = Bench(plan, fleet)
            with instant_endpoint(workdir) as instant_url:
                doc.update(asyncio.run(bench.run(instant_url)))
            doc["runs"] = bench.runs
            doc["series"] = {k: [[t, s] for t, s in v] for k, v in bench.series.items()}
            doc["control_series"] = bench.control
            progress("stopping")
    except (RuntimeError, TimeoutError) as exc:
        progress(f"failed: {exc}")
        return 1
    doc["run_time_s"] = time.monotonic() - bench_started
    stem = "routing" if plan.case == "main" else f"routing-{plan.case}"
    for path in write_outputs(doc, out, stem):
        progress(f"wrote {path}")
    return 0

