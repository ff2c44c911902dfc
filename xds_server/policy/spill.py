"""How much of each node Envoy's traffic to keep on its node, from what enters the Envoys.

Envoys report what they send upstream (LRS, xds/lrs.py), so the control plane knows each
node Envoy's ingress. Every node can then be given its fair part of the pool's traffic,
in proportion to its effective capacity (ranks times relative decode speed), which is where
every replica is equally full and so waits alike:

    fair(n) = total ingress * capacity(n) / pool capacity
    kept(n) = min(ingress(n), fair(n))        keep(n) = kept(n) / ingress(n)
    fill(n) = (fair(n) - kept(n)) / fair(n)

A node whose Envoy brings it less than its part keeps everything; one whose Envoy brings
more keeps just its part and spills the rest to the whole-pool cluster, whose locality
weights (capacity times `fill`) send that spill, and the gateways' traffic, to the nodes
still short of their part: what leaves one node is exactly what the others lack. This is
feed-forward: it follows an ingress that moves within a report or two, where a loop on the
queues lags by the requests' service times. The queues still trim it (weights.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Spill:
    """node -> share of its own Envoy's requests kept on it (`keep`), and share of its fair
    part that must come through the whole-pool cluster (`fill`), both 0..1."""

    keep: dict[str, float]
    fill: dict[str, float]


def plan_spill(ingress: Mapping[str, float], capacity: Mapping[str, float]) -> Spill | None:
    """`ingress`: requests per second entering each Envoy, by its node ("" or a node with
    no ready replica: a gateway's, which only the whole-pool cluster serves); `capacity`:
    each node's effective capacity. None when nothing enters or nothing can serve."""
    total = sum(max(0.0, v) for v in ingress.values())
    room = sum(max(0.0, c) for c in capacity.values())
    if total <= 0 or room <= 0:
        return None
    keep: dict[str, float] = {}
    fill: dict[str, float] = {}
    for node, c in capacity.items():
        fair = total * max(0.0, c) / room
        arriving = max(0.0, ingress.get(node, 0.0))
        kept = min(arriving, fair)
        keep[node] = kept / arriving if arriving > 0 else 1.0
        fill[node] = (fair - kept) / fair if fair > 0 else 0.0
    return Spill(keep=keep, fill=fill)
