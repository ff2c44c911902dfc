"""A fake Kubernetes API server for Pods and InferencePools that speaks the real list/watch
wire protocol.

The Kubernetes API is the one part of the system that cannot run here, so the code under
test talks to this server through the official client and a kubeconfig, exactly as it talks
to a real cluster. It implements what discovery relies on:

- `GET /api/v1/namespaces/{ns}/pods` and `/api/v1/pods`, and the same for the
  InferencePool custom resource (`/apis/inference.networking.k8s.io/v1/.../inferencepools`,
  served as the API server serves a CRD's objects): `labelSelector` (equality and set
  based), `limit`/`continue` paging over a consistent snapshot, the list's resourceVersion
  (one counter for every resource, as etcd has);
- `?watch=true`: chunked JSON event lines (ADDED, MODIFIED, DELETED, BOOKMARK with
  `allowWatchBookmarks`, ERROR); resuming from a resourceVersion replays what happened
  since; a version older than the compaction point gets an ERROR event carrying a 410
  `Expired` Status, as the real server sends it; a pod that stops (or starts) matching the
  selector is DELETED (ADDED) for that watch; `timeoutSeconds` ends the stream cleanly;
- bearer-token authentication, so a test proves the kubeconfig is what the client used;
- RBAC refusals: a namespace can be forbidden, and is then answered 403 with the Status the
  real server sends (its message names the user, the verb, the resource and the namespace).

Tests drive it from any thread: `create`, `update`, `terminate` (sets deletionTimestamp),
`delete`, `compact`, `expire_watches`, `drop_watches`, `hold_watches`/`release_watches`
(an outage during which the client misses changes), `bookmark`, `fail_next`,
`forbid`/`allow`, `crd_installed`. The server runs its own event loop in a thread; every
operation runs on that loop, so the objects, the history and the open watches always agree.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

TOKEN = "fake-token"
GIE_GROUP = "inference.networking.k8s.io"
GIE_VERSION = "v1"
#: kind -> (plural, apiVersion, API group) of what the server serves.
RESOURCES = {
    "Pod": ("pods", "v1", ""),
    "InferencePool": ("inferencepools", f"{GIE_GROUP}/{GIE_VERSION}", GIE_GROUP),
}
USER = "system:serviceaccount:hybridlb:hybridlb"
Pod = dict[str, Any]
Obj = dict[str, Any]


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    ip: str | None = "127.0.0.1",
    node: str = "node-a",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    command: list[str] | None = None,
    args: list[str] | None = None,
    ports: list[dict[str, Any]] | None = None,
) -> Pod:
    """A pod as the API server would return it (camelCase JSON)."""
    container: dict[str, Any] = {"name": "vllm", "image": "vllm/vllm-openai"}
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args
    if ports is not None:
        container["ports"] = ports
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app": "vllm", **(labels or {})},
                     "annotations": dict(annotations or {})},
        "spec": {"nodeName": node, "containers": [container]},
        "status": status,
    }


def make_inference_pool(
    name: str,
    *,
    namespace: str = "default",
    match_labels: dict[str, str] | None = None,
    ports: list[int] | None = None,
    picker: str = "vllm-epp",
) -> Obj:
    """An InferencePool (inference.networking.k8s.io/v1) as the API server returns it."""
    return {
        "kind": "InferencePool", "apiVersion": f"{GIE_GROUP}/{GIE_VERSION}",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": dict(match_labels or {"app": "vllm"})},
            "targetPorts": [{"number": n} for n in (ports or [8000])],
            "endpointPickerRef": {"name": picker, "kind": "Service", "portNumber": 9002,
                                  "failureMode": "FailClose"},
        },
    }


def _key(obj: Obj) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return RESOURCES[obj.get("kind", "Pod")][0], meta["namespace"], meta["name"]


class Selector:
    """A label selector as `kubectl -l` and the API server take it."""

    _REQUIREMENT = re.compile(
        r"\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
        r"|(?P<skey>[\w./-]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)"
        r"|(?P<key>[\w./-]+)\s*(?P<eq>==|=|!=)\s*(?P<value>[\w./-]*)"
        r"|(?P<ekey>[\w./-]+))\s*(?:,|$)"
    )

    def __init__(self, text: str) -> None:
        self.checks: list[Callable[[dict[str, str]], bool]] = []
        position = 0
        text = text.strip()
        while position < len(text):
            match = self._REQUIREMENT.match(text, position)
            if not match or match.end() == position:
                raise ValueError(f"unable to parse requirement: {text[position:]!r}")
            self.checks.append(self._check(match))
            position = match.end()

    @staticmethod
    def _check(m: re.Match[str]) -> Callable[[dict[str, str]], bool]:
        if m["nkey"]:
            return lambda labels, k=m["nkey"]: k not in labels
        if m["skey"]:
            values = {v.strip() for v in m["values"].split(",")}
            if m["op"] == "in":
                return lambda labels, k=m["skey"]: labels.get(k) in values
            return lambda labels, k=m["skey"]: labels.get(k) not in values
        if m["key"]:
            if m["eq"] == "!=":
                return lambda labels, k=m["key"], v=m["value"]: labels.get(k) != v
            return lambda labels, k=m["key"], v=m["value"]: labels.get(k) == v
        return lambda labels, k=m["ekey"]: k in labels

    def matches(self, pod: Pod) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return all(check(labels) for check in self.checks)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_DROP = object()
_EXPIRE = object()
_END = object()


@dataclass(eq=False)  # identity: open watches live in a set
class _Watch:
    resource: str
    namespace: str
    selector: Selector
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def sees(self, pod: Pod | None) -> bool:
        return (pod is not None and _key(pod)[0] == self.resource
                and (not self.namespace or pod["metadata"]["namespace"] == self.namespace)
                and self.selector.matches(pod))

    def event(self, kind: str, old: Pod | None, new: Pod) -> tuple[str, Pod] | None:
        """What this watch receives for a change, given whether it saw the pod before."""
        before, after = self.sees(old), self.sees(new)
        if kind == "DELETED":
            return ("DELETED", new) if before else None
        if before and after:
            return ("MODIFIED", new)
        if after:
            return ("ADDED", new)
        if before:  # it stopped matching: gone, for this watch
            return ("DELETED", new)
        return None


@dataclass(frozen=True)
class Request:
    """A request the server answered, for tests that check what the client asked."""

    kind: str  # "list" or "watch"
    namespace: str
    params: dict[str, str]
    resource: str = "pods"


class FakeKube:
    """The server; `with FakeKube() as kube:` runs it in a thread."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[Request] = []
        self._objects: dict[tuple[str, str, str], Obj] = {}  # (resource, namespace, name)
        self._rv = 100
        self._history: list[tuple[int, str, Pod | None, Pod]] = []
        self._compacted = 0
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, list[Obj]] = {}
        self._snapshot_rv: dict[str, int] = {}
        self._failures: list[int] = []
        self._forbidden: set[str] = set()  # namespaces; "" forbids the cluster-wide requests
        self._crd = True  # the InferencePool CRD is installed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._gate: asyncio.Event | None = None  # cleared: new watches wait (an outage)
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FakeKube:
        started = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(started,), daemon=True,
                                        name="fakekube")
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._gate = asyncio.Event()
        self._gate.set()
        app = web.Application()
        app.router.add_get("/api/v1/{resource:pods}", self._handle)
        app.router.add_get("/api/v1/namespaces/{namespace}/{resource:pods}", self._handle)
        gie = f"/apis/{GIE_GROUP}/{GIE_VERSION}"
        app.router.add_get(gie + "/{resource:inferencepools}", self._handle)
        app.router.add_get(gie + "/namespaces/{namespace}/{resource:inferencepools}",
                           self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        started.set()
        loop.run_forever()
        self._closing = True
        self._gate.set()
        for watch in self._watches:
            watch.queue.put_nowait(_END)
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this server over plain http, with its bearer token."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop (from any thread) and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- what tests do ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return int(self._call(lambda: self._rv))

    def pods(self) -> list[Pod]:
        return list(self._call(lambda: [copy.deepcopy(p) for k, p in self._objects.items()
                                        if k[0] == "pods"]))

    def create(self, *objects: Obj) -> None:
        """Create pods or InferencePools (by their `kind`)."""
        def run() -> None:
            for pod in objects:
                pod = copy.deepcopy(pod)
                meta = pod["metadata"]
                key = _key(pod)
                assert key not in self._objects, f"{key} exists"
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = "2026-01-01T00:00:00Z"
                self._change("ADDED", None, pod)
        self._call(run)

    def update(self, namespace: str, name: str, fn: Callable[[Obj], None], *,
               resource: str = "pods") -> None:
        """Change an object in place (`fn` edits a copy); watchers see MODIFIED."""
        def run() -> None:
            old = self._objects[(resource, namespace, name)]
            new = copy.deepcopy(old)
            fn(new)
            self._change("MODIFIED", old, new)
        self._call(run)

    def terminate(self, namespace: str, name: str) -> None:
        """What `kubectl delete` does first: a deletionTimestamp, the pod still there."""
        def mark(pod: Pod) -> None:
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
            pod["metadata"]["deletionGracePeriodSeconds"] = 30
        self.update(namespace, name, mark)

    def delete(self, *keys: tuple[str, str], resource: str = "pods") -> None:
        def run() -> None:
            for key in keys:
                old = self._objects[(resource, *key)]
                self._change("DELETED", old, copy.deepcopy(old))
        self._call(run)

    def compact(self) -> None:
        """Forget history up to now: resuming from an older version gets 410 Gone."""
        def run() -> None:
            self._compacted = self._rv
            self._history.clear()
        self._call(run)

    def expire_watches(self) -> int:
        """Send every open watch a 410 ERROR event (what follows a compaction), then end it."""
        return int(self._call(lambda: self._signal(_EXPIRE)))

    def drop_watches(self) -> int:
        """Cut every open watch mid-stream, without the chunked terminator."""
        return int(self._call(lambda: self._signal(_DROP)))

    def bookmark(self) -> int:
        """A BOOKMARK with the current resourceVersion to watches that allowed bookmarks."""
        def run() -> int:
            sent = 0
            for watch in self._watches:
                if watch.bookmarks:
                    kind = next(k for k, r in RESOURCES.items() if r[0] == watch.resource)
                    watch.queue.put_nowait(("BOOKMARK", {
                        "kind": kind, "apiVersion": RESOURCES[kind][1],
                        "metadata": {"resourceVersion": str(self._rv)}}))
                    sent += 1
            return sent
        return int(self._call(run))

    def hold_watches(self) -> None:
        """New watch requests wait until `release_watches`: changes made meanwhile are
        missed by the client, deterministically (lists are still answered)."""
        self._call(lambda: self._gate.clear() if self._gate else None)

    def release_watches(self) -> None:
        self._call(lambda: self._gate.set() if self._gate else None)

    def fail_next(self, *codes: int) -> None:
        """Answer the next requests with these HTTP error codes (a flaky API server)."""
        self._call(lambda: self._failures.extend(codes))

    def forbid(self, namespace: str) -> None:
        """RBAC grants nothing in `namespace` ("": nothing cluster-wide) from now on."""
        self._call(lambda: self._forbidden.add(namespace))

    def allow(self, namespace: str) -> None:
        self._call(lambda: self._forbidden.discard(namespace))

    def crd_installed(self, installed: bool) -> None:
        """Without the InferencePool CRD, its paths are 404, as on a cluster that lacks it."""
        def run() -> None:
            self._crd = installed
        self._call(run)

    def open_watches(self) -> int:
        return int(self._call(lambda: len(self._watches)))

    def lists(self) -> list[Request]:
        return [r for r in list(self.requests) if r.kind == "list"]

    def watches(self) -> list[Request]:
        return [r for r in list(self.requests) if r.kind == "watch"]

    # -- the server ------------------------------------------------------------------------

    def _signal(self, what: object) -> int:
        for watch in self._watches:
            watch.queue.put_nowait(what)
        return len(self._watches)

    def _change(self, kind: str, old: Pod | None, new: Pod) -> None:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(new)
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = new
        self._history.append((self._rv, kind, old, new))
        for watch in self._watches:
            event = watch.event(kind, old, new)
            if event is not None:
                watch.queue.put_nowait(event)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        namespace = request.match_info.get("namespace", "")
        resource = request.match_info["resource"]
        params = dict(request.query)
        watching = params.get("watch") in ("true", "1")
        self.requests.append(Request("watch" if watching else "list", namespace, params,
                                     resource))
        if self._failures:
            code = self._failures.pop(0)
            return web.json_response(status(code, "InternalError", "injected failure"),
                                     status=code)
        if resource == "inferencepools" and not self._crd:
            return web.json_response(status(404, "NotFound", "the server could not find the "
                                            "requested resource"), status=404)
        if namespace in self._forbidden:
            verb = "watch" if watching else "list"
            scope = (f'in the namespace "{namespace}"' if namespace
                     else "at the cluster scope")
            group = next(g for p, _, g in RESOURCES.values() if p == resource)
            return web.json_response(status(403, "Forbidden", (
                f'{resource} is forbidden: User "{USER}" cannot {verb} resource "{resource}" '
                f'in API group "{group}" {scope}')), status=403)
        try:
            selector = Selector(params.get("labelSelector", ""))
        except ValueError as exc:
            return web.json_response(status(400, "BadRequest", str(exc)), status=400)
        if watching:
            assert self._gate is not None
            await self._gate.wait()
            if self._closing:
                return web.json_response(status(503, "ServiceUnavailable", "shutting down"),
                                         status=503)
            return await self._watch(request, resource, namespace, selector, params)
        return self._list(resource, namespace, selector, params)

    def _list(self, resource: str, namespace: str, selector: Selector,
              params: dict[str, str]) -> web.Response:
        token = params.get("continue", "")
        if token:
            snapshot_id, _, offset_text = token.partition(":")
            if snapshot_id not in self._snapshots:
                return web.json_response(
                    status(410, "Expired", "the continue token has expired"), status=410)
            items, rv, offset = (self._snapshots[snapshot_id],
                                 self._snapshot_rv[snapshot_id], int(offset_text))
        else:
            items = [copy.deepcopy(p) for k, p in sorted(self._objects.items())
                     if k[0] == resource and (not namespace or k[1] == namespace)
                     and selector.matches(p)]
            rv, offset = self._rv, 0
            snapshot_id = str(next(self._ids))
        limit = int(params.get("limit") or 0) or len(items) or 1
        page = items[offset:offset + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if offset + limit < len(items):
            self._snapshots[snapshot_id] = items
            self._snapshot_rv[snapshot_id] = rv
            metadata["continue"] = f"{snapshot_id}:{offset + limit}"
        else:
            self._snapshots.pop(snapshot_id, None)
        kind = next(k for k, r in RESOURCES.items() if r[0] == resource)
        return web.json_response({"kind": kind + "List", "apiVersion": RESOURCES[kind][1],
                                  "metadata": metadata, "items": page})

    async def _watch(self, request: web.Request, resource: str, namespace: str,
                     selector: Selector, params: dict[str, str]) -> web.StreamResponse:
        watch = _Watch(resource, namespace, selector,
                       params.get("allowWatchBookmarks") == "true")
        since = params.get("resourceVersion", "")
        expired = False
        initial: list[Any] = []
        if since in ("", "0"):
            # "Start at most recent": synthetic ADDED events for what exists now.
            initial = [("ADDED", p) for _, p in sorted(self._objects.items()) if watch.sees(p)]
        elif int(since) < self._compacted:
            expired = True
        else:
            for rv, kind, old, new in self._history:
                if rv > int(since):
                    event = watch.event(kind, old, new)
                    if event is not None:
                        initial.append(event)
        # Registered before the first await, so that no change can fall between the replay
        # and the live events.
        if not expired:
            self._watches.add(watch)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if expired:
                await self._send(response, ("ERROR", status(
                    410, "Expired", f"too old resource version: {since} ({self._compacted})")))
                await response.write_eof()
                return response
            for event in initial:
                await self._send(response, event)
            timeout = float(params.get("timeoutSeconds") or 1800)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    item = await asyncio.wait_for(watch.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                if item is _END:
                    break
                if item is _DROP:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if item is _EXPIRE:
                    await self._send(response, ("ERROR", status(
                        410, "Expired", "too old resource version")))
                    break
                await self._send(response, item)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away: so does the watch
        finally:
            self._watches.discard(watch)
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: tuple[str, Any]) -> None:
        kind, obj = event
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")


def addresses(pods: Iterator[Pod] | list[Pod]) -> set[str]:
    """`IP:PORT` of pods that carry a hybridlb.io/port annotation (the tests' convention)."""
    return {f"{p['status']['podIP']}:{p['metadata']['annotations']['hybridlb.io/port']}"
            for p in pods}


def main() -> None:
    """`python -m tests.fakekube --kubeconfig PATH`: the server in its own process, driven by
    JSON lines on stdin, for `hybridlb bench k8s` (which is installed, while tests/ is not).

    Writes `{"url": ...}` once listening, then answers each command with `{"t": ...}`: the
    `time.monotonic()` (system-wide on Linux) right after the change was queued to every open
    watch. Commands: `{"op": "create", "name", "ip", "port", "node", "ready"}`,
    `{"op": "ready" | "terminate" | "delete", "name"}` (namespace "default", pool qwen3)."""
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(prog="python -m tests.fakekube")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="file to write")
    args = parser.parse_args()

    def ready(pod: Pod) -> None:
        pod["status"]["conditions"][0]["status"] = "True"

    with FakeKube() as kube:
        kube.write_kubeconfig(args.kubeconfig)
        print(json.dumps({"url": kube.url}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            op, name = command["op"], command["name"]
            if op == "create":
                kube.create(make_pod(
                    name, ip=command["ip"], node=command["node"], ready=command["ready"],
                    annotations={"hybridlb.io/port": str(command["port"])},
                    args=["vllm", "serve", "Qwen/Qwen3-0.6B", "--served-model-name", "qwen3"]))
            elif op == "ready":
                kube.update("default", name, ready)
            elif op == "terminate":
                kube.terminate("default", name)
            elif op == "delete":
                kube.delete(("default", name))
            else:
                raise SystemExit(f"unknown op {op!r}")
            print(json.dumps({"t": time.monotonic()}), flush=True)


if __name__ == "__main__":
    main()
