"""Run simulated vLLM servers: OpenAI-compatible APIs whose latency comes from a model of
vLLM's scheduler on an H100 (Qwen3-0.6B by default), with vLLM's /metrics, /health and
data-parallel ranks, and faults on demand. One process hosts --replicas servers on
consecutive ports from --port, each fronting --ranks engines (hybrid mode; 1 = external).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from xds_server.sim.engine import EngineSettings
from xds_server.sim.faults import Faults
from xds_server.sim.host import HostSettings, SimHost
from xds_server.sim.server import ServerSettings

_ENGINE = EngineSettings()
_SERVER = ServerSettings()
_HOST = HostSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    layout = parser.add_argument_group("layout")
    layout.add_argument("--host", default=_SERVER.host, help="address to listen on")
    layout.add_argument("--port", type=int, default=_SERVER.port,
                        help="port of the first server; the others follow (0: free ports)")
    layout.add_argument("--replicas", type=int, default=_HOST.replicas,
                        help="simulated API servers in this process")
    layout.add_argument("--ranks", type=int, default=_SERVER.num_ranks,
                        help="DP ranks (engines) behind each server; 1 is external-LB mode")
    layout.add_argument("--start-rank", type=int, default=_SERVER.start_rank,
                        help="global rank of the first server's first engine")
    layout.add_argument("--nodes", type=int, default=_HOST.nodes,
                        help="nodes the replicas are spread over (round robin) in --pools-out")
    layout.add_argument("--node-names", default="",
                        help="comma-separated names of those nodes (default node-a, node-b, ...)")
    layout.add_argument("--model", default=_SERVER.model_name, help="served model name")
    layout.add_argument("--pool-name", default=_HOST.pool_name, help="pool name in --pools-out")
    layout.add_argument("--pools-out", type=Path, default=None,
                        help="write the static pool YAML for `hybridlb serve` here")

    timing = parser.add_argument_group("timing model (simulated seconds)")
    timing.add_argument("--time-scale", type=float, default=_HOST.time_scale,
                        help="wall seconds per simulated second (0.1 = ten times faster)")
    timing.add_argument("--step-base-s", type=float, default=_ENGINE.step_base_s,
                        help="fixed cost of an engine step")
    timing.add_argument("--prefill-token-s", type=float, default=_ENGINE.prefill_token_s,
                        help="cost per prompt token computed in a step")
    timing.add_argument("--decode-token-s", type=float, default=_ENGINE.decode_token_s,
                        help="cost per decoded token in a step")
    timing.add_argument("--frontend-overhead-s", type=float,
                        default=_SERVER.frontend_overhead_s,
                        help="fixed API-server cost per request before the engine sees it")
    timing.add_argument("--max-num-seqs", type=int, default=_ENGINE.max_num_seqs,
                        help="most requests running per rank")
    timing.add_argument("--max-num-batched-tokens", type=int,
                        default=_ENGINE.max_num_batched_tokens,
                        help="token budget per step (chunked prefill)")
    timing.add_argument("--kv-cache-tokens", type=int, default=_ENGINE.kv_cache_tokens,
                        help="KV-cache size per rank, in tokens")
    timing.add_argument("--block-size", type=int, default=_ENGINE.block_size_tokens,
                        help="KV-cache block size in tokens")
    timing.add_argument("--max-model-len", type=int, default=_ENGINE.max_model_len,
                        help="longest prompt + output accepted")
    timing.add_argument("--output-tokens", type=int, default=_SERVER.natural_output_tokens,
                        help="tokens generated before EOS when max_tokens allows more "
                        "(ignore_eos generates max_tokens)")
    timing.add_argument("--lb-stats-interval-s", type=float,
                        default=_SERVER.lb_stats_interval_s,
                        help="age of the counts the internal DP balancer sees (0: live)")

    timing.add_argument("--hop-s", type=float, default=_SERVER.hop_s,
                        help="latency a request pays once when it comes from another node "
                        "(its x-hybridlb-origin-node header names a node other than the "
                        "server's)")
    timing.add_argument("--hop-chunk-s", type=float, default=_SERVER.hop_chunk_s,
                        help="latency each streamed chunk of such a request pays")

    faults = parser.add_argument_group("faults (also settable with POST /sim/fault)")
    faults.add_argument("--slowdown", type=float, default=1.0,
                        help="multiply every step time by this factor")
    faults.add_argument("--slow-rank", type=int, default=-1,
                        help="apply --slowdown to this local rank only (-1: every rank)")
    faults.add_argument("--error-rate", type=float, default=0.0,
                        help="share of inference requests answered with HTTP 500")
    faults.add_argument("--hang", action="store_true",
                        help="accept requests but do not answer until cleared")
    faults.add_argument("--refuse", action="store_true",
                        help="keep the listening sockets closed until cleared")
    faults.add_argument("--seed", type=int, default=None,
                        help="seed for the error-rate draws (default: random)")
    parser.add_argument("--drain-timeout-s", type=float, default=_HOST.drain_timeout_wall_s,
                        help="on SIGTERM, wall seconds to wait for in-flight requests")


def settings_from_args(args: argparse.Namespace) -> HostSettings:
    return HostSettings(
        server=ServerSettings(
            host=args.host,
            port=args.port,
            model_name=args.model,
            num_ranks=args.ranks,
            start_rank=args.start_rank,
            frontend_overhead_s=args.frontend_overhead_s,
            natural_output_tokens=args.output_tokens,
            lb_stats_interval_s=args.lb_stats_interval_s,
            seed=args.seed,
            hop_s=args.hop_s,
            hop_chunk_s=args.hop_chunk_s,
        ),
        engine=EngineSettings(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_tokens=args.kv_cache_tokens,
            block_size_tokens=args.block_size,
            step_base_s=args.step_base_s,
            prefill_token_s=args.prefill_token_s,
            decode_token_s=args.decode_token_s,
            max_model_len=args.max_model_len,
        ),
        faults=Faults(slowdown=args.slowdown, slow_rank=args.slow_rank,
                      error_rate=args.error_rate, hang=args.hang, refuse=args.refuse),
        replicas=args.replicas,
        nodes=args.nodes,
        node_names=tuple(n.strip() for n in args.node_names.split(",") if n.strip()),
        pool_name=args.pool_name,
        pools_out=args.pools_out,
        time_scale=args.time_scale,
        drain_timeout_wall_s=args.drain_timeout_s,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    return asyncio.run(SimHost(settings).run())
