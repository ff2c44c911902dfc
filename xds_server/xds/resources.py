"""Resource builders: pools and weights in, Envoy protobuf messages out.

This and the server are the only places that know Envoy's wire format. Names are stable and
documented: the global cluster of a pool is `POOL`, the cluster of its replicas on one node
is `POOL/node/NODE`, the listener is `hybridlb_http` and its routes `hybridlb_routes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from xds_server.model import Pool, Replica, ReplicaState, View, Weights
from xds_server.settings import EnvoySettings

LISTENER_NAME = "hybridlb_http"
ROUTE_CONFIG_NAME = "hybridlb_routes"
#: Endpoint metadata namespace (also what `%UPSTREAM_METADATA(hybridlb:...)%` reads).
METADATA_NS = "hybridlb"


def cluster_name(pool: str) -> str:
    return pool


def local_cluster_name(pool: str, node: str) -> str:
    return f"{pool}/node/{node}"


@dataclass(frozen=True)
class PoolInput:
    """Everything the builders need to know about one pool."""

    pool: Pool
    weights: Weights


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def build_cluster(name: str, settings: EnvoySettings) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(settings.connect_timeout_s),
        # Least-request divides each weight by this Envoy's in-flight count: the weights carry
        # slow, global load, the in-flight count absorbs bursts between pushes.
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            # Panic mode would route to DRAINING hosts; with 0 it never engages.
            healthy_panic_threshold=percent_pb2.Percent(value=0.0),
        ),
    )


def _lb_endpoint(replica: Replica, weight: int) -> endpoint_components_pb2.LbEndpoint:
    draining = replica.state is ReplicaState.DRAINING
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=replica.host, port_value=replica.port
                )
            ),
        ),
        health_status=health_check_pb2.DRAINING if draining else health_check_pb2.HEALTHY,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        metadata=base_pb2.Metadata(
            filter_metadata={
                METADATA_NS: struct_pb2.Struct(
                    fields={
                        "node": struct_pb2.Value(string_value=replica.node),
                        "capacity": struct_pb2.Value(number_value=replica.capacity),
                    }
                )
            }
        ),
    )


def build_load_assignment(
    name: str, replicas: Iterable[Replica], weights: Weights
) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per node (zone, sub_zone=node): the two levels of hybrid mode."""
    by_node: dict[tuple[str, str], list[Replica]] = {}
    for replica in replicas:
        by_node.setdefault((replica.zone, replica.node), []).append(replica)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=zone, sub_zone=node),
                lb_endpoints=[
                    # Envoy takes no weight below 1; a draining host's status keeps it idle.
                    _lb_endpoint(r, max(1, weights.endpoints.get(r.address, 1)))
                    for r in members
                ],
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=max(1, weights.localities.get(node, 1))
                ),
            )
            for (zone, node), members in sorted(by_node.items())
        ],
    )


def build_clusters_and_endpoints(
    pools: Sequence[PoolInput], settings: EnvoySettings
) -> tuple[list[cluster_pb2.Cluster], list[endpoint_pb2.ClusterLoadAssignment]]:
    """Per pool: the global cluster and one cluster per node, each with its endpoints."""
    clusters: list[cluster_pb2.Cluster] = []
    assignments: list[endpoint_pb2.ClusterLoadAssignment] = []
    for item in pools:
        pool = item.pool
        name = cluster_name(pool.name)
        clusters.append(build_cluster(name, settings))
        assignments.append(build_load_assignment(name, pool.replicas, item.weights))
        for node in pool.nodes:
            local = local_cluster_name(pool.name, node)
            clusters.append(build_cluster(local, settings))
            assignments.append(
                build_load_assignment(
                    local, (r for r in pool.replicas if r.node == node), item.weights
                )
            )
    return clusters, assignments


def build_route_config(
    pools: Sequence[PoolInput], settings: EnvoySettings
) -> route_pb2.RouteConfiguration:
    """`x-model: NAME` picks the pool; anything else goes to the first pool."""
    timeout = _duration(settings.route_timeout_s)
    routes = [
        route_components_pb2.Route(
            name=f"model:{item.pool.name}",
            match=route_components_pb2.RouteMatch(
                prefix="/",
                headers=[
                    route_components_pb2.HeaderMatcher(
                        name=settings.model_header,
                        string_match=string_pb2.StringMatcher(exact=item.pool.name),
                    )
                ],
            ),
            route=route_components_pb2.RouteAction(
                cluster=cluster_name(item.pool.name), timeout=timeout
            ),
        )
        for item in pools
    ]
    if pools:
        routes.append(
            route_components_pb2.Route(
                name="default",
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=cluster_name(pools[0].pool.name), timeout=timeout
                ),
            )
        )
    else:
        routes.append(
            route_components_pb2.Route(
                name="no-pools",
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=503,
                    body=base_pb2.DataSource(inline_string="hybridlb: no pool is configured\n"),
                ),
            )
        )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[route_components_pb2.VirtualHost(name="vllm", domains=["*"], routes=routes)],
    )


def build_listener(view: View, settings: EnvoySettings) -> listener_pb2.Listener:
    port = view.listener_port or settings.listener_port
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="hybridlb",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=settings.listener_host, port_value=port
            )
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(manager),
                    )
                ]
            )
        ],
    )
