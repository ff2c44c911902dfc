"""Immutable, content-versioned resources, encoded once for every stream that sends them.

An `Entry` keeps a resource already in the wire form of both ADS responses: the bytes of
one `resources` item of a `DiscoveryResponse` (SotW) and of a `DeltaDiscoveryResponse`.
Protobuf messages concatenate field by field, so a response is a small header plus the
entries' bytes joined: no stream ever re-serializes a pool's endpoints.
"""

from __future__ import annotations

import hashlib
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


def encode_all(
    messages: Iterable[Message], previous: Mapping[str, Entry] | None = None
) -> dict[str, Entry]:
    """Encode messages by name, reusing a previous entry object when the content is the same."""
    previous = previous or {}
    out: dict[str, Entry] = {}
    for message in messages:
        entry = encode(message)
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
