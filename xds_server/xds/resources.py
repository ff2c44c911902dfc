"""Resource builders: pools and weights in, Envoy protobuf messages out.

This and the server are the only places that know Envoy's wire format. Names are stable and
documented (README, "What Envoy receives"). Per pool `P`, shared by every Envoy:

- `P`: every replica (EDS); one locality per node weighted by the node's free capacity, so
  Envoy picks a node first and a replica within it second (vLLM's hybrid mode);
- `P/node/N`: the replicas on node N;
- `P/prefer/N`: an aggregate of `P/node/N` then `P`: node N while it has a healthy
  replica, the whole pool otherwise (health-based failover, never a 503 for an empty node);
- `P/pinned`: the same endpoints as `P` (EDS `service_name`), split into per-node subsets
  that a request's `x-hybridlb-node` header selects.

Per view (one Envoy's node) only the small route configuration differs: how much of each
pool's traffic goes to `P/prefer/N` versus `P`.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.common.v3 import common_pb2 as common_lb_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401 (Any type)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from xds_server.addresses import is_ip
from xds_server.model import Pool, Replica, ReplicaState, View, Weights
from xds_server.policy.views import PER_MILLE
from xds_server.settings import EnvoySettings
from xds_server.xds import upstream_tls
from xds_server.xds.lb_policies import EXTENSION_POLICIES, ORCA_FORMAT_HEADER, extension_policy

LISTENER_NAME = "hybridlb_http"
ROUTE_CONFIG_NAME = "hybridlb_routes"
#: The namespace Envoy's subset load balancer and the router's dynamic match read.
LB_NS = "envoy.lb"
#: The Gateway API Inference Extension's name for the picked endpoint (header and metadata).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
#: Our response header naming the endpoints the picker named (absent: the weights routed it).
PICKED_HEADER = "x-hybridlb-picked"
#: The protocol's report of the endpoint that served (`envoy.lb` metadata on the response).
SERVED_KEY = "x-gateway-destination-endpoint-served"
#: The protocol's subset hint: filter metadata namespace and key (a list of `ip:port`).
SUBSET_NS = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
#: vLLM's header that sends a request to one local DP rank of a hybrid-mode server.
RANK_HEADER = "x-data-parallel-rank"
#: gRPC metadata on the ext_proc stream naming the asking Envoy's node (the picker reads it).
PICKER_NODE_METADATA = "x-hybridlb-node"
EXTPROC_CLUSTER = "hybridlb_extproc"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster_name(pool: str) -> str:
    return pool


def local_cluster_name(pool: str, node: str) -> str:
    return f"{pool}/node/{node}"


def prefer_cluster_name(pool: str, node: str) -> str:
    return f"{pool}/prefer/{node}"


def pinned_cluster_name(pool: str) -> str:
    return f"{pool}/pinned"


def affinity_cluster_name(pool: str) -> str:
    return f"{pool}/affinity"


def pool_of_cluster(cluster: str, pools: Container[str]) -> str | None:
    """The pool whose cluster this is (any of the names above), or None for any other
    cluster (the bootstrap's xDS and admin clusters, the picker's, a departed pool's).
    Pool names may hold slashes (`Qwen/Qwen3-0.6B`); node names cannot."""
    if cluster in pools:
        return cluster
    head, _, last = cluster.rpartition("/")
    if last in ("pinned", "affinity") and head in pools:
        return head
    pool, _, kind = head.rpartition("/")
    if kind in ("node", "prefer") and last and pool in pools:
        return pool
    return None


@dataclass(frozen=True)
class PoolInput:
    """Everything the shared builders need to know about one pool."""

    pool: Pool
    weights: Weights


@dataclass(frozen=True)
class PoolRoute:
    """One pool's place in one view: the node its Envoy is on and the share kept there."""

    pool: str
    node: str = ""
    keep_per_mille: int = 0


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


def _honour_picks(cluster: cluster_pb2.Cluster, settings: EnvoySettings) -> None:
    """Send a request to the endpoint the picker named (header or `envoy.lb` metadata), and
    by the weights when it named none, or one that is not in the cluster (fail open)."""
    fallback = least_request_pb2.LeastRequest(
        locality_lb_config=common_lb_pb2.LocalityLbConfig(
            locality_weighted_lb_config=common_lb_pb2.LocalityLbConfig.LocalityWeightedLbConfig()
        )
    )
    if settings.least_request_choices != 2:  # Envoy's default, left unsaid
        fallback.choice_count.value = settings.least_request_choices
    policy = override_host_pb2.OverrideHost(
        override_host_sources=[
            override_host_pb2.OverrideHost.OverrideHostSource(header=DESTINATION_HEADER),
            override_host_pb2.OverrideHost.OverrideHostSource(
                metadata=metadata_pb2.MetadataKey(
                    key=LB_NS,
                    path=[metadata_pb2.MetadataKey.PathSegment(key=DESTINATION_HEADER)],
                )
            ),
        ],
        fallback_policy=cluster_pb2.LoadBalancingPolicy(
            policies=[
                cluster_pb2.LoadBalancingPolicy.Policy(
                    typed_extension_config=extension_pb2.TypedExtensionConfig(
                        name="envoy.load_balancing_policies.least_request",
                        typed_config=_any(fallback),
                    )
                )
            ]
        ),
    )
    cluster.ClearField("lb_policy")
    cluster.ClearField("least_request_lb_config")
    # Envoy refuses locality weighting in both places; the fallback policy carries it.
    cluster.common_lb_config.ClearField("locality_weighted_lb_config")
    cluster.load_balancing_policy.CopyFrom(
        cluster_pb2.LoadBalancingPolicy(
            policies=[
                cluster_pb2.LoadBalancingPolicy.Policy(
                    typed_extension_config=extension_pb2.TypedExtensionConfig(
                        name="envoy.load_balancing_policies.override_host",
                        typed_config=_any(policy),
                    )
                )
            ]
        )
    )


def _affinity_cluster(pool: str, settings: EnvoySettings) -> cluster_pb2.Cluster:
    """Bounded-load consistent hashing on the session header over the pool's endpoints:
    a session keeps its replica (and its KV cache) while that replica stays within
    `hash_balance_factor` percent of the mean load."""
    cluster = _eds_cluster(affinity_cluster_name(pool), settings, service_name=cluster_name(pool))
    cluster.lb_policy = cluster_pb2.Cluster.MAGLEV
    cluster.common_lb_config.consistent_hashing_lb_config.hash_balance_factor.value = (
        settings.hash_balance_factor
    )
    return cluster


@functools.lru_cache(maxsize=64)
def extproc_cluster(settings: EnvoySettings) -> cluster_pb2.Cluster:
    """Where Envoy reaches the endpoint picker (HTTP/2 for gRPC). Memoized like the other
    clusters: every view's build asks for it, and one object is encoded once."""
    host, _, port = settings.extproc_address.rpartition(":")
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster = cluster_pb2.Cluster(
        name=EXTPROC_CLUSTER,
        type=cluster_pb2.Cluster.STATIC if is_ip(host) else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=_duration(0.25),
        typed_extension_protocol_options={_HTTP_OPTIONS: _any(options)},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=EXTPROC_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
                        address=host.strip("[]"), port_value=int(port)))))])],
        ),
    )
    if settings.extproc_tls.enabled:
        cluster.transport_socket.CopyFrom(json_format.ParseDict(
            upstream_tls.transport_socket(settings.extproc_tls, [host.strip("[]")]),
            base_pb2.TransportSocket()))
    return cluster


