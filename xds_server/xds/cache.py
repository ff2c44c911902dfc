"""The snapshot cache: what each Envoy's view holds now, and who must hear of a change.

Resources the same for every Envoy (clusters, endpoints, routes) are built and encoded once
per change; per-view resources (the listener) are built lazily, once per view and change.
Streams only read from here; how they are served is the server's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from xds_server.model import View
from xds_server.xds import types
from xds_server.xds.snapshot import Entry, encode_all

Resources = Mapping[str, Mapping[str, Entry]]
ViewBuilder = Callable[[View], Mapping[str, Sequence[Message]]]


@dataclass(frozen=True)
class Snapshot:
    version: int
    shared: Resources
    view_builder: ViewBuilder
    views: dict[View, Resources] = field(default_factory=dict, compare=False)


CHANGED = object()
"""Put on a subscriber's queue when a new snapshot is published."""


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshot = Snapshot(version=0, shared={}, view_builder=lambda view: {})
        self._subscribers: set[asyncio.Queue[object]] = set()
        self._ready = False

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def ready(self) -> bool:
        """True once a snapshot has been published."""
        return self._ready

    @property
    def shared(self) -> Resources:
        return self._snapshot.shared

    def publish(
        self, shared: Mapping[str, Sequence[Message]], view_builder: ViewBuilder
    ) -> bool:
        """Make new resources current; returns False (and wakes no one) if nothing changed."""
        old = self._snapshot
        encoded = {
            type_url: encode_all(messages, old.shared.get(type_url))
            for type_url, messages in shared.items()
        }
        views: dict[View, Resources] = {}
        unchanged_shared = _same(encoded, old.shared)
        if unchanged_shared and self._ready:
            # Shared resources equal: only a view may differ; rebuild the known views to see.
            for view in old.views:
                views[view] = self._build_view(view, view_builder, encoded, old.views[view])
            if all(_same(views[v], old.views[v]) for v in views):
                return False
        self._snapshot = Snapshot(
            version=old.version + 1, shared=encoded, view_builder=view_builder, views=views
        )
        self._ready = True
        for queue in self._subscribers:
            queue.put_nowait(CHANGED)
        return True

    def resources_for(self, view: View) -> Resources:
        snapshot = self._snapshot
        resources = snapshot.views.get(view)
        if resources is None:
            resources = self._build_view(view, snapshot.view_builder, snapshot.shared, {})
            snapshot.views[view] = resources
        return resources

    def subscribe(self, queue: asyncio.Queue[object]) -> None:
        self._subscribers.add(queue)

    def unsubscribe(self, queue: asyncio.Queue[object]) -> None:
        self._subscribers.discard(queue)

    @staticmethod
    def _build_view(
        view: View, builder: ViewBuilder, shared: Resources, previous: Resources
    ) -> Resources:
        merged: dict[str, Mapping[str, Entry]] = {t: shared.get(t, {}) for t in types.PUSH_ORDER}
        for type_url, messages in builder(view).items():
            own = encode_all(messages, previous.get(type_url), by_identity=True)
            merged[type_url] = {**merged.get(type_url, {}), **own}
        return merged


def _same(a: Resources, b: Resources) -> bool:
    if a.keys() != b.keys():
        return False
    for type_url, entries in a.items():
        other = b[type_url]
        if entries.keys() != other.keys():
            return False
        if any(entries[n].version != other[n].version for n in entries):
            return False
    return True
