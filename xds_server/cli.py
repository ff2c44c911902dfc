"""The `hybridlb` command: parses arguments and hands them to the command that runs them.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`,
so that this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# command name -> (module, one-line help, the extra it needs). Modules are imported lazily:
# `hybridlb status` should not pay for grpc, and `hybridlb sim` should not pay for the xDS
# server. The first four are the runtime (`pip install vllm-hybrid-lb`); the tools need an
# extra, and say so on an install without it.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "serve": ("xds_server.commands.serve", "run the xDS control plane", None),
    "bootstrap": ("xds_server.commands.bootstrap", "print an Envoy bootstrap for this server",
                  None),
    "status": ("xds_server.commands.status", "show pools, replicas, weights and Envoys", None),
    "extproc": ("xds_server.commands.extproc", "run the ext_proc endpoint picker on its own",
                None),
    "sim": ("xds_server.sim.cli", "run simulated vLLM servers", "sim"),
    "bench": ("xds_server.bench.cli", "run a benchmark", "bench"),
    "demo": ("xds_server.demo.cli", "run a local demo: simulated GPUs, real Envoys, live view",
             "demo"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, just that command's module is imported (the rest are
    listed by name and help line), so `hybridlb status` does not pay for grpc or Envoy."""
    parser = argparse.ArgumentParser(
        prog="hybridlb",
        description="vLLM Hybrid LB: route each request to a vLLM replica with room, "
        "node-local first, through Envoy.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text, extra) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if only is not None:
                raise _needs_extra(name, exc) from exc
            if extra is None:
                raise
            sub.add_parser(name, help=f"{help_text} (needs the `{extra}` extra)")
            continue
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        command.set_defaults(_module=module)
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only=chosen).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args._module.run(args)
    except ModuleNotFoundError as exc:  # a tool's lazy import (a benchmark's, say)
        raise _needs_extra(args.command, exc) from exc
    return code


def _needs_extra(command: str, exc: ModuleNotFoundError) -> BaseException:
    """What to raise for a missing module: a tool command's missing extra is named (the lean
    runtime install lacks them by design); anything else is a bug and raised as it is."""
    extra = COMMANDS[command][2]
    if extra is None or (exc.name or "").startswith("xds_server"):
        return exc
    return SystemExit(f"`hybridlb {command}` needs the `{extra}` extra ({exc.name} is not "
                      f"installed): pip install 'vllm-hybrid-lb[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
