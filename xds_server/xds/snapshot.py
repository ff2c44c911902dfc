"""Immutable, content-versioned resources, encoded once for every stream that sends them.

An `Entry` keeps a resource already in the wire form of both ADS responses: the bytes of
one `resources` item of a `DiscoveryResponse` (SotW) and of a `DeltaDiscoveryResponse`.
Protobuf messages concatenate field by field, so a response is a small header plus the
entries' bytes joined: no stream ever re-serializes a pool's endpoints.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message


@dataclass(frozen=True)
class Entry:
    name: str
    #: Content hash of the serialized resource: unchanged content, unchanged version.
    version: str
    sotw: bytes
    delta: bytes


def resource_name(message: Message) -> str:
    """Clusters, listeners and routes have `name`; a ClusterLoadAssignment `cluster_name`."""
    name = getattr(message, "cluster_name", None) or getattr(message, "name", "")
    return str(name)


def encode(message: Message) -> Entry:
    payload = message.SerializeToString(deterministic=True)
    name = resource_name(message)
    version = hashlib.blake2b(payload, digest_size=8).hexdigest()
    packed = any_pb2.Any(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name, value=payload
    )
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(
        resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
    ).SerializeToString()
    return Entry(name=name, version=version, sotw=sotw, delta=delta)


class _EncodedByIdentity:
    """Entries of messages encoded before, by the message object's identity.

    The builders memoize their messages and never mutate one they returned, so the same
    object met again (a pool's clusters in 200 views, a listener from one snapshot to the
    next) has the same bytes: at 200 views that is most of the per-view work. The message
    is held with its entry, so its id cannot be reused while cached. Locked: the publisher
    builds in a worker thread while the loop may build a late view.
    """

    def __init__(self, capacity: int) -> None:
        self._entries: OrderedDict[int, tuple[Message, Entry]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> Entry:
        key = id(message)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] is message:
                self._entries.move_to_end(key)
                return hit[1]
        entry = encode(message)
        with self._lock:
            self._entries[key] = (message, entry)
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return entry


_encode_memoized = _EncodedByIdentity(capacity=8192)


def encode_all(
    messages: Iterable[Message],
    previous: Mapping[str, Entry] | None = None,
    *,
    by_identity: bool = False,
) -> dict[str, Entry]:
    """Encode messages by name, reusing a previous entry object when the content is the same.

    `by_identity` for the builders' memoized messages (the per-view ones): an object met
    before is not encoded again. Fresh messages (a new snapshot's endpoints) gain nothing
    from it and would only fill the memo with large assignments.
    """
    previous = previous or {}
    out: dict[str, Entry] = {}
    for message in messages:
        entry = _encode_memoized(message) if by_identity else encode(message)
        old = previous.get(entry.name)
        out[entry.name] = old if old is not None and old.version == entry.version else entry
    return out


def set_version(entries: Iterable[Entry]) -> str:
    """One version for a set of resources (the SotW `version_info` of a response)."""
    digest = hashlib.blake2b(digest_size=8)
    for entry in sorted(entries, key=lambda e: e.name):
        digest.update(entry.name.encode())
        digest.update(b"\0")
        digest.update(entry.version.encode())
        digest.update(b"\0")
    return digest.hexdigest()
