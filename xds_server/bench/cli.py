"""Run a benchmark; each writes JSON (with its parameters and the git commit) and a plot."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    xds = sub.add_parser("xds", help="control-plane fan-out: time for a change to reach streams")
    xds.add_argument("--out", default="bench/results", help="output folder")
    xds.add_argument("--replicas", type=int, default=10_000, help="replicas (default 10000)")
    xds.add_argument("--nodes", type=int, default=1_250, help="nodes (default 1250)")
    xds.add_argument("--streams", type=int, default=200, help="ADS client streams (default 200)")
    xds.add_argument("--updates", type=int, default=5, help="measured updates (default 5)")
    xds.add_argument("--no-envoy", action="store_true", help="skip the real Envoy")
    routing = sub.add_parser("routing", help="routing quality: policies against an oracle")
    routing.add_argument("--out", default="bench/results", help="output folder")
    routing.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    routing.add_argument("--case", default="main",
                         choices=("main", "herding", "hybrid", "prefix", "extproc", "ranks"),
                         help="main: every policy; herding: stale vs fresh loads, damped vs "
                         "undamped (issue 5); hybrid: on-node share (issue 6); prefix: "
                         "long shared-prefix prompts; extproc: weights vs weights + picker; "
                         "ranks: the picker choosing the DP rank or not, at 85%% and with "
                         "one slow rank")
    routing.add_argument("--time-scale", type=float, default=20.0,
                         help="simulator wall seconds per simulated second (default 20)")
    routing.add_argument("--hop-ms", type=float, default=0.5,
                         help="simulated latency of a cross-node hop, once per request "
                         "(default 0.5 ms)")
    routing.add_argument("--hop-chunk-ms", type=float, default=0.05,
                         help="simulated latency a cross-node hop adds to each streamed "
                         "chunk (default 0.05 ms)")
    routing.add_argument("--max-num-seqs", type=int, default=4,
                         help="requests running per simulated rank (default 4)")
    routing.add_argument("--point-s", type=float, default=None, metavar="S",
                         help="seconds of load per point and policy (default 5; 6 with "
                         "--quick): longer points let queues build, at the cost of run time")
    routing.add_argument("--repeats", type=int, default=None, metavar="N",
                         help="interleaved repeats (default 3; 1 with --quick)")
    routing.add_argument("--policies", default=None, metavar="NAMES",
                         help="these policies instead of the case's, comma-separated, any the "
                         "bench knows (e.g. round-robin,weights-scrape,oracle)")
    routing.add_argument("--points", default=None, metavar="NAMES",
                         help="only these of the case's points, comma-separated "
                         "(e.g. 85%%,slow-replica)")
    extproc = sub.add_parser("extproc", help="latency the ext_proc picker adds; picks per core")
    extproc.add_argument("--out", default="bench/results", help="output folder")
    extproc.add_argument("--requests", type=int, default=1000,
                         help="requests per side per repeat (default 1000)")
    extproc.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    extproc.add_argument("--hammer-seconds", type=float, default=10.0,
                         help="how long the picker alone is driven (default 10)")
    extproc.add_argument("--concurrency", type=int, default=16,
                         help="gRPC streams driving the picker alone (default 16)")
    publish = sub.add_parser("publish", help="picks that fail open and ADS answers during "
                             "a 10,000-replica publish, picker in-process vs own process")
    publish.add_argument("--out", default="bench/results", help="output folder")
    publish.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    publish.add_argument("--publishes", type=int, default=3,
                         help="pool-file rewrites per run (default 3)")

    k8s = sub.add_parser(
        "k8s", help="Kubernetes lifecycle → Envoy: Ready → routed, deletion → draining",
        description="Times a pod turning Ready in a fake Kubernetes API server until Envoy "
        "routes to it, and its deletionTimestamp until Envoy marks it draining, through the "
        "real control plane and Envoy. Runs from a source checkout: the fake API server is "
        "tests/fakekube.py, which is not installed.")
    k8s.add_argument("--out", default="bench/results", help="output folder")
    k8s.add_argument("--pods", type=int, default=100, help="pods per repeat (default 100)")
    k8s.add_argument("--repeats", type=int, default=3,
                     help="repeats, each with fresh processes (default 3)")
    k8s.add_argument("--live", type=int, default=10,
                     help="pods Ready at once before the oldest is terminated (default 10)")
    k8s.add_argument("--gap-s", type=float, default=0.3,
                     help="seconds between one change and the next (default 0.3)")
    k8s.add_argument("--poll-s", type=float, default=0.01,
                     help="how often Envoy's /clusters is read (default 0.01)")


def run(args: argparse.Namespace) -> int:
    if args.bench == "xds":
        from xds_server.bench.xds import main

        return main(args)
    if args.bench == "routing":
        from xds_server.bench.routing import main as routing_main

        return routing_main(args)
    if args.bench == "extproc":
        from xds_server.bench.extproc import main as extproc_main

        return extproc_main(args)
    if args.bench == "publish":
        from xds_server.bench.publish import main as publish_main

        return publish_main(args)
    if args.bench == "k8s":
        from xds_server.bench.k8s import main as k8s_main

        return k8s_main(args)
    raise SystemExit(f"unknown benchmark {args.bench}")