def _eds_cluster(
    name: str, settings: EnvoySettings, *, service_name: str = "", locality_weighted: bool = False
) -> cluster_pb2.Cluster:
    common = cluster_pb2.Cluster.CommonLbConfig(
        # Panic mode would route to DRAINING hosts; with 0 it never engages.
        healthy_panic_threshold=percent_pb2.Percent(value=0.0),
    )
    if locality_weighted:
        common.locality_weighted_lb_config.SetInParent()
    cluster = cluster_pb2.Cluster(
        name=name,
        alt_stat_name=stat_name(name),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ads(), service_name=service_name
        ),
        connect_timeout=_duration(settings.connect_timeout_s),
        # Least-request divides each weight by this Envoy's in-flight count: the weights carry
        # slow, global load, the in-flight count absorbs bursts between pushes.
        lb_policy=(
            cluster_pb2.Cluster.ROUND_ROBIN
            if settings.lb_policy == "round_robin"
            else cluster_pb2.Cluster.LEAST_REQUEST
        ),
        common_lb_config=common,
        outlier_detection=_outlier_detection(settings),
    )
    if settings.lb_policy == "least_request" and settings.least_request_choices != 2:
        cluster.least_request_lb_config.choice_count.value = settings.least_request_choices
    return cluster


def _balanced(cluster: cluster_pb2.Cluster, settings: EnvoySettings) -> cluster_pb2.Cluster:
    """Envoy's own load-aware balancer (lb_policies.py) on a cluster that requests are
    balanced over (not the pinned subsets or the session hash); it weighs localities
    itself, and Envoy refuses locality weighting beside it."""
    if settings.lb_policy in EXTENSION_POLICIES:
        cluster.ClearField("lb_policy")
        cluster.common_lb_config.ClearField("locality_weighted_lb_config")
        cluster.load_balancing_policy.CopyFrom(extension_policy(settings.lb_policy))
    return cluster


