"""Run a local demo: simulated vLLM GPUs on a few nodes, the control plane, real Envoys
(one per node plus a central one), Prometheus when it is installed (else the direct scrape),
and an OpenAI-style load with ShareGPT-like lengths, Poisson arrivals and a burst through
the first node's Envoy in the middle. A live view shows every replica's queue, weight and
share, every Envoy's local and keep share, the request rate and TTFT.

It ends after --duration (then lets the requests in flight finish) or on Ctrl-C (a second
Ctrl-C abandons the requests in flight), stops every process it started, and writes
summary.json, demo.png (queues, weights and keep shares over time) and the processes' logs
to --out. Exit status: 0 when every request it sent succeeded, 1 otherwise.

The simulated GPUs run 10 times slower than the H100 they model (--time-scale of
`hybridlb sim`) with --max-num-seqs 8, so that a load two CPU cores can stream fills their
queues. Every request goes through the ext_proc endpoint picker (hosted in the control
plane, as the deployment runs it), which picks a replica per request; with --no-extproc the
weights alone decide.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from xds_server.demo.fleet import MODEL, POOL, ChildExited, Fleet, FleetSettings
from xds_server.demo.monitor import Monitor, Sample
from xds_server.workload import Arrival, Burst, Entry, LengthMix, Result, schedule

NO_PLOT = ("no plot (demo.png): matplotlib is not installed; it comes with the plot extra: "
           "pip install 'vllm-hybrid-lb[plot]'")
#: Share of the base load that enters through the central Envoys (the rest: node Envoys).
CENTRAL_SHARE = 0.25
#: The default rate as a share of the fleet's estimated capacity.
DEFAULT_LOAD = 0.4
#: The burst: extra requests through the first node's Envoy, as a share of the fleet's
#: capacity, from BURST_AT to BURST_AT + BURST_FOR of the run. The first node alone cannot
#: take it, so its Envoy must spill over to the other nodes.
BURST_LOAD = 0.4
BURST_AT = 0.4
BURST_FOR = 0.15
#: ShareGPT-like lengths with the output cut at 512 tokens (1.6% of requests): at a tenth of
#: an H100's speed a 1,024-token answer streams for 20 s, and the run's end would wait for it.
DEMO_LENGTHS = LengthMix(output_max=512)
#: How long requests in flight may take to finish once the run is over.
DRAIN_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    defaults = FleetSettings()
    parser.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                        help="seconds of load (default 60); requests in flight then finish")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), metavar="DIR",
                        help="where summary.json, demo.png and logs/ go (default out/demo)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes, metavar="N",
                        help=f"simulated nodes, each with its own Envoy (default {defaults.nodes})")
    parser.add_argument("--replicas-per-node", type=int, default=defaults.replicas_per_node,
                        metavar="N",
                        help="vLLM API servers per node, each fronting "
                        f"{defaults.ranks} DP ranks (default {defaults.replicas_per_node})")
    parser.add_argument("--envoys", type=int, default=defaults.central_envoys, metavar="N",
                        help="central Envoys (on no node), besides the one per node "
                        f"(default {defaults.central_envoys}); they take "
                        f"{CENTRAL_SHARE:.0%}% of the base load")
    parser.add_argument("--rate", type=float, default=None, metavar="RPS",
                        help=f"base load in requests per second (default: {DEFAULT_LOAD:.0%}% "
                        "of the fleet's estimated capacity; the burst adds "
                        f"{BURST_LOAD:.0%}% of it)")
    parser.add_argument("--seed", type=int, default=1, metavar="N",
                        help="seed of the arrivals and lengths (default 1)")
    parser.add_argument("--scrape", action="store_true",
                        help="read loads by the direct scrape even when prometheus is installed")
    parser.add_argument("--extproc", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the ext_proc endpoint picker (in the control plane) for each "
                        "request's replica, as the deployment does (default: on; "
                        "--no-extproc: the weights alone decide)")


def estimated_capacity_rps(fleet: FleetSettings, lengths: LengthMix) -> float:
    """Requests per second the simulated fleet finishes with every rank's batch full.

    From the simulator's default timing model (`hybridlb sim --help`): a request holds a
    slot for its prefill and one full-batch step per output token.
    """
    from xds_server.sim.engine import EngineSettings

    engine = EngineSettings()
    step_s = engine.step_base_s + fleet.max_num_seqs * engine.decode_token_s
    slot_s = (lengths.mean_output_tokens() * step_s
              + lengths.mean_prompt_tokens() * engine.prefill_token_s)
    ranks = fleet.nodes * fleet.replicas_per_node * fleet.ranks
    return ranks * fleet.max_num_seqs / (slot_s * fleet.time_scale)


def entries(fleet: Fleet) -> list[Entry]:
    central = [e for e in fleet.envoys if not e.node]
    local = [e for e in fleet.envoys if e.node]
    central_share = CENTRAL_SHARE if central else 0.0
    return ([Entry(e.name, (1 - central_share) / len(local)) for e in local]
            + [Entry(e.name, central_share / len(central)) for e in central])


class Signals:
    """Ctrl-C (or SIGTERM) once: stop sending, let the requests in flight finish; twice:
    abandon them. While the fleet starts, it aborts the start; while it stops, it is noted
    and ignored, so that no process is left half-stopped."""

    def __init__(self) -> None:
        self.count = 0
        self.shielded = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.abort: asyncio.Event | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def bind(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
             abort: asyncio.Event) -> None:
        self.loop, self.stop, self.abort = loop, stop, abort

    def unbind(self) -> None:
        self.loop = self.stop = self.abort = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.shielded:
            return
        if self.loop is None or self.stop is None or self.abort is None:
            raise KeyboardInterrupt
        # Counted here, not read from the event: two signals can come before the loop runs.
        event = self.stop if self.count == 1 else self.abort
        self.loop.call_soon_threadsafe(event.set)


@dataclass
class Outcome:
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    interrupted: bool = False
    abandoned: bool = False
    error: str = ""
    elapsed_s: float = 0.0


def run(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        # A log or a pipe: wide enough that the tables' names are not cut.
        console = Console(width=140)
    if importlib.util.find_spec("matplotlib") is None:
        # Said first, not after minutes of a run.
        console.print(NO_PLOT, style="yellow", markup=False)
    if args.duration <= 0 or (args.rate is not None and args.rate <= 0):
        raise SystemExit("hybridlb demo: --duration and --rate must be positive")
    try:
        settings = FleetSettings(nodes=args.nodes, replicas_per_node=args.replicas_per_node,
                                 central_envoys=args.envoys, prometheus=not args.scrape,
                                 extproc=args.extproc)
    except ValueError as exc:
        raise SystemExit(f"hybridlb demo: {exc}") from exc
    out: Path = args.out
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    lengths = DEMO_LENGTHS
    capacity = estimated_capacity_rps(settings, lengths)
    rate = args.rate if args.rate is not None else round(DEFAULT_LOAD * capacity, 1)
    workdir = Path(tempfile.mkdtemp(prefix="hybridlb-demo-"))
    fleet = Fleet(settings, workdir=workdir, logdir=logdir)
    signals = Signals()
    signals.install()
    outcome = Outcome()
    arrivals: list[Arrival] = []
    burst: Burst | None = None
    try:
        fleet.start(progress=lambda message: console.print(f"[dim]{message}[/]"))
        hot = next(e.name for e in fleet.envoys if e.node)
        burst = Burst(start_s=BURST_AT * args.duration, duration_s=BURST_FOR * args.duration,
                      rate_rps=round(BURST_LOAD * capacity, 1), entry=hot)
        arrivals = schedule(seed=args.seed, rate_rps=rate, duration_s=args.duration,
                            entries=entries(fleet), lengths=lengths, bursts=[burst])
        asyncio.run(_drive(fleet, arrivals, burst, args.duration, signals, outcome, console))
    except KeyboardInterrupt:
        outcome.interrupted = True
    except (ChildExited, TimeoutError) as exc:
        outcome.error = str(exc)
    finally:
        signals.shielded = True
        signals.unbind()
        console.print("[dim]stopping every process the demo started[/]")
        fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signals.restore()
    return _report(args, fleet, settings, outcome, arrivals, burst, rate, capacity, lengths,
                   console)


async def _drive(fleet: Fleet, arrivals: list[Arrival], burst: Burst, duration_s: float,
                 signals: Signals, outcome: Outcome, console: Any) -> None:
    import aiohttp
    from rich.live import Live

    from xds_server.demo.view import Frame, render
    from xds_server.workload import Replayer

    stop, abort = asyncio.Event(), asyncio.Event()
    signals.bind(asyncio.get_running_loop(), stop, abort)
    envoys = {e.name: e.node for e in fleet.envoys}
    times = [a.at_s for a in arrivals]
    slots = fleet.settings.ranks * fleet.settings.max_num_seqs
    replayer = Replayer(urls={e.name: e.url for e in fleet.envoys}, model=MODEL)
    outcome.results = replayer.results
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        monitor = Monitor(replicas=list(fleet.replicas), admin_url=fleet.admin_url,
                          envoys=list(envoys), pool=POOL, started=time.monotonic())
        outcome.samples = monitor.samples
        watcher = asyncio.create_task(monitor.run(session))
        sender = asyncio.create_task(replayer.run(arrivals, session, stop))

        def frame(phase: str) -> Frame:
            return Frame(
                elapsed_s=replayer.elapsed_s(), duration_s=duration_s, phase=phase,
                metrics_source=fleet.metrics_source, time_scale=fleet.settings.time_scale,
                slots_per_replica=slots, replicas=fleet.replicas, envoys=envoys,
                sample=monitor.latest(), results=replayer.results,
                sent_by_entry=replayer.sent_by_entry, in_flight=replayer.in_flight,
                arrival_times=times,
            )

        def phase() -> str:
            t = replayer.elapsed_s()
            if burst.start_s <= t < burst.start_s + burst.duration_s:
                return f"BURST through {burst.entry}"
            return "steady load"

        try:
            with Live(render(frame("starting")), console=console, refresh_per_second=2,
                      auto_refresh=False) as live:
                while not sender.done():
                    await asyncio.wait({sender}, timeout=0.5)
                    fleet.check()
                    live.update(render(frame(phase())), refresh=True)
                sender.result()
                outcome.interrupted = stop.is_set()
                if outcome.interrupted:
                    live.console.print("interrupted: no new requests; letting the ones in "
                                       "flight finish (Ctrl-C again abandons them)")
                deadline = time.monotonic() + DRAIN_S
                while replayer.in_flight and not abort.is_set() and time.monotonic() < deadline:
                    fleet.check()
                    live.update(render(frame("letting the requests in flight finish "
                                             "(Ctrl-C abandons them)")), refresh=True)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await abort.wait()
                if replayer.in_flight:
                    outcome.abandoned = True
                    await replayer.cancel()
                await monitor.poll(session)
                live.update(render(frame("done")), refresh=True)
            console.print()
        finally:
            outcome.elapsed_s = replayer.elapsed_s()
            for task in (watcher, sender):
                task.cancel()
            await asyncio.gather(watcher, sender, return_exceptions=True)
            await replayer.cancel()


def _report(args: argparse.Namespace, fleet: Fleet, settings: FleetSettings, outcome: Outcome,
            arrivals: list[Arrival], burst: Burst | None, rate: float, capacity: float,
            lengths: LengthMix, console: Any) -> int:
    from dataclasses import asdict

    from xds_server.demo import report

    out: Path = args.out
    replicas = fleet.replicas
    envoys = {e.name: e.node for e in fleet.envoys}
    summary = report.summarize(outcome.results, replicas=replicas, envoys=envoys,
                               samples=outcome.samples)
    summary.update({
        "planned": len(arrivals),
        "interrupted": outcome.interrupted,
        "error": outcome.error,
        "elapsed_s": round(outcome.elapsed_s, 2),
        "metrics_source": "prometheus" if fleet.prometheus_url else "scrape",
        "parameters": {
            "duration_s": args.duration, "seed": args.seed, "rate_rps": rate,
            "estimated_capacity_rps": round(capacity, 1),
            "burst": asdict(burst) if burst else None,
            "central_share": CENTRAL_SHARE, "lengths": asdict(lengths),
            "fleet": asdict(settings), "model": MODEL,
        },
        "processes": [c.as_dict() for c in fleet.children],
        "git_commit": _git_commit(),
        "plot": None,
    })
    # A plot left by an earlier run must not pass for this one's.
    (out / "demo.png").unlink(missing_ok=True)
    if outcome.samples:
        try:
            report.plot(
                out / "demo.png", outcome.samples, replicas=replicas, envoys=envoys,
                burst=(burst.start_s, burst.start_s + burst.duration_s) if burst else None,
                title=f"{len(replicas)} replicas x {settings.ranks} ranks on {settings.nodes} "
                f"nodes, {rate:g} req/s + burst via {burst.entry if burst else '-'}; "
                f"loads from {summary['metrics_source']}",
            )
            summary["plot"] = "demo.png"
        except ImportError:
            console.print(NO_PLOT, style="yellow", markup=False)
    report.write_json(out / "summary.json", summary)
    console.print(report.tables(summary))
    if outcome.error:
        console.print(f"[bold red]the demo stopped early: {outcome.error}[/]")
    plot = f"plot: {out / 'demo.png'}  " if summary["plot"] else ""
    console.print(f"summary: {out / 'summary.json'}  {plot}logs: {out / 'logs'}")
    if outcome.error or summary["failed"]:
        return 1
    if outcome.interrupted and not outcome.results:
        return 130
    return 0


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent)
        if done.returncode == 0:
            return done.stdout.strip()
    return None
