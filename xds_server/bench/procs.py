"""Processes a benchmark starts: ports from the OS, logs to files, always stopped, measured.

A benchmark that leaves an Envoy or a control plane behind spoils every later run on a shared
machine, so each process is owned by an `ExitStack` and stopped on every exit path: SIGTERM
first, SIGKILL when it does not go in time.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from xds_server.bench.report import progress


class ProcessExited(RuntimeError):
    """A process the benchmark needs is gone; waiting longer cannot help."""


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> float:
    """Poll until `predicate()` holds; returns `time.monotonic()` of the first success.

    An exception from the predicate counts as "not yet" (the process may still be starting
    to listen), except `ProcessExited`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return time.monotonic()
        except ProcessExited:
            raise
        except Exception:  # not yet: connection refused, a half-started process
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Managed:
    """A child process with its output in a log file; `stop()` is safe to call twice."""

    def __init__(
        self, name: str, args: Sequence[str], log: Path, *, stdin: int | None = None,
        stdout: int | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = open(log, "ab")  # noqa: SIM115 (closed in stop)
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(args), stdin=stdin,
                stdout=self._log_file if stdout is None else stdout,
                stderr=self._log_file,
            )
        except BaseException:
            self._log_file.close()
            raise
        self.meter = ProcessMeter(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ProcessExited(
                f"{self.name} exited with {self.proc.returncode}; see {self.log}:\n"
                + tail(self.log)
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()


@contextlib.contextmanager
def managed(name: str, args: Sequence[str], log: Path, **kwargs: Any) -> Iterator[Managed]:
    process = Managed(name, args, log, **kwargs)
    try:
        yield process
    finally:
        process.stop()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system, children excluded) and memory of a process at one time."""

    cpu_s: float
    rss_bytes: int


class ProcessMeter:
    """CPU and memory of one process, read from /proc through psutil."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peak_sampled = 0

    def usage(self) -> Usage:
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            rss = int(self._process.memory_info().rss)
        self._peak_sampled = max(self._peak_sampled, rss)
        return Usage(cpu_s=float(cpu.user + cpu.system), rss_bytes=rss)

    def peak_rss_bytes(self) -> int:
        """The kernel's high-water mark (VmHWM) where there is one, else the largest sample."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self._process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self._peak_sampled


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A benchmark run's working directory (logs, generated files), with SIGTERM ending the
    run like Ctrl-C: through the `finally` blocks that stop every process. Removed when the
    run succeeds; kept, and said where, when it fails."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield workdir
    except BaseException:
        progress(f"logs kept in {workdir}")
        raise
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
