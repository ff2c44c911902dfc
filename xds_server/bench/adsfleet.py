"""Many light ADS clients in one process, driven over stdin/stdout: a benchmark's Envoy fleet.

It runs apart from the control plane so that the work of receiving and parsing hundreds of
streams is not counted as the server's CPU, and so that its own CPU can be reported as the
load generator's overhead. Each stream has its own gRPC channel (its own TCP connection), as
each Envoy would.

Run as `python -m xds_server.bench.adsfleet SPEC.json`, where the spec names the target, how
many clusters and assignments a synced stream holds, and the streams (node id, node, delta).
It prints JSON lines on stdout:

    {"event": "synced", "started": T, "streams": [{"protocol", "synced"}, ...]}

then answers commands read as JSON lines on stdin:

    {"cmd": "arm", "update": K, "expect": N, "timeout_s": S}
        -> {"event": "armed", "update": K}
        -> later {"event": "delivered", "update": K, "streams": [{"protocol", "first",
                  "done", "bytes", "responses"}, ...]}
           once every stream has received N distinct ClusterLoadAssignments since the arm
           (or S seconds passed: `done` is null for the streams that had not)
    {"cmd": "stop"}

Times are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process of the machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xds_server.bench.adsclient import AdsClient, Received
from xds_server.xds import types


@dataclass
class Tracker:
    """One stream's view of the update being measured."""

    protocol: str
    synced: float | None = None
    armed: bool = False
    expect: int = 0
    names: set[str] = field(default_factory=set)
    first: float | None = None
    done: float | None = None
    nbytes: int = 0
    responses: int = 0

    def arm(self, expect: int) -> None:
        self.armed, self.expect = True, expect
        self.names = set()
        self.first = self.done = None
        self.nbytes = self.responses = 0

    def report(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "first": self.first, "done": self.done,
                "bytes": self.nbytes, "responses": self.responses}


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Fleet:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.expect_clusters = int(spec["expect_clusters"])
        self.expect_assignments = int(spec["expect_assignments"])
        self.clients: list[AdsClient] = []
        self.trackers: list[Tracker] = []
        self.all_synced = asyncio.Event()
        self._unsynced = len(spec["streams"])
        self._changed = asyncio.Event()
        for stream in spec["streams"]:
            tracker = Tracker(protocol="delta" if stream["delta"] else "sotw")
            client = AdsClient(
                target=spec["target"], node_id=stream["node_id"], node=stream["node"],
                delta=bool(stream["delta"]), keep_history=False,
            )
            client.on_response = self._callback(client, tracker)
            self.clients.append(client)
            self.trackers.append(tracker)

    def _callback(self, client: AdsClient, tracker: Tracker) -> Any:
        def on_response(received: Received) -> None:
            now = time.monotonic()
            if tracker.synced is None and self._holds_everything(client):
                tracker.synced = now
                self._unsynced -= 1
                if self._unsynced == 0:
                    self.all_synced.set()
            if not tracker.armed:
                return
            tracker.responses += 1
            tracker.nbytes += received.nbytes
            if received.type_url != types.ENDPOINT:
                return
            if tracker.first is None:
                tracker.first = now
            tracker.names.update(received.names)
            if tracker.done is None and len(tracker.names) >= tracker.expect:
                tracker.done = now
                self._changed.set()

        return on_response

    def _holds_everything(self, client: AdsClient) -> bool:
        held = client.held
        clusters = held.get(types.CLUSTER, {})
        return (
            len(clusters) >= self.expect_clusters
            and len(held.get(types.ENDPOINT, {})) >= self.expect_assignments
            and bool(held.get(types.LISTENER))
            and bool(held.get(types.ROUTE))
        )

    async def measure(self, update: int, expect: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(t.done is None for t in self.trackers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        # Late responses still count towards bytes until the next arm; the report is taken now.
        emit({"event": "delivered", "update": update,
              "streams": [t.report() for t in self.trackers]})


async def serve(spec: dict[str, Any]) -> int:
    fleet = Fleet(spec)
    started = time.monotonic()
    tasks = [asyncio.create_task(c.run()) for c in fleet.clients]
    ended = asyncio.create_task(_first_to_end(tasks))
    synced = asyncio.create_task(fleet.all_synced.wait())
    await asyncio.wait({ended, synced}, timeout=float(spec.get("sync_timeout_s", 300)),
                       return_when=asyncio.FIRST_COMPLETED)
    if not synced.done():
        emit({"event": "error", "error": "streams did not sync"
              + (f": {ended.result()}" if ended.done() else " in time"),
              "synced": sum(t.synced is not None for t in fleet.trackers)})
        return 1
    emit({"event": "synced", "started": started,
          "streams": [{"protocol": t.protocol, "synced": t.synced} for t in fleet.trackers]})
    commands = _stdin_lines()
    measuring: set[asyncio.Task[None]] = set()
    while True:
        line_task = asyncio.ensure_future(commands.get())
        await asyncio.wait({line_task, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():
            line_task.cancel()
            emit({"event": "error", "error": f"a stream ended: {ended.result()}"})
            return 1
        line = line_task.result()
        if not line:
            return 0  # the controller went away
        command = json.loads(line)
        if command["cmd"] == "stop":
            return 0
        if command["cmd"] == "arm":
            for tracker in fleet.trackers:
                tracker.arm(int(command["expect"]))
            emit({"event": "armed", "update": command["update"]})
            task = asyncio.create_task(
                fleet.measure(command["update"], command["expect"], command["timeout_s"])
            )
            measuring.add(task)
            task.add_done_callback(measuring.discard)


def _stdin_lines() -> asyncio.Queue[str]:
    """Lines of stdin ('' at its end), read by a daemon thread: a blocking read in the
    event loop's executor would keep the process from exiting while it waits."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        # The loop may be closed by the time a line (or the end) arrives: nothing to tell.
        with contextlib.suppress(RuntimeError):
            for line in iter(sys.stdin.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, "")

    threading.Thread(target=read, daemon=True).start()
    return queue


async def _first_to_end(tasks: list[asyncio.Task[None]]) -> str:
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    task = done.pop()
    error = task.exception()
    return repr(error) if error else "the server closed a stream"


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    return asyncio.run(serve(spec))


if __name__ == "__main__":
    sys.exit(main())
