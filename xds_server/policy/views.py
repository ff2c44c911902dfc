"""What each Envoy's view keeps on its own node: pure functions, no I/O.

An Envoy on a node with ready replicas of a pool sends `keep` of that pool's requests to
its node (falling back to the whole pool when the node has no healthy replica) and the
rest to the whole pool, where the weights steer them to the least-loaded replicas. The
spill-over grows smoothly with the node's utilization `u` (from the smoothed weights):

    floor = max(room_threshold, u_rest)        u_rest: utilization of the pool elsewhere
    spill = clamp((u - floor) / (1 - floor), 0, 1)     (0 while u <= floor)
    keep  = 1 - spill, in steps of `keep_step`

so a node keeps everything while it has room, or while the rest of the pool is no better
off, and hands over its excess in proportion to how far it is past that point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xds_server.options import option

#: Keep shares are integers out of this total (Envoy's weighted clusters take integers).
PER_MILLE = 1000


@dataclass(frozen=True)
class HybridSettings:
    """Tunables of node-local-first routing; each is a flag and a config key of `serve`."""

    #: Utilization up to which a node "has room" and keeps all its Envoy's requests.
    room_threshold: float = option(0.7, "utilization up to which a node keeps all its Envoy's "
                                   "requests; lower spills earlier (flatter queues, more "
                                   "cross-node hops)", flag="room-threshold")
    #: So that small load jitter pushes no routes.
    keep_step: int = option(50, "keep shares move in steps of this many per mille (fewer route "
                            "pushes)", flag="keep-step")
    local_first: bool = option(True, "true: an Envoy on a node prefers that node's replicas "
                               "while they have room; false: every Envoy balances over the "
                               "whole pool", flag="local-first")

    def __post_init__(self) -> None:
        if not 0 <= self.room_threshold < 1:
            raise ValueError("room_threshold must be in [0, 1)")
        if not 1 <= self.keep_step <= PER_MILLE:
            raise ValueError("keep_step must be in 1..1000")


def keep_shares(
    nodes: Iterable[str],
    node_utilization: Mapping[str, float],
    capacity: Mapping[str, int],
    settings: HybridSettings,
    node_keep: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Per mille of a pool's requests an Envoy on each node keeps there (0: none ready).

    `node_keep`, where the weight policy decided the shares itself (its persistent model),
    is only quantized to `keep_step`; else the rule above decides from utilization. The
    pool's totals are summed once and each node's own part taken out, so a fleet of N nodes
    costs O(N), not O(N²).
    """
    if node_keep:
        step = settings.keep_step
        return {
            node: round(node_keep[node] * PER_MILLE / step) * step
            if settings.local_first and node in node_keep else 0
            for node in nodes
        }
    ready = {n: c for n, c in capacity.items() if n in node_utilization}
    total_capacity = sum(ready.values())
    total_used = sum(node_utilization[n] * c for n, c in ready.items())
    shares: dict[str, int] = {}
    for node in nodes:
        if not settings.local_first or node not in node_utilization:
            shares[node] = 0
            continue
        u = node_utilization[node]
        own = ready.get(node, 0)
        rest_capacity = total_capacity - own
        # Nowhere else to go: the rest of the pool counts as full.
        u_rest = (total_used - u * own) / rest_capacity if rest_capacity > 0 else 1.0
        floor = max(settings.room_threshold, u_rest)
        spill = 0.0 if u <= floor or floor >= 1 else min(1.0, (u - floor) / (1 - floor))
        step = settings.keep_step
        shares[node] = round((1.0 - spill) * PER_MILLE / step) * step
    return shares
