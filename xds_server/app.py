"""The composition root: builds the parts, runs the root tasks, stops gracefully.

If any root task dies the whole process exits non-zero rather than serving a frozen view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from aiohttp import web

from xds_server import admin, tls
from xds_server.addresses import host_port
from xds_server.extproc.child import PickerChild, picker_args
from xds_server.extproc.server import Picker, add_health, add_to_server, new_server
from xds_server.extproc.state import LocalState
from xds_server.metrics import Metrics
from xds_server.publisher import Publisher
from xds_server.settings import Settings
from xds_server.sources.kubernetes import KubernetesSource
from xds_server.sources.loads import LoadLoop
from xds_server.sources.static_file import StaticFileSource
from xds_server.state import State
from xds_server.xds.cache import SnapshotCache
from xds_server.xds.guard import AdsGuard, NodeSan
from xds_server.xds.lrs import LoadReportServer
from xds_server.xds.server import AdsServer

log = logging.getLogger(__name__)


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.state = State()
        self.cache = SnapshotCache()
        self.publisher = Publisher(
            state=self.state, cache=self.cache, metrics=self.metrics, settings=settings.envoy,
            policy=settings.policy, hybrid=settings.hybrid,
        )
        self.ads = AdsServer(cache=self.cache, metrics=self.metrics)
        self.lrs = LoadReportServer(state=self.state, metrics=self.metrics,
                                    interval_s=settings.xds.load_report_interval_s)
        self.sources: list[Callable[[], Coroutine[Any, Any, None]]] = []
        if settings.static.path is not None:
            static = StaticFileSource(
                path=settings.static.path,
                state=self.state,
                metrics=self.metrics,
                poll_interval_s=settings.static.poll_interval_s,
            )
            static.load_once()  # a broken file at startup is an error, not an empty fleet
            self.sources.append(static.run)
        if settings.kubernetes.enabled:
            kubernetes = KubernetesSource(
                settings=settings.kubernetes, state=self.state, metrics=self.metrics
            )
            self.sources.append(kubernetes.run)
        self.loads = LoadLoop(state=self.state, metrics=self.metrics, settings=settings.loads)
        self.sources.append(self.loads.run)
        self.xds_port = 0
        self.admin_port = 0
        self.extproc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._extproc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._feed: web.AppRunner | None = None
        self.feed = admin.PickerFeed(self.state, keep=self.publisher)
        #: The endpoint picker's own process (`--extproc-port` without `--extproc-in-process`).
        self.picker: PickerChild | None = None

    def ready(self) -> bool:
        return self.cache.ready and self.state.synced

    def debug_state(self) -> dict[str, Any]:
        doc = admin.debug_state(self.publisher.published, self.state.loads, self.ads.streams,
                                self.state.problems, self.state.ingress(time.time()))
        if self.picker is not None:
            doc["picker"] = {"pid": self.picker.pid, "restarts": self.picker.restarts}
        return doc

    async def start(self) -> None:
        s = self.settings
        self.publisher.publish_now()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.xds.max_receive_bytes),
                ("grpc.max_connection_age_ms", int(s.xds.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.xds.stop_grace_s * 1000)),
                ("grpc.keepalive_time_ms", int(s.xds.keepalive_s * 1000)),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        mutual = s.xds.tls.client_ca is not None

        def guarded(handler: grpc.GenericRpcHandler) -> AdsGuard:
            return AdsGuard(
                handler, metrics=self.metrics, max_streams=s.xds.max_streams,
                max_streams_per_peer=s.xds.max_streams_per_peer,
                max_resource_names=s.xds.max_resource_names,
                node_san=NodeSan(s.xds.node_san) if mutual and s.xds.node_san else None)

        # A guard each: every Envoy holds one stream of both, and load-report streams must
        # never take the ADS streams' places under the caps.
        server.add_generic_rpc_handlers((guarded(self.ads.handler()),
                                         guarded(self.lrs.handler())))
        try:
            self.xds_port = tls.add_port(server, host_port(s.xds.host, s.xds.port), s.xds.tls)
        except RuntimeError as exc:
            raise SystemExit(f"cannot listen for xDS on {s.xds.host}:{s.xds.port}: {exc}") from exc
        await server.start()
        self._grpc = server
        if s.extproc.port and s.extproc.in_process:
            await self._start_extproc()
        runner = web.AppRunner(
            admin.build_app(metrics=self.metrics, ready=self.ready, state=self.debug_state,
                            problems=lambda: self.state.problems, picker_feed=self.feed),
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, s.admin.host, s.admin.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise SystemExit(
                f"cannot listen for admin on {s.admin.host}:{s.admin.port}: {exc.strerror}"
            ) from exc
        self._admin = runner
        self.admin_port = runner.addresses[0][1]
        log.info("xDS (ADS, LRS) on %s:%d%s, admin on http://%s:%d", s.xds.host, self.xds_port,
                 tls.describe(s.xds.tls), s.admin.host, self.admin_port)
        if s.extproc.port and not s.extproc.in_process:
            await self._start_picker_process()

    async def _start_picker_process(self) -> None:
        """The endpoint picker in a child process, following /picker/state on a listener of
        its own on loopback: the admin server may bind only the pod IP, behind a
        NetworkPolicy that admits Prometheus alone."""
        runner = web.AppRunner(admin.build_feed_app(self.feed), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._feed = runner
        feed_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.picker = PickerChild(picker_args(self.settings, feed_url),
                                  self.metrics.extproc_process_restarts)
        await self.picker.spawn()

    async def _start_extproc(self) -> None:
        """The endpoint picker on its own port, reading this process's state."""
        s = self.settings.extproc
        picker = Picker(state=LocalState(self.state,
                                         keep=lambda: self.publisher.published.keep,
                                         judged=lambda p, a: self.publisher.published.judged(p, a)),
                        metrics=self.metrics, settings=s.pick,
                        model_header=self.settings.envoy.model_header)
        server = new_server()
        add_to_server(server, picker)
        add_health(server, self.ready)
        # The same identity as the ADS server: one process, one certificate (and client CA).
        served = self.settings.xds.tls
        try:
            self.extproc_port = tls.add_port(server, host_port(s.host, s.port), served)
        except RuntimeError as exc:
            raise SystemExit(f"cannot listen for ext_proc on {s.host}:{s.port}: {exc}") from exc
        await server.start()
        self._extproc = server
        log.info("ext_proc endpoint picker on %s:%d%s", s.host, self.extproc_port,
                 tls.describe(served))

    async def stop(self) -> None:
        if self.picker is not None:
            await self.picker.stop()
        if self._extproc is not None:
            await self._extproc.stop(self.settings.xds.stop_grace_s)
            self._extproc = None
        if self._grpc is not None:
            await self._grpc.stop(self.settings.xds.stop_grace_s)
            self._grpc = None
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        if self._feed is not None:
            await self._feed.cleanup()
            self._feed = None

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; a dying root task ends the process with its error."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with asyncio.TaskGroup() as group:
                tasks: list[asyncio.Task[None]] = [
                    group.create_task(run()) for run in self.sources
                ]
                tasks.append(group.create_task(self.publisher.run()))
                if self.picker is not None:
                    tasks.append(group.create_task(self.picker.run()))
                await stop.wait()
                log.info("stopping")
                for task in tasks:
                    task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.stop()
