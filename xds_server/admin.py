"""The admin HTTP server: /healthz, /readyz, /metrics, /debug/state, /picker/state.
Read-only by design.

/debug/state is rendered at most once per `DEBUG_STATE_MAX_AGE_S` and the same bytes go to
every reader: 200 concurrent readers once took `serve` to 1 GiB and delayed config updates
by seconds, each building its own copy of every stream's (then uncapped) node id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xds_server.metrics import Metrics
from xds_server.model import Load
from xds_server.policy.weights import Explanation
from xds_server.publisher import Published
from xds_server.state import State
from xds_server.xds.server import StreamInfo


def debug_state(
    published: Published, loads: Mapping[str, Load], streams: Mapping[str, StreamInfo],
    problems: Mapping[str, str] | None = None,
    ingress: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """The JSON document of /debug/state (documented in the README). `ingress`: requests a
    second entering Envoys, pool -> Envoy node ("" for a gateway) -> rate (State.ingress)."""
    now = time.time()
    pools = []
    for pool in published.pools:
        weights = published.weights.get(pool.name)
        replicas = []
        for r in pool.replicas:
            load = loads.get(r.address)
            replicas.append(
                {
                    "address": r.address,
                    "node": r.node,
                    "zone": r.zone,
                    "capacity": r.capacity,
                    "dp_rank": r.dp_rank,
                    "state": r.state.value,
                    "origin": r.origin,
                    "load": None
                    if load is None
                    else {
                        "running": load.running,
                        "waiting": load.waiting,
                        "kv_cache_usage": load.kv_cache_usage,
                        "age_s": round(now - load.read_at, 3),
                        # Per engine (the global DP rank): the picker chooses a rank by them.
                        "ranks": [{"engine": k.engine, "running": k.running,
                                   "waiting": k.waiting} for k in load.ranks],
                    },
                    "weight": weights.endpoints.get(r.address) if weights else None,
                    "weight_inputs": _explain(published, pool.name, r.address),
                }
            )
        pools.append(
            {
                "name": pool.name,
                "nodes": {
                    node: {
                        "weight": weights.localities.get(node) if weights else None,
                        "utilization": published.node_utilization.get(pool.name, {}).get(node),
                        "keep_per_mille": published.keep.get(pool.name, {}).get(node),
                    }
                    for node in pool.nodes
                },
                "replicas": replicas,
            }
        )
    return {
        "xds_version": published.xds_version,
        "state_version": published.state_version,
        "published_at": published.at,
        "pools": pools,
        "problems": dict(problems or {}),
        "ingress": {pool: {node: round(rate, 3) for node, rate in nodes.items()}
                    for pool, nodes in (ingress or {}).items()},
        "envoys": [
            {**s.as_dict(), "keep_per_mille": {
                pool: nodes.get(s.view.node, 0) for pool, nodes in published.keep.items()
            }}
            for s in streams.values()
        ],
    }


def _explain(published: Published, pool: str, address: str) -> dict[str, float] | None:
    explanation = published.explain.get(pool, {}).get(address)
    return None if explanation is None else dataclasses.asdict(explanation)


#: How stale /debug/state may be: short enough for a person or a test polling it.
DEBUG_STATE_MAX_AGE_S = 0.2


class Rendered:
    """A JSON document built and encoded at most once per `max_age_s`."""

    def __init__(self, build: Callable[[], dict[str, Any]], *, max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self._max_age_s = max_age_s
        self._clock = clock
        self._body = b""
        self._at = -float("inf")

    def body(self) -> bytes:
        now = self._clock()
        if now - self._at >= self._max_age_s:
            self._body = json.dumps(self._build()).encode()
            self._at = now
        return self._body


#: The columns of a replica's row in /picker/state; a row per replica, as arrays: at 10,000
#: replicas, objects with named fields took twice as long to render and to parse.
PICKER_STATE_FIELDS = ("address", "node", "capacity", "dp_rank", "state", "running", "waiting",
                       "read_at", "ranks", "speed", "slots")


def picker_state(state: State,
                 keep: Mapping[str, Mapping[str, int]] | None = None,
                 judged: Callable[[str, str], Explanation | None] | None = None
                 ) -> dict[str, Any]:
    """The JSON document of /picker/state: what an endpoint picker reads, nothing more.
    A replica without a load reading has null running, waiting and read_at; `ranks` are
    [engine, running, waiting] per engine; `speed` is the replica's decode speed against
    its pool's typical and `slots` the room per rank its load is read against, as the policy
    judged them (`judged(pool, address)`; 1 and null without). Load times are this host's wall
    clock; the reply's
    `X-Hybridlb-Time` lets a reader on another host correct for clock skew. A pool's `keep`
    holds the keep shares per mille by node, the nodes with none left out (an absent `keep`,
    as older control planes send, holds nothing on any node)."""
    loads = state.loads
    keep = keep or {}
    pools = []
    for pool in state.pools:
        rows: list[list[Any]] = []
        for r in pool.replicas:
            load = loads.get(r.address)
            view = judged(pool.name, r.address) if judged is not None else None
            policy = [view.relative_speed, view.slots] if view is not None else [1.0, None]
            if load is None:
                rows.append([r.address, r.node, r.capacity, r.dp_rank, r.state.value,
                             None, None, None, [], *policy])
            else:
                rows.append([r.address, r.node, r.capacity, r.dp_rank, r.state.value,
                             load.running, load.waiting, load.read_at,
                             [[k.engine, k.running, k.waiting] for k in load.ranks], *policy])
        shares = {node: share for node, share in keep.get(pool.name, {}).items() if share}
        pools.append({"name": pool.name, "keep": shares, "replicas": rows})
    return {"version": state.version, "fields": PICKER_STATE_FIELDS, "pools": pools}


#: Renders of /picker/state at most this often however often loads change, and at most
#: this share of the control plane's loop: at 10,000 replicas one render takes 50-90 ms.
PICKER_STATE_MIN_INTERVAL_S = 0.1
PICKER_STATE_MAX_LOOP_SHARE = 0.2
#: Longest long-poll (`?wait_s=`) a reader may ask for.
PICKER_STATE_MAX_WAIT_S = 30.0


class KeepSource(Protocol):
    """The publisher as the feed reads it: the keep shares and judgements it published, and
    their changes."""

    published: Published
    feed_version: int

    async def wait_feed_change(self, seen_version: int) -> int: ...


class PickerFeed:
    """/picker/state, versioned: the ETag names the hub's version and that of what the
    publisher feeds it (keep shares, each replica's speed and room), so a reader that has it
    gets an empty 304 (optionally after waiting up to `wait_s` for a change) instead of the
    whole fleet again. The ETag carries this process's instance id: a restarted control
    plane counts versions from 0 again."""

    def __init__(self, state: State, *, keep: KeepSource | None = None,
                 min_interval_s: float = PICKER_STATE_MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._keep = keep
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._instance = uuid.uuid4().hex[:12]
        self._etag = ""
        self._body = b""
        self._at = -float("inf")
        self._cost_s = 0.0
        self.renders = 0
        #: Readers waiting in a long poll now.
        self.waiting = 0

    def current(self) -> tuple[str, bytes]:
        """(ETag, body) of the latest render, rendering again if the hub or the publisher's
        feed changed since and the last render is at least `min_interval_s` old."""
        etag = self._current_etag()
        now = self._clock()
        if etag != self._etag and now - self._at >= self._interval_s():
            published = self._keep.published if self._keep is not None else None
            self._body = json.dumps(picker_state(
                self._state, published.keep if published else None,
                published.judged if published else None)).encode()
            self._etag, self._at = etag, now
            self._cost_s = self._clock() - now
            self.renders += 1
        return self._etag, self._body

    def _current_etag(self) -> str:
        keep = self._keep.feed_version if self._keep is not None else 0
        return f'"{self._instance}-{self._state.version}-{keep}"'

    def _interval_s(self) -> float:
        return max(self._min_interval_s, self._cost_s / PICKER_STATE_MAX_LOOP_SHARE)

    async def _changed(self, wait_s: float) -> bool:
        """Whether the hub or what the publisher feeds changed within `wait_s`."""
        waits = [asyncio.ensure_future(self._state.wait_change(self._state.version))]
        if self._keep is not None:
            waits.append(asyncio.ensure_future(
                self._keep.wait_feed_change(self._keep.feed_version)))
        try:
            done, _ = await asyncio.wait(waits, timeout=wait_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            return bool(done)
        finally:
            for wait in waits:
                wait.cancel()

    async def wait_other_than(self, etag: str, wait_s: float) -> None:
        """Return once a render with another ETag is due, or after `wait_s`."""
        deadline = self._clock() + wait_s
        while self.current()[0] == etag:
            left = deadline - self._clock()
            if left <= 0:
                return
            if self._etag == self._current_etag():
                # Unchanged since the render the reader has: wait for a change.
                if not await self._changed(left):
                    return
            else:  # changed, but rendered too recently: the next render is due soon
                await asyncio.sleep(min(left, max(0.0, self._at + self._interval_s()
                                                  - self._clock())))

    async def handle(self, request: web.Request) -> web.Response:
        seen = request.headers.get("If-None-Match", "")
        try:
            wait_s = min(max(float(request.query.get("wait_s", "0")), 0.0),
                         PICKER_STATE_MAX_WAIT_S)
        except ValueError:
            return web.Response(status=400, text="wait_s: expected seconds\n")
        if seen and wait_s > 0:
            self.waiting += 1
            try:
                await self.wait_other_than(seen, wait_s)
            finally:
                self.waiting -= 1
        etag, body = self.current()
        headers = {"ETag": etag, "X-Hybridlb-Time": repr(time.time())}
        if seen == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)


def build_feed_app(picker_feed: PickerFeed) -> web.Application:
    """/picker/state alone: what serve's picker process follows, on loopback."""
    app = web.Application()
    app.router.add_get("/picker/state", picker_feed.handle)
    return app


def build_app(
    *,
    metrics: Metrics,
    ready: Callable[[], bool],
    state: Callable[[], dict[str, Any]],
    problems: Callable[[], Mapping[str, str]] = dict,
    picker_feed: PickerFeed | None = None,
) -> web.Application:
    rendered = Rendered(state, max_age_s=DEBUG_STATE_MAX_AGE_S)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        # What a source cannot see (a watch the API server refuses) does not hold readiness
        # back once the rest is published, but is said here.
        detail = "".join(f"failing: {what}: {why}\n" for what, why in problems().items())
        if ready():
            return web.Response(text="ready\n" + detail)
        return web.Response(status=503,
                            text="not ready: waiting for the first snapshot\n" + detail)

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def debug(request: web.Request) -> web.Response:
        return web.Response(body=rendered.body(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/debug/state", debug)
    if picker_feed is not None:
        app.router.add_get("/picker/state", picker_feed.handle)
    return app
