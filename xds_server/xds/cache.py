"""The snapshot cache: one complete, immutable snapshot per view, and who must hear of a change.

go-control-plane's model: the publisher decides and builds every snapshot; the cache only
holds them by view and wakes the streams. A view is plain data (`View`): the node an Envoy
claims, if some pool has a replica there, and its listener port. Any other claimed node is
the no-node view of its port, so a client that makes node ids up costs nothing.

Only views some stream is attached to (plus the no-node default) are kept and rebuilt on a
change; a stream that attaches to a view not built yet gets it from the publisher's current
decision (`ViewSource`), never from an older one kept here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from xds_server.model import View
from xds_server.xds.snapshot import Entry

Resources = Mapping[str, Mapping[str, Entry]]


@dataclass(frozen=True)
class Snapshot:
    """Everything one view's Envoy holds: type URL -> resource name -> encoded entry."""

    resources: Resources = field(default_factory=dict)
    #: The endpoint assignments the clusters name: routes wait until an Envoy has them.
    assignments_needed: frozenset[str] = frozenset()

    def same_as(self, other: Snapshot | None) -> bool:
        """Same names at the same content versions (the encoded objects may differ)."""
        if other is None or self.resources.keys() != other.resources.keys():
            return False
        for type_url, entries in self.resources.items():
            theirs = other.resources[type_url]
            if entries is theirs:
                continue
            if entries.keys() != theirs.keys():
                return False
            if any(entries[n].version != theirs[n].version for n in entries):
                return False
        return True


class ViewSource(Protocol):
    """Builds a view's snapshot from the current decision (the publisher)."""

    def build_view(self, view: View) -> Snapshot | None: ...


class SnapshotCache:
    def __init__(self) -> None:
        self._views: dict[View, Snapshot] = {}
        #: Nodes that have their own view (some pool has a replica there).
        self._nodes: frozenset[str] = frozenset()
        self._version = 0
        self._ready = False
        self._source: ViewSource | None = None
        self._subscribers: set[Callable[[], None]] = set()
        #: Views of connected streams, as they claimed them, with how many streams claim each.
        self._attached: Counter[View] = Counter()

    @property
    def version(self) -> int:
        return self._version

    @property
    def ready(self) -> bool:
        """True once a snapshot has been published."""
        return self._ready

    def set_source(self, source: ViewSource) -> None:
        self._source = source

    def key(self, view: View, nodes: frozenset[str] | None = None) -> View:
        """The view a claimed one is served: its node only if that node has its own view."""
        nodes = self._nodes if nodes is None else nodes
        return view if view.node in nodes else View(listener_port=view.listener_port)

    def views_in_use(self, nodes: frozenset[str]) -> set[View]:
        """The views to build for a publish whose nodes are `nodes`: every attached stream's
        and the default one."""
        return {View(), *(self.key(v, nodes) for v in self._attached)}

    def set_snapshots(self, nodes: frozenset[str], views: Mapping[View, Snapshot]) -> bool:
        """Make `views` current (complete: views not in it are dropped); returns False, and
        wakes no one, if every stream's view is as it was."""
        old, old_nodes = self._views, self._nodes
        self._views, self._nodes = dict(views), nodes
        changed = not self._ready or any(
            not self.snapshot_for(v).same_as(old.get(self.key(v, old_nodes)))  # type: ignore[union-attr]
            for v in {View(), *self._attached}
        )
        self._ready = True
        if not changed:
            return False
        self._version += 1
        for notify in self._subscribers:
            notify()
        return True

    def snapshot_for(self, view: View) -> Snapshot | None:
        key = self.key(view)
        snapshot = self._views.get(key)
        if snapshot is None and self._ready and self._source is not None:
            snapshot = self._source.build_view(key)
            if snapshot is not None:
                self._views[key] = snapshot
        return snapshot

    def attach(self, view: View) -> None:
        self._attached[view] += 1

    def detach(self, view: View) -> None:
        self._attached[view] -= 1
        if self._attached[view] > 0:
            return
        del self._attached[view]
        # Keep no view no stream uses: streams that come and go claiming ever new listener
        # ports must not grow the cache between publishes.
        key = self.key(view)
        if key != View() and all(self.key(v) != key for v in self._attached):
            self._views.pop(key, None)

    def subscribe(self, notify: Callable[[], None]) -> None:
        self._subscribers.add(notify)

    def unsubscribe(self, notify: Callable[[], None]) -> None:
        self._subscribers.discard(notify)

    @property
    def views(self) -> Iterable[View]:
        return self._views.keys()
