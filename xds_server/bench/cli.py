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


def run(args: argparse.Namespace) -> int:
    raise SystemExit(f"unknown benchmark {args.bench}")