def _outlier_detection(settings: EnvoySettings) -> outlier_detection_pb2.OutlierDetection | None:
    """Eject a replica after failures Envoy sees itself (a dead or hung process), not after
    the engine's own 500s; at most half a pool, so an outage cannot empty it."""
    if settings.outlier_consecutive_failures <= 0:
        return None
    return outlier_detection_pb2.OutlierDetection(
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(
            value=settings.outlier_consecutive_failures),
        enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
        enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=0),
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        base_ejection_time=_duration(settings.outlier_ejection_s),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
    )


def _retry_policy(settings: EnvoySettings) -> route_components_pb2.RetryPolicy:
    """Retry only what never reached a replica (a generation is not idempotent and may have
    streamed already), on another host; plus the optional per-try idle timeout."""
    policy = route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset-before-request",
        num_retries=wrappers_pb2.UInt32Value(value=2),
        retry_host_predicate=[route_components_pb2.RetryPolicy.RetryHostPredicate(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=3,
    )
    if settings.upstream_idle_timeout_s > 0:
        policy.per_try_idle_timeout.CopyFrom(_duration(settings.upstream_idle_timeout_s))
    return policy


def stat_name(cluster: str) -> str:
    """Envoy splits stat names on dots (a pool `Qwen/Qwen3-0.6B` or an EKS node name
    `ip-10-0-1-5.ec2.internal` would be cut into tags); the stats name keeps them whole."""
    return cluster.replace(".", "_")


def _prefer_cluster(pool: str, node: str) -> cluster_pb2.Cluster:
    config = aggregate_pb2.ClusterConfig(
        clusters=[local_cluster_name(pool, node), cluster_name(pool)]
    )
    return cluster_pb2.Cluster(
        name=prefer_cluster_name(pool, node),
        alt_stat_name=stat_name(prefer_cluster_name(pool, node)),
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate", typed_config=_any(config)
        ),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=_duration(1.0),
    )


def _pinned_cluster(pool: str, settings: EnvoySettings) -> cluster_pb2.Cluster:
    cluster = _eds_cluster(pinned_cluster_name(pool), settings, service_name=cluster_name(pool))
    cluster.lb_subset_config.CopyFrom(
        cluster_pb2.Cluster.LbSubsetConfig(
            # A pinned node without a ready replica fails (503), it never goes elsewhere.
            fallback_policy=cluster_pb2.Cluster.LbSubsetConfig.NO_FALLBACK,
            subset_selectors=[
                cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector(keys=["node"])
            ],
        )
    )
    return cluster


# Builders below are memoized on their (immutable) inputs: a 10,000-replica pool would
# otherwise rebuild 20,000 endpoint messages in Python on every weight change, when only
# the nodes whose weights moved differ. Callers never mutate what these return. The bounds
# keep a churning fleet's memory flat: a locality is only worth keeping from one snapshot
# to the next, so its cache holds a few thousand (two snapshots of ~2,000 nodes).


def _lb_endpoint(replica: Replica, weight: int) -> endpoint_components_pb2.LbEndpoint:
    # The metadata Structs are the costly part; copying a finished message is C-fast.
    endpoint = endpoint_components_pb2.LbEndpoint()
    endpoint.CopyFrom(_lb_endpoint_base(replica))
    # Envoy takes no weight below 1; a draining host's status keeps it idle.
    endpoint.load_balancing_weight.value = max(1, weight)
    return endpoint


