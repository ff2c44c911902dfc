"""Weights from what is known of each replica; pure functions, no I/O.

Today the weight is the replica's capacity (its DP ranks); load-aware weights build on this.
"""

from __future__ import annotations

from xds_server.model import Pool, ReplicaState, Weights

#: Envoy requires every endpoint weight to be at least 1.
MIN_WEIGHT = 1


def capacity_weights(pool: Pool) -> Weights:
    """Endpoint weight = capacity; node (locality) weight = the sum over its ready replicas."""
    endpoints = {r.address: max(MIN_WEIGHT, r.capacity) for r in pool.replicas}
    localities: dict[str, int] = {}
    for r in pool.replicas:
        if r.state is ReplicaState.READY:
            localities[r.node] = localities.get(r.node, 0) + endpoints[r.address]
    for node in pool.nodes:
        localities.setdefault(node, MIN_WEIGHT)
    return Weights(endpoints=endpoints, localities=localities)
