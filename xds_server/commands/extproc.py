"""Run the ext_proc endpoint picker on its own, following a control plane's /picker/state.

Envoy asks it per request (headers and buffered body) and it names a replica: least
expected wait first, prefix affinity and node locality as tie-breakers. It fails open: a
picker that is down, slow or confused leaves the request to the weights. `hybridlb serve
--extproc-port PORT` runs this as its child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from xds_server.settings import PickSettings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9002, help="gRPC port (default 9002)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; in a pod, its IP or 0.0.0.0 (default 127.0.0.1)")
    parser.add_argument("--control-plane", default="http://127.0.0.1:18080",
                        help="the control plane's admin URL, whose /picker/state is followed "
                        "(default http://127.0.0.1:18080)")
    parser.add_argument("--poll-interval-s", type=float, default=0.5,
                        help="/picker/state is read at most this often; it is a long poll, "
                        "answered when the fleet changes (default 0.5)")
    parser.add_argument("--admin-port", type=int, default=0,
                        help="serve /healthz, /readyz, /metrics and /debug/state (the picker's "
                        "view of the replicas) here (default: off)")
    parser.add_argument("--admin-host", default="127.0.0.1", help="(default 127.0.0.1)")
    parser.add_argument("--model-header", default="x-model",
                        help="header that names the pool, set on picked requests (default x-model)")
    parser.add_argument("--tls-cert", type=Path, default=None,
                        help="PEM certificate chain: serve ext_proc over TLS (re-read when the "
                        "file changes, no restart; default: plaintext)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, default=None,
                        help="PEM CA bundle: require Envoys to present a client certificate it "
                        "signed (mutual TLS)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when this process is gone (`serve` sets it for the picker "
                        "it runs, so a killed `serve` leaves no picker holding the port)")
    d = PickSettings()
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                        help=f"room per rank, as in `serve` (default {d.max_num_seqs})")
    parser.add_argument("--waiting-factor", type=float, default=d.waiting_factor,
                        help=f"how much more a waiting request weighs than a running one, as "
                        f"in `serve` (default {d.waiting_factor})")
    parser.add_argument("--room-threshold", type=float, default=d.room_threshold,
                        help=f"above this wait a replica gets no affinity bonus, as in `serve` "
                        f"(default {d.room_threshold})")
    parser.add_argument("--affinity-bonus", type=float, default=d.affinity_bonus,
                        help=f"score bonus for the replica that last took a prompt's leading "
                        f"block (default {d.affinity_bonus})")
    parser.add_argument("--locality-bonus", type=float, default=d.locality_bonus,
                        help=f"score bonus for a replica on the asking Envoy's node "
                        f"(default {d.locality_bonus})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"larger bodies are not parsed (default {d.max_body_bytes})")
    parser.add_argument("--fallbacks", type=int, default=d.fallbacks,
                        help=f"endpoints named after the pick for the proxy to fall back to "
                        f"(default {d.fallbacks})")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="answer 429 when every candidate has more waiting requests than "
                        "this (default 0: never)")


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from xds_server import admin
    from xds_server.addresses import host_port
    from xds_server.extproc.server import Picker, add_health, add_to_server, new_server
    from xds_server.extproc.state import RemoteState
    from xds_server.metrics import Metrics
    from xds_server.settings import TlsSettings
    from xds_server.tls import add_port, describe

    tls = TlsSettings(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    tls.check("hybridlb extproc")

    settings = PickSettings(max_num_seqs=args.max_num_seqs, waiting_factor=args.waiting_factor,
                            room_threshold=args.room_threshold,
                            affinity_bonus=args.affinity_bonus,
                            locality_bonus=args.locality_bonus,
                            max_body_bytes=args.max_body_bytes, fallbacks=args.fallbacks,
                            max_queue=args.max_queue)

    async def main() -> None:
        metrics = Metrics()
        state = RemoteState(args.control_plane, args.poll_interval_s)
        server = new_server()
        add_to_server(server, Picker(state=state, metrics=metrics, settings=settings,
                                     model_header=args.model_header))
        add_health(server, state.ready.is_set)
        try:
            port = add_port(server, host_port(args.host, args.port), tls)
        except RuntimeError as exc:
            raise SystemExit(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
        await server.start()
        runner = None
        if args.admin_port:
            runner = web.AppRunner(admin.build_app(
                metrics=metrics, ready=state.ready.is_set, state=state.describe), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, args.admin_host, args.admin_port).start()
        log.info("ext_proc endpoint picker on %s:%d%s, following %s", args.host, port,
                 describe(tls), args.control_plane)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        follow = asyncio.create_task(state.run())
        orphaned = asyncio.create_task(_parent_gone(args.parent_pid, stop)) \
            if args.parent_pid else None
        try:
            await stop.wait()
        finally:
            for task in (follow, orphaned):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await server.stop(1.0)
            if runner is not None:
                await runner.cleanup()

    asyncio.run(main())
    return 0


async def _parent_gone(pid: int, stop: asyncio.Event) -> None:
    """Set `stop` once this process's parent is no longer `pid` (it died: we were adopted)."""
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    log.warning("parent process %d is gone; stopping", pid)
    stop.set()
