"""One list+watch loop (client-go's reflector), for any kind of object the API server lists.

Run in its own thread (the official client is blocking). A full list (paged), then a watch
from the list's resourceVersion with bookmarks; a dropped or timed-out watch resumes from the
last resourceVersion seen (bookmarks advance it); 410 Gone relists at once, as client-go
does on "too old resource version", and the relist replaces the loop's objects in one step,
so no object that left lingers and none that stayed blinks out. Only errors back off
(exponentially, with jitter): an expired version is an answer from a server that works.

A watch that hears nothing, not even a bookmark, for `watch_silence_s` is taken for dead
and resumed: API servers send a bookmark about once a minute (kubernetes/kubernetes#90249,
since 1.19) to a watch that allows them, so a longer silence is a connection that died
without a FIN (a NAT or load balancer that dropped it, an API server that vanished).

An API server that refuses the request (401, 403, 404: RBAC, a missing CRD) is retried with
the same backoff, but the loop counts as settled: the rest of discovery does not wait for it.
Its state (`status`) carries the API server's own message for /readyz, /debug/state and logs.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

from xds_server.logsafe import clip
from xds_server.metrics import Metrics
from xds_server.settings import KubernetesSettings

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
T = TypeVar("T")
#: HTTP answers that retrying will not change until an operator does something.
REFUSED = frozenset({401, 403, 404})


def backoff_delay(
    failures: int, *, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with jitter: several control planes must not retry in step."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    jitter: float = (rng or random).uniform(0.5, 1.0)
    return ceiling * jitter


@dataclass
class Retry:
    """How long a loop waits before its next request, from what the last ones got.

    Errors (no answer, 5xx, a refusal) back off, and count up across an outage. An expired
    resourceVersion is an answer: it clears the errors and relists at once; only a second
    410 with no watch that worked in between (the server is struggling) backs off.
    """

    initial_s: float
    max_s: float
    errors: int = 0
    expired: int = 0

    def error(self) -> float:
        self.errors += 1
        return backoff_delay(self.errors, initial_s=self.initial_s, max_s=self.max_s)

    def gone(self) -> float:
        self.errors = 0
        self.expired += 1
        if self.expired == 1:
            return 0.0
        return backoff_delay(self.expired - 1, initial_s=self.initial_s, max_s=self.max_s)

    def listed(self) -> None:
        self.errors = 0

    def watched(self) -> None:
        """A watch ran until the server ended it: its resourceVersion was not expired."""
        self.errors = 0
        self.expired = 0


class Expired(Exception):
    """410 Gone: the resourceVersion is compacted away; only a relist can continue."""


class Silent(Exception):
    """No event and no bookmark for longer than an API server stays quiet."""


@dataclass(frozen=True)
class WatchStatus:
    """What /readyz and /debug/state say about one loop."""

    resource: str
    namespace: str  # "" for all namespaces
    selector: str
    #: The last error while failing (the API server's own message where it sent one).
    error: str = ""

    @property
    def where(self) -> str:
        return f"{self.resource} in {self.namespace or 'all namespaces'}" + (
            f" ({self.selector})" if self.selector else "")


class ListWatch(Generic[T]):
    """One resource in one namespace (or all): `request(**kwargs)` is the client's list call
    (with `_preload_content=False`), `convert` turns one object (JSON) into a `T`."""

    def __init__(
        self,
        *,
        resource: str,
        namespace: str,
        selector: str,
        request: Callable[..., Any],
        convert: Callable[[dict[str, Any]], T],
        settings: KubernetesSettings,
        metrics: Metrics,
        notify: Callable[[], None],
        report: Callable[[T, T | None], None] | None = None,
    ) -> None:
        self._resource = resource
        self._namespace = namespace
        self._selector = selector
        self._request = request
        self._convert = convert
        self._settings = settings
        self._metrics = metrics
        self._notify = notify
        self._report = report
        self._lock = threading.Lock()
        self._results: dict[str, T] = {}  # by uid; guarded by _lock
        self._stop = threading.Event()
        self._response: Any = None
        self._error = ""
        self.resource_version = ""
        #: Listed, or refused by the API server: the merge need not wait for it any longer.
        self.settled = threading.Event()
        self._up = metrics.watch_up.labels(resource, namespace, selector)
        self._up.set(0)

    @property
    def where(self) -> str:
        return self.status().where

    def status(self) -> WatchStatus:
        return WatchStatus(self._resource, self._namespace, self._selector, self._error)

    def results(self) -> list[T]:
        with self._lock:
            return list(self._results.values())

    def stop(self) -> None:
        """Ask the thread to end; unblocks a read in progress (any thread may call it)."""
        self._stop.set()
        response = self._response
        if response is not None:
            response.shutdown()

    def run(self) -> None:
        retry = Retry(self._settings.backoff_initial_s, self._settings.backoff_max_s)
        next_resync = 0.0
        while not self._stop.is_set():
            try:
                if not self.resource_version or time.monotonic() >= next_resync:
                    self._list()
                    # Jittered, so that control-plane replicas do not relist in step.
                    next_resync = time.monotonic() + self._settings.resync_interval_s * (
                        random.uniform(0.9, 1.1))
                    retry.listed()
                self._watch(until=next_resync)
                retry.watched()
            except Expired as exc:
                log.info("%s: %s; relisting", self.where, exc)
                self._metrics.source_errors.labels(SOURCE, "expired").inc()
                self.resource_version = ""
                self._stop.wait(retry.gone())
            except Silent as exc:
                # A dead connection, not a failing server: resume at once.
                self._metrics.source_errors.labels(SOURCE, "watch_silent").inc()
                log.warning("%s: %s; resuming the watch", self.where, exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                reason = "list_error" if not self.resource_version else "watch_error"
                self._metrics.source_errors.labels(SOURCE, reason).inc()
                self._failed(exc, reason)
                self._stop.wait(retry.error())

    def _ok(self) -> None:
        """The API server answered; the caller notifies (once, with its own news)."""
        if self._error:
            log.info("%s: working again", self.where)
            self._error = ""
        self._up.set(1)

    def _failed(self, exc: Exception, reason: str) -> None:
        message = describe(exc)
        refused = isinstance(exc, client.ApiException) and exc.status in REFUSED
        self._up.set(0)
        changed = message != self._error
        self._error = message
        log.warning("%s: %s (%s); retrying%s", self.where, message, reason,
                    "; the other watches go on without it" if refused else "")
        if refused:
            self.settled.set()
        if changed:
            self._notify()

    def _list(self) -> None:
        found: dict[str, T] = {}
        token: str | None = None
        while True:
            try:
                response = self._call(
                    limit=self._settings.list_page_size, _continue=token,
                    _request_timeout=(self._settings.connect_timeout_s,
                                      self._settings.list_timeout_s))
            except client.ApiException as exc:
                if exc.status == 410:  # the continue token expired
                    raise Expired("list continuation expired") from exc
                raise
            try:
                doc = json.loads(response.data)
            finally:
                response.release_conn()
            for obj in doc.get("items") or []:
                found[uid(obj)] = self._convert(obj)
            metadata = doc.get("metadata") or {}
            token = metadata.get("continue") or None
            if token is None:
                break
            if self._stop.is_set():
                return
        with self._lock:
            self._report_all(found)
            self._results = found
        self.resource_version = str(metadata.get("resourceVersion") or "")
        self.settled.set()
        self._ok()  # the new objects and the cleared error reach the merge together
        self._notify()

    def _call(self, **kwargs: Any) -> Any:
        return self._request(label_selector=self._selector or None, _preload_content=False,
                             **kwargs)

    def _watch(self, *, until: float) -> None:
        """Watch until the server ends the stream (or the silence is too long)."""
        timeout = max(1, min(self._settings.watch_timeout_s, int(until - time.monotonic())))
        silence = self._settings.watch_silence_s
        try:
            response = self._call(
                watch=True, resource_version=self.resource_version,
                allow_watch_bookmarks=True, timeout_seconds=timeout,
                # The read timeout bounds the silence between two lines of the stream.
                _request_timeout=(self._settings.connect_timeout_s, silence))
        except client.ApiException as exc:
            if exc.status == 410:
                raise Expired("watch resourceVersion too old") from exc
            raise
        self._response = response
        if self._error:  # the watch is open again: so say /readyz and /debug/state
            self._ok()
            self._notify()
        self._up.set(1)
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if line.strip():
                    self._event(json.loads(line))
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise Silent(f"no event or bookmark for {silence:g} s") from exc
        finally:
            self._response = None
            response.release_conn()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired(obj.get("message") or "Gone")
            raise RuntimeError(f"watch error {obj.get('code')} {obj.get('reason')}: "
                               f"{obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind in ("ADDED", "MODIFIED"):
            result = self._convert(obj)
            with self._lock:
                self._report_all({uid(obj): result})
                self._results[uid(obj)] = result
        elif kind == "DELETED":
            with self._lock:
                self._results.pop(uid(obj), None)
        elif kind != "BOOKMARK":
            log.debug("%s: ignoring event type %r", self.where, kind)
        if version:
            self.resource_version = version
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._notify()

    def _report_all(self, results: dict[str, T]) -> None:
        if self._report is not None:
            for key, result in results.items():
                self._report(result, self._results.get(key))


def uid(obj: dict[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    value = metadata.get("uid")
    return str(value) if value else f"{metadata.get('namespace')}/{metadata.get('name')}"


def describe(exc: Exception) -> str:
    """One short line, with the API server's own message (its Status body) where it sent one."""
    if isinstance(exc, client.ApiException):
        text = f"HTTP {exc.status} {exc.reason}"
        try:
            message = json.loads(exc.body or b"{}").get("message")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str) and message:
            text += f": {message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return clip(text, 400)
