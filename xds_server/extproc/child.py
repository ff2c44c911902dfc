"""The endpoint picker of `serve --extproc-port`, in a child process of its own.

On the control plane's event loop a pick waits behind every snapshot build and pool-file
parse (over a second at 10,000 replicas), longer than Envoy waits (0.2 s): picks failed
open during every large publish. The child runs `hybridlb extproc`, following this
process's /picker/state on a loopback-only listener of its own (whatever address the admin
server binds, and whoever a NetworkPolicy admits to it); it is restarted with backoff when
it dies, and stopped with `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from prometheus_client import Counter

from xds_server import options
from xds_server.settings import PickSettings, Settings

log = logging.getLogger(__name__)


class PickerChild:
    """Keeps one `hybridlb extproc` process running until `stop`."""

    def __init__(self, args: Sequence[str], restarts: Counter, *,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 healthy_after_s: float = 30.0, stop_grace_s: float = 5.0) -> None:
        self._argv = [sys.executable, "-m", "xds_server", "extproc", *args]
        self._restarts = restarts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        #: A child that ran this long before dying gets the first delay again.
        self._healthy_after_s = healthy_after_s
        self._stop_grace_s = stop_grace_s
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def spawn(self) -> None:
        # stdout/stderr are inherited: the picker's log lines are in serve's log.
        self._process = await asyncio.create_subprocess_exec(*self._argv)
        self._started_at = time.monotonic()
        log.info("endpoint picker process %d started", self._process.pid)

    async def run(self) -> None:
        """Restart the child whenever it exits, until `stop` (or cancellation)."""
        delay = self._backoff_initial_s
        try:
            while True:
                if self._process is None:
                    await self.spawn()
                assert self._process is not None
                code = await self._process.wait()
                if self._stopping:
                    return
                if time.monotonic() - self._started_at >= self._healthy_after_s:
                    delay = self._backoff_initial_s
                self.restarts += 1
                self._restarts.inc()
                log.warning("endpoint picker process %d exited (%s); restarting in %.1f s "
                            "(picks fail open meanwhile)", self._process.pid,
                            _how(code), delay)
                self._process = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM the child; SIGKILL it if it has not exited within the grace."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self._stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


_PICK_OPTIONS = options.options(PickSettings)


def picker_args(settings: Settings, feed_url: str) -> list[str]:
    """`hybridlb extproc` flags for serve's picker: its port, host, certificate and pick
    settings, following `feed_url` (serve's /picker/state on loopback)."""
    s, served = settings.extproc, settings.xds.tls
    args = [
        "--port", str(s.port), "--host", s.host,
        "--control-plane", feed_url,
        "--poll-interval-s", str(s.poll_interval_s),
        "--model-header", settings.envoy.model_header,
        "--parent-pid", str(os.getpid()),
    ]
    if s.admin_port:
        args += ["--admin-port", str(s.admin_port), "--admin-host", s.host]
    # Every pick setting, by the flag `hybridlb extproc` declares for it.
    for opt in _PICK_OPTIONS:
        (field,) = (path[-1] for path in opt.paths)
        args += [f"--{opt.flag}", str(getattr(s.pick, field))]
    for flag, path in (("--tls-cert", served.cert), ("--tls-key", served.key),
                       ("--tls-client-ca", served.client_ca)):
        if path is not None:
            args += [flag, str(path)]
    return args
