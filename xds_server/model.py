"""The project's vocabulary as plain data: no Kubernetes objects, no protobuf.

Sources produce `Pool`s of `Replica`s and `Load`s; the policy turns them into `Weights`;
the xDS builders turn those into Envoy resources. Every boundary between those stages
is one of these frozen dataclasses.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field


class ReplicaState(enum.Enum):
    """Lifecycle of a replica as the balancer sees it."""

    READY = "ready"
    # Terminating: Envoy sends no new requests, in-flight ones finish (EDS DRAINING).
    DRAINING = "draining"


@dataclass(frozen=True, order=True)
class Replica:
    """One routable vLLM HTTP endpoint.

    In external-LB mode a replica is one DP rank; in hybrid mode it is a node's API server
    fronting `capacity` ranks.
    """

    host: str
    port: int
    node: str
    capacity: int = 1
    state: ReplicaState = ReplicaState.READY
    zone: str = ""
    # Where it came from (a pod name, a file): for logs and /debug/state only.
    origin: str = ""
    #: Port of its Prometheus /metrics; 0 means the serving port (vLLM's default).
    metrics_port: int = 0
    metrics_path: str = "/metrics"
    #: First global DP rank it fronts (vLLM's `engine` label): --data-parallel-start-rank in
    #: hybrid mode, --data-parallel-rank in external-LB mode.
    dp_rank: int = 0
    #: Requests one rank runs at once by the server's own `--max-num-seqs` (its pod's args or
    #: metadata, the pools file); None where nothing says it: the room is then learnt from
    #: what vLLM reports (policy/load.py).
    max_num_seqs: int | None = None

    @functools.cached_property
    def address(self) -> str:
        """`IP:PORT`, or `[IPv6]:PORT`: the replica's identity within a pool."""
        # Cached: the policy and the builders ask ~18 times per replica and update.
        return _join(self.host, self.port)

    @property
    def metrics_address(self) -> str:
        """Where its metrics are scraped, as Prometheus' `instance` label spells it."""
        return _join(self.host, self.metrics_port or self.port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Pool:
    """The replicas that serve one model: one Envoy cluster family."""

    name: str
    replicas: tuple[Replica, ...] = ()

    @functools.cached_property
    def nodes(self) -> tuple[str, ...]:
        # Cached: every view's build asks, and at 10,000 replicas the set is not free.
        return tuple(sorted({r.node for r in self.replicas}))


@dataclass(frozen=True)
class RankLoad:
    """One engine's reading; `engine` is vLLM's label: the global DP rank."""

    engine: str
    running: float
    waiting: float
    kv_cache_usage: float | None = None


@dataclass(frozen=True)
class Load:
    """A replica's latest load reading and when it was read (seconds, wall clock)."""

    running: float
    waiting: float
    kv_cache_usage: float | None = None
    read_at: float = 0.0
    #: Per-engine readings, where the server reports its ranks (hybrid mode).
    ranks: tuple[RankLoad, ...] = ()
    #: Output tokens per second per running request over the interval before `read_at`
    #: (1/TPOT: what a slow GPU shows at once); None when unknown (first reading, idle,
    #: a restarted counter).
    decode_speed: float | None = None


@dataclass(frozen=True)
class IngressReport:
    """One Envoy's load report: requests per second it sent to each pool's clusters over
    its last reporting interval, which ended at `at` (seconds, wall clock). `node` is the
    Envoy's node ("" for one on no GPU node, a central gateway)."""

    node: str
    rates: dict[str, float]
    at: float
    interval_s: float


@dataclass(frozen=True)
class Weights:
    """What Envoy splits traffic by: per replica address, and per node (locality)."""

    endpoints: dict[str, int] = field(default_factory=dict)
    localities: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class View:
    """Which Envoy a set of resources is for: its node and, if it set one, its listener port.

    `node` is empty for an Envoy on no GPU node (a central gateway).
    """

    node: str = ""
    listener_port: int | None = None
