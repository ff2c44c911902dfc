"""The xDS type URLs this server speaks, in the order a push must follow.

Clusters before their endpoints, listeners before their routes: Envoy warms a cluster until
its ClusterLoadAssignment arrives and a listener until its RouteConfiguration does.
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

#: Types whose SotW responses must carry every resource (the rest may carry only changes).
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER})

SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}


def short(type_url: str) -> str:
    return SHORT.get(type_url, type_url.rsplit(".", 1)[-1])