@functools.lru_cache(maxsize=1 << 15)
def _lb_endpoint_base(replica: Replica) -> endpoint_components_pb2.LbEndpoint:
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
        # Only what Envoy uses: the node, for the pinned cluster's subsets. (The locality
        # says the node too, but subsets match endpoint metadata.) Every byte here is sent
        # to every Envoy for every replica on every weight change.
        metadata=base_pb2.Metadata(
            filter_metadata={
                LB_NS: struct_pb2.Struct(
                    fields={"node": struct_pb2.Value(string_value=replica.node)}
                ),
            }
        ),
    )


Members = tuple[tuple[Replica, int], ...]


@functools.lru_cache(maxsize=4096)
def _locality(
    zone: str, node: str, members: Members, weight: int
) -> endpoint_components_pb2.LocalityLbEndpoints:
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(zone=zone, sub_zone=node),
        lb_endpoints=[_lb_endpoint(r, w) for r, w in members],
        load_balancing_weight=wrappers_pb2.UInt32Value(value=max(1, weight)),
    )


def _localities(
    replicas: Iterable[Replica], weights: Weights
) -> dict[str, endpoint_components_pb2.LocalityLbEndpoints]:
    """One locality per node (zone, sub_zone=node), weighted by the node's free capacity."""
    by_node: dict[tuple[str, str], list[tuple[Replica, int]]] = {}
    for r in replicas:
        by_node.setdefault((r.zone, r.node), []).append((r, weights.endpoints.get(r.address, 1)))
    return {
        node: _locality(zone, node, tuple(members), weights.localities.get(node, 1))
        for (zone, node), members in sorted(by_node.items())
    }


def build_endpoints(pools: Sequence[PoolInput]) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """Every pool's endpoint assignments, the same for every Envoy: the whole pool, and each
    node's part (an Envoy subscribes only to the ones its clusters name)."""
    assignments: list[endpoint_pb2.ClusterLoadAssignment] = []
    for item in pools:
        pool = item.pool
        localities = _localities(pool.replicas, item.weights)
        assignments.append(endpoint_pb2.ClusterLoadAssignment(
            cluster_name=cluster_name(pool.name), endpoints=list(localities.values())))
        for node in item.pool.nodes:
            assignments.append(endpoint_pb2.ClusterLoadAssignment(
                cluster_name=local_cluster_name(pool.name, node),
                endpoints=[localities[node]] if node in localities else []))
    return assignments


def build_clusters(
    pools: Sequence[PoolInput], node: str, settings: EnvoySettings
) -> list[cluster_pb2.Cluster]:
    """One Envoy's clusters: every pool's, plus its own node's local ones. An Envoy never
    routes to another node's local cluster, so it neither holds nor updates them."""
    clusters: list[cluster_pb2.Cluster] = []
    if settings.extproc_address:
        clusters.append(extproc_cluster(settings))
    for item in pools:
        clusters.extend(_pool_clusters(item.pool.name, settings))
        if node and node in item.pool.nodes:
            clusters.extend(_node_clusters(item.pool.name, node, settings))
    return clusters


@functools.lru_cache(maxsize=1024)
def _pool_clusters(pool: str, settings: EnvoySettings) -> tuple[cluster_pb2.Cluster, ...]:
    everywhere = _balanced(_eds_cluster(cluster_name(pool), settings, locality_weighted=True),
                           settings)
    if settings.extproc_address:
        _honour_picks(everywhere, settings)
    return everywhere, _pinned_cluster(pool, settings), _affinity_cluster(pool, settings)


@functools.lru_cache(maxsize=8192)
def _node_clusters(
    pool: str, node: str, settings: EnvoySettings
) -> tuple[cluster_pb2.Cluster, ...]:
    return (_balanced(_eds_cluster(local_cluster_name(pool, node), settings), settings),
            _prefer_cluster(pool, node))


