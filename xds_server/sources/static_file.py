"""Static discovery: pools from a YAML file, watched for changes.

The format (documented in the README):

    pools:
      - name: qwen3
        replicas:
          - address: 127.0.0.1:8001
            node: node-a
            capacity: 2      # DP ranks behind this endpoint; default 1
            zone: zone-1     # optional
            max_num_seqs: 64 # optional: the server's --max-num-seqs (else learnt)

A broken edit is logged and counted, and the last good pools stay in force. A change is
judged only once two reads in a row agree, so a file caught half-written by an in-place edit
neither drops the replicas it has not reached yet nor counts as broken.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from xds_server.addresses import is_ip, parse_address
from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica
from xds_server.sources.names import valid_pool_name
from xds_server.state import State

log = logging.getLogger(__name__)

SOURCE = "static"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_POOL_KEYS = {"name", "replicas"}
_REPLICA_KEYS = {"address", "node", "capacity", "zone", "dp_rank", "max_num_seqs"}


class PoolFileError(ValueError):
    """The pool file cannot be used; the message says where and why."""


def parse_pools(text: str, *, origin: str = "") -> tuple[Pool, ...]:
    """Parse and validate the pool file's YAML text."""
    try:
        # libyaml's loader parses a 10,000-replica file about 4 times faster.
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise PoolFileError(f"not valid YAML: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # an integer of 5,000 digits; deep nesting
        raise PoolFileError(f"not usable YAML: {str(exc)[:200]}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("pools"), list):
        raise PoolFileError("expected a mapping with a 'pools' list")
    pools: list[Pool] = []
    names: set[str] = set()
    for i, raw in enumerate(doc["pools"]):
        where = f"pools[{i}]"
        if not isinstance(raw, dict):
            raise PoolFileError(f"{where}: expected a mapping")
        _check_keys(raw, _POOL_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or not valid_pool_name(name):
            raise PoolFileError(f"{where}.name: {name!r} is not a valid pool name")
        if name in names:
            raise PoolFileError(f"{where}.name: pool {name!r} appears twice")
        names.add(name)
        replicas = raw.get("replicas") or []
        if not isinstance(replicas, list):
            raise PoolFileError(f"{where}.replicas: expected a list")
        parsed = [
            _parse_replica(r, f"{where}.replicas[{j}]", origin) for j, r in enumerate(replicas)
        ]
        seen: set[str] = set()
        for replica in parsed:
            if replica.address in seen:
                raise PoolFileError(f"{where}: replica {replica.address} appears twice")
            seen.add(replica.address)
        pools.append(Pool(name=name, replicas=tuple(sorted(parsed))))
    return tuple(pools)


def _check_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise PoolFileError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _parse_replica(raw: Any, where: str, origin: str) -> Replica:
    if not isinstance(raw, dict):
        raise PoolFileError(f"{where}: expected a mapping")
    _check_keys(raw, _REPLICA_KEYS, where)
    try:
        host, port = parse_address(str(raw.get("address", "")))
    except ValueError as exc:
        raise PoolFileError(f"{where}.address: {exc}") from exc
    if not is_ip(host):
        # Envoy's EDS takes IP literals only and will reject (NACK) this endpoint.
        log.warning("%s.address: %r is not an IP address; Envoy's EDS will reject it", where, host)
    node = raw.get("node")
    if not isinstance(node, str) or not _NODE_NAME.match(node):
        raise PoolFileError(f"{where}.node: {node!r} is not a valid node name")
    capacity = raw.get("capacity", 1)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= 4096:
        raise PoolFileError(f"{where}.capacity: {capacity!r} is not an integer in 1..4096")
    zone = raw.get("zone", "")
    if not isinstance(zone, str):
        raise PoolFileError(f"{where}.zone: {zone!r} is not a string")
    dp_rank = raw.get("dp_rank", 0)
    if not isinstance(dp_rank, int) or isinstance(dp_rank, bool) or dp_rank < 0:
        raise PoolFileError(f"{where}.dp_rank: {dp_rank!r} is not an integer >= 0")
    seqs = raw.get("max_num_seqs")
    if seqs is not None and (not isinstance(seqs, int) or isinstance(seqs, bool) or seqs < 1):
        raise PoolFileError(f"{where}.max_num_seqs: {seqs!r} is not an integer >= 1")
    return Replica(host=host, port=port, node=node, capacity=capacity, zone=zone, origin=origin,
                   dp_rank=dp_rank, max_num_seqs=seqs)


class StaticFileSource:
    """Polls the file's content; a change that parses replaces the static pools."""

    def __init__(
        self, *, path: Path, state: State, metrics: Metrics, poll_interval_s: float = 1.0
    ) -> None:
        self._path = path
        self._state = state
        self._metrics = metrics
        self._poll_interval_s = poll_interval_s
        self._digest = b""  # of the content last applied or rejected
        self._read = b""  # of the content the last poll read
        state.expect_source(SOURCE)

    def load_once(self) -> None:
        """Read the file now; raises `PoolFileError` if it is unusable (used at startup)."""
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            raise PoolFileError(f"cannot read {self._path}: {exc.strerror}") from exc
        self._apply(data, _digest(data))

    async def run(self) -> None:
        # Polling content (not inotify) survives the symlink swaps of a Kubernetes ConfigMap.
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                data = await asyncio.to_thread(self._path.read_bytes)
            except OSError as exc:
                if self._digest != b"unreadable":
                    log.error("pool file %s unreadable (%s); keeping the last good pools",
                              self._path, exc.strerror)
                    self._metrics.source_errors.labels(SOURCE, "unreadable").inc()
                    self._digest = b"unreadable"
                continue
            read, self._read = self._read, _digest(data)
            if read != self._read:
                continue  # changed since the last poll: may be mid-write, judge it next time
            try:
                self._apply(data, self._read)
            except PoolFileError as exc:
                log.error("pool file %s rejected, keeping the last good pools: %s",
                          self._path, exc)
                self._metrics.source_errors.labels(SOURCE, "invalid").inc()

    def _apply(self, data: bytes, digest: bytes) -> None:
        if digest == self._digest:
            return
        self._digest = digest
        pools = parse_pools(data.decode("utf-8", errors="replace"), origin=str(self._path))
        if self._state.set_pools(SOURCE, pools):
            log.info("pool file %s: %s", self._path, ", ".join(
                f"{p.name} ({len(p.replicas)} replicas)" for p in pools) or "no pools")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
