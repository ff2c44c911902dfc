"""Is a view's snapshot whole? Every cluster a route or an aggregate cluster names exists,
and every EDS cluster has its endpoint assignment.

An Envoy given a route to a missing cluster answers 503 ("cluster not found"); an EDS cluster
without an assignment stays warming. A snapshot that fails is refused before any stream sees
it (go-control-plane's `Snapshot.Consistent()`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2

#: Cap on the problems one check reports: the first few say what is wrong.
MAX_PROBLEMS = 5


def assignments_needed(clusters: Iterable[cluster_pb2.Cluster]) -> frozenset[str]:
    """The endpoint assignments these clusters' EDS subscriptions name."""
    return frozenset(c.eds_cluster_config.service_name or c.name for c in clusters
                     if c.type == cluster_pb2.Cluster.EDS)


def problems(
    clusters: Iterable[cluster_pb2.Cluster],
    assignments: Collection[str],
    routes: Iterable[route_pb2.RouteConfiguration],
) -> list[str]:
    """What is missing, empty if nothing."""
    found: list[str] = []
    names: set[str] = set()
    wanted: list[tuple[str, str]] = []  # (who names it, cluster name)
    for cluster in clusters:
        names.add(cluster.name)
        if cluster.type == cluster_pb2.Cluster.EDS:
            service = cluster.eds_cluster_config.service_name or cluster.name
            if service not in assignments:
                found.append(f"EDS cluster {cluster.name} has no assignment {service}")
        elif cluster.HasField("cluster_type"):
            config = aggregate_pb2.ClusterConfig()
            if cluster.cluster_type.typed_config.Unpack(config):
                wanted.extend((f"aggregate cluster {cluster.name}", c) for c in config.clusters)
    for config in routes:
        for host in config.virtual_hosts:
            for route in host.routes:
                action = route.route
                if action.cluster:
                    wanted.append((f"route {route.name}", action.cluster))
                wanted.extend(
                    (f"route {route.name}", c.name) for c in action.weighted_clusters.clusters
                )
    found.extend(f"{who} names missing cluster {name}" for who, name in wanted
                 if name not in names)
    return found[:MAX_PROBLEMS]