def _route_action(route: PoolRoute, settings: EnvoySettings) -> route_components_pb2.RouteAction:
    timeout = _duration(settings.route_timeout_s)
    everywhere = cluster_name(route.pool)
    keep = route.keep_per_mille if route.node else 0
    if keep <= 0:
        return route_components_pb2.RouteAction(cluster=everywhere, timeout=timeout)
    local = prefer_cluster_name(route.pool, route.node)
    if keep >= PER_MILLE:
        return route_components_pb2.RouteAction(cluster=local, timeout=timeout)
    return route_components_pb2.RouteAction(
        weighted_clusters=route_components_pb2.WeightedCluster(
            clusters=[
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=local, weight=wrappers_pb2.UInt32Value(value=keep)
                ),
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=everywhere, weight=wrappers_pb2.UInt32Value(value=PER_MILLE - keep)
                ),
            ]
        ),
        timeout=timeout,
    )


def _routes_for(
    route: PoolRoute, settings: EnvoySettings, *, model: str | None
) -> list[route_components_pb2.Route]:
    """One pool's routes for one `x-model` value, first match wins: a pinned node, the
    picker's choice, a session's replica, then the view's local-first split."""
    headers = (
        [route_components_pb2.HeaderMatcher(
            name=settings.model_header, string_match=string_pb2.StringMatcher(exact=model))]
        if model is not None
        else []
    )
    pinned = route_components_pb2.HeaderMatcher(name=settings.node_header, present_match=True)
    label = f"model:{model}" if model is not None else f"default:{route.pool}"
    timeout = _duration(settings.route_timeout_s)
    picked: list[route_components_pb2.Route] = []
    if settings.extproc_address and model is not None:
        picked.append(route_components_pb2.Route(
            name=f"{label}:picked",
            match=route_components_pb2.RouteMatch(prefix="/", headers=[
                *headers,
                route_components_pb2.HeaderMatcher(name=DESTINATION_HEADER, present_match=True),
            ]),
            route=route_components_pb2.RouteAction(cluster=cluster_name(route.pool),
                                                   timeout=timeout),
            # Say which endpoint was picked, so a client can see whether Envoy honoured it.
            response_headers_to_add=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=PICKED_HEADER,
                                            value=f"%REQ({DESTINATION_HEADER})%"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )],
        ))
    session = route_components_pb2.Route(
        name=f"{label}:session",
        match=route_components_pb2.RouteMatch(prefix="/", headers=[
            *headers,
            route_components_pb2.HeaderMatcher(name=settings.session_header, present_match=True),
        ]),
        route=route_components_pb2.RouteAction(
            cluster=affinity_cluster_name(route.pool),
            timeout=timeout,
            hash_policy=[route_components_pb2.RouteAction.HashPolicy(
                header=route_components_pb2.RouteAction.HashPolicy.Header(
                    header_name=settings.session_header))],
        ),
    )
    return [
        route_components_pb2.Route(
            name=f"{label}:pinned",
            match=route_components_pb2.RouteMatch(prefix="/", headers=[*headers, pinned]),
            route=route_components_pb2.RouteAction(
                cluster=pinned_cluster_name(route.pool),
                timeout=timeout,
            ),
        ),
        *picked,
        session,
        route_components_pb2.Route(
            name=f"{label}:keep={route.keep_per_mille if route.node else 0}",
            match=route_components_pb2.RouteMatch(prefix="/", headers=headers),
            route=_route_action(route, settings),
        ),
    ]


@functools.lru_cache(maxsize=8192)
def build_route_config(
    routes: tuple[PoolRoute, ...], settings: EnvoySettings
) -> route_pb2.RouteConfiguration:
    """`x-model: NAME` picks the pool (anything else: the first pool); `x-hybridlb-node` pins
    a node; otherwise the view's keep share decides between its node and the whole pool.

    Memoized: views with the same keep shares share one message, and so one encoding."""
    entries: list[route_components_pb2.Route] = []
    for route in routes:
        entries.extend(_routes_for(route, settings, model=route.pool))
    if routes:
        entries.extend(_routes_for(routes[0], settings, model=None))
    else:
        entries.append(
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
        virtual_hosts=[
            route_components_pb2.VirtualHost(name="vllm", domains=["*"], routes=entries,
                                             retry_policy=_retry_policy(settings),
                                             request_headers_to_add=_orca_request(settings))
        ],
    )


