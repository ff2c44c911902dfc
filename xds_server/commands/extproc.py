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

from xds_server import options
from xds_server.settings import PickerSettings

log = logging.getLogger(__name__)


OPTIONS = options.options(PickerSettings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, OPTIONS)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from xds_server import admin
    from xds_server.addresses import host_port
    from xds_server.extproc.server import Picker, add_health, add_to_server, new_server
    from xds_server.extproc.state import RemoteState
    from xds_server.metrics import Metrics
    from xds_server.tls import add_port, describe

    s = options.build(PickerSettings, options.from_args(args, OPTIONS), OPTIONS)
    s.tls.check("hybridlb extproc")

    async def main() -> None:
        metrics = Metrics()
        state = RemoteState(s.control_plane, s.poll_interval_s)
        server = new_server()
        add_to_server(server, Picker(state=state, metrics=metrics, settings=s.pick,
                                     model_header=s.model_header))
        add_health(server, state.ready.is_set)
        try:
            port = add_port(server, host_port(s.host, s.port), s.tls)
        except RuntimeError as exc:
            raise SystemExit(f"cannot listen on {s.host}:{s.port}: {exc}") from exc
        await server.start()
        runner = None
        if s.admin_port:
            runner = web.AppRunner(admin.build_app(
                metrics=metrics, ready=state.ready.is_set, state=state.describe), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, s.admin_host, s.admin_port).start()
        log.info("ext_proc endpoint picker on %s:%d%s, following %s", s.host, port,
                 describe(s.tls), s.control_plane)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        follow = asyncio.create_task(state.run())
        orphaned = asyncio.create_task(_parent_gone(s.parent_pid, stop)) \
            if s.parent_pid else None
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