def _strip_filter() -> hcm_pb2.HttpFilter:
    """First in the chain: the endpoint headers a client sends are dropped, so only the picker
    names a replica (override_host reads the header), also when the picker passes a request
    through, times out or is down."""
    config = header_mutation_pb2.HeaderMutation(mutations=header_mutation_pb2.Mutations(
        request_mutations=[mutation_rules_pb2.HeaderMutation(remove=name)
                           for name in (DESTINATION_HEADER, SERVED_KEY, SUBSET_KEY)]))
    return hcm_pb2.HttpFilter(name="envoy.filters.http.header_mutation",
                              typed_config=_any(config))


def _orca_request(settings: EnvoySettings) -> list[base_pb2.HeaderValueOption]:
    """Ask vLLM for its ORCA report where Envoy's balancer reads one (vLLM sends none
    unless asked, and Envoy does not ask by itself)."""
    if settings.lb_policy != "orca_wrr":
        return []
    name, value = ORCA_FORMAT_HEADER
    return [base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]


def _pin_filter(settings: EnvoySettings) -> hcm_pb2.HttpFilter:
    """Copies `x-hybridlb-node` into the `envoy.lb` metadata the pinned subsets match on."""
    rule = header_to_metadata_pb2.Config.Rule(
        header=settings.node_header,
        on_header_present=header_to_metadata_pb2.Config.KeyValuePair(
            metadata_namespace=LB_NS, key="node", type=header_to_metadata_pb2.Config.STRING
        ),
    )
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.header_to_metadata",
        typed_config=_any(header_to_metadata_pb2.Config(request_rules=[rule])),
    )


def _extproc_filter(view: View, settings: EnvoySettings) -> hcm_pb2.HttpFilter:
    """The endpoint picker, asked with the headers and the buffered body; it fails open.

    BUFFERED_PARTIAL, not BUFFERED: a body over Envoy's buffer limit goes on in part instead
    of failing with 413; not FULL_DUPLEX_STREAMED: that mode cannot fail open.
    """
    config = ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EXTPROC_CLUSTER),
            # The picker prefers replicas on the asking Envoy's node.
            initial_metadata=[base_pb2.HeaderValue(key=PICKER_NODE_METADATA, value=view.node)],
        ),
        failure_mode_allow=True,
        message_timeout=_duration(settings.extproc_timeout_s),
        # The picker asks for BUFFERED when the body is known to fit Envoy's buffer.
        allow_mode_override=True,
        processing_mode=processing_mode_pb2.ProcessingMode(
            request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
            response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
            request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL,
            response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
            request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
            # The picker counts a picked request out of its replica's load when the request's
            # stream closes, which must be at the response's end: Envoy 1.40 holds it that
            # long anyway, and asking for the trailers holds it where an Envoy would close it
            # at the response headers when the response path asks for nothing.
            response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND,
        ),
    )
    return hcm_pb2.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=_any(config))


def _pin_failure_reply(settings: EnvoySettings) -> hcm_pb2.LocalReplyConfig:
    """A pinned node with no ready replica gets a 503 that says so."""
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    and_filter=accesslog_pb2.AndFilter(
                        filters=[
                            accesslog_pb2.AccessLogFilter(
                                header_filter=accesslog_pb2.HeaderFilter(
                                    header=route_components_pb2.HeaderMatcher(
                                        name=settings.node_header, present_match=True
                                    )
                                )
                            ),
                            accesslog_pb2.AccessLogFilter(
                                response_flag_filter=accesslog_pb2.ResponseFlagFilter(
                                    flags=["UH", "NC"]
                                )
                            ),
                        ]
                    )
                ),
                status_code=wrappers_pb2.UInt32Value(value=503),
                body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                    text_format_source=base_pb2.DataSource(
                        inline_string=f"hybridlb: node %REQ({settings.node_header})% has no "
                        "ready replica of this model\n"
                    )
                ),
            )
        ]
    )


@functools.lru_cache(maxsize=8192)
def build_listener(view: View, settings: EnvoySettings) -> listener_pb2.Listener:
    """A view's listener; memoized, as it changes only with the view and the settings."""
    port = view.listener_port or settings.listener_port
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="hybridlb",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_CONFIG_NAME),
        http_filters=[
            _strip_filter(),
            _pin_filter(settings),
            *([_extproc_filter(view, settings)] if settings.extproc_address else []),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            ),
        ],
        local_reply_config=_pin_failure_reply(settings),
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
