"""Print an Envoy bootstrap (YAML) that connects to the control plane over ADS.

The Envoy identifies its node in its node metadata (`hybridlb.node`); a listener port given
here travels there too and overrides the server's, so several Envoys can share one machine.
In a cluster, run this in an init container with the node name from the downward API.

Envoy's admin stays on localhost: it can change and stop the proxy (`/quitquitquit`,
`/runtime_modify`, `/drain_listeners`) and has no authentication. `--stats-port` adds a static
listener that forwards only `GET /stats/prometheus` (for Prometheus) and `GET /ready` (for the
kubelet's probes) to the admin, and answers 404 to everything else, so the pod can be scraped
and probed without exposing the admin.

The same connection carries Envoy's load reports (LRS, `cluster_manager.load_stats_config`):
the requests it sends each cluster, which the control plane reads each Envoy's ingress from.

Several `--xds-address`es (control-plane replicas, each computing the same snapshot) become
the endpoints of the xDS cluster: when the stream to one breaks, Envoy reconnects to another
and keeps its config meanwhile. `--xds-tls-ca` makes that connection TLS, verified against
the CA and the addresses' host names; with `--xds-tls-cert/--xds-tls-key` it is mutual TLS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from xds_server.addresses import is_ip, parse_address
from xds_server.settings import UpstreamTls
from xds_server.xds.upstream_tls import transport_socket

XDS_CLUSTER = "hybridlb_xds"
ADMIN_CLUSTER = "hybridlb_admin"
STATS_LISTENER = "hybridlb_stats"
#: The admin paths the stats listener forwards; anything else is a 404 there.
STATS_PATHS = ("/stats/prometheus", "/ready")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds-address", required=True, metavar="HOST:PORT", action="append",
                        help="where the control plane's ADS server listens; repeat for "
                        "several control-plane replicas (Envoy fails over between them)")
    parser.add_argument("--xds-tls-ca", default=None, metavar="FILE",
                        help="PEM CA bundle: connect to the control plane over TLS and verify "
                        "its certificate (names the host of --xds-address) against it")
    parser.add_argument("--xds-tls-cert", default=None, metavar="FILE",
                        help="PEM client certificate for mutual TLS (with --xds-tls-key)")
    parser.add_argument("--xds-tls-key", default=None, metavar="FILE",
                        help="PEM private key of --xds-tls-cert")
    parser.add_argument("--node", default="",
                        help="the Kubernetes node this Envoy runs on (empty: a central gateway)")
    parser.add_argument("--id", default="",
                        help="Envoy node id (default: hybridlb-NODE or hybridlb-gateway)")
    parser.add_argument("--admin-port", type=int, default=9901,
                        help="Envoy's admin port (default 9901)")
    parser.add_argument("--admin-host", default="127.0.0.1",
                        help="Envoy's admin address (default 127.0.0.1: never expose it)")
    parser.add_argument("--listener-port", type=int, default=None,
                        help="this Envoy's listener port (default: the server's --listener-port)")
    parser.add_argument("--stats-port", type=int, default=None,
                        help="also serve GET /stats/prometheus and /ready (only those) on this "
                        "port, forwarded to the localhost-only admin (default: off)")
    parser.add_argument("--stats-host", default="0.0.0.0",
                        help="address the --stats-port listener binds (default 0.0.0.0)")
    parser.add_argument("--delta", action="store_true",
                        help="use incremental (delta) xDS instead of state of the world")
    parser.add_argument("--output", "-o", default="-", help="file to write (default stdout)")


def build_bootstrap(
    *,
    xds_host: str,
    xds_port: int,
    node: str = "",
    node_id: str = "",
    admin_host: str = "127.0.0.1",
    admin_port: int = 9901,
    listener_port: int | None = None,
    delta: bool = False,
    stats_port: int | None = None,
    stats_host: str = "0.0.0.0",
    more_xds: Sequence[tuple[str, int]] = (),
    xds_tls: UpstreamTls | None = None,
) -> dict[str, Any]:
    """`more_xds`: further control-plane replicas after `xds_host:xds_port`."""
    xds = [(xds_host, xds_port), *more_xds]
    metadata: dict[str, Any] = {"node": node}
    if listener_port is not None:
        metadata["listener_port"] = listener_port
    ads = {"ads": {}, "resource_api_version": "V3"}
    doc: dict[str, Any] = {
        "node": {
            "id": node_id or f"hybridlb-{node or 'gateway'}",
            "cluster": "hybridlb",
            "metadata": {"hybridlb": metadata},
            # Envoy's own locality-aware balancers (load_aware_locality) call the EDS
            # locality equal to this one local; EDS names a node's locality sub_zone=node.
            **({"locality": {"sub_zone": node}} if node else {}),
        },
        "admin": {"address": {"socket_address": {"address": admin_host,
                                                 "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        # Envoy reports to the control plane what it sends to each cluster (LRS,
        # xds/lrs.py), so that the policy learns each Envoy's ingress per pool. Envoy 1.40
        # accepts but does not honour set_node_on_first_message_only here: every report
        # carries the node (the server reads it from the first).
        "cluster_manager": {
            "load_stats_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if all(is_ip(h) for h, _ in xds) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [
                            {"endpoint": {"address": {
                                "socket_address": {"address": host, "port_value": port}}}}
                            for host, port in xds
                        ]}],
                    },
                }
            ]
        },
    }
    if xds_tls is not None:
        doc["static_resources"]["clusters"][0]["transport_socket"] = transport_socket(
            xds_tls, [h for h, _ in xds])
    if stats_port is not None:
        static = doc["static_resources"]
        static["listeners"] = [_stats_listener(stats_host, stats_port)]
        static["clusters"].append(_admin_cluster(admin_host, admin_port))
    return doc


def _stats_listener(host: str, port: int) -> dict[str, Any]:
    """HTTP on `host:port` that forwards GET of STATS_PATHS to the admin, 404 for the rest."""
    get = [{"name": ":method", "string_match": {"exact": "GET"}}]
    routes: list[dict[str, Any]] = [
        {"match": {"path": path, "headers": get}, "route": {"cluster": ADMIN_CLUSTER}}
        for path in STATS_PATHS
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return {
        "name": STATS_LISTENER,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                         "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": STATS_LISTENER,
                "route_config": {
                    "name": STATS_LISTENER,
                    "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": routes}],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/"
                                              "envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    }


def _admin_cluster(admin_host: str, admin_port: int) -> dict[str, Any]:
    """The admin as an upstream; an admin bound to every address is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin_host, admin_host)
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": admin_port}
            }}}]}],
        },
    }


def run(args: argparse.Namespace) -> int:

    try:
        (host, port), *more = [parse_address(a) for a in args.xds_address]
    except ValueError as exc:
        raise SystemExit(f"--xds-address: {exc}") from exc
    xds_tls = UpstreamTls.from_flags(args.xds_tls_ca, args.xds_tls_cert, args.xds_tls_key,
                                     flags="--xds-tls")
    doc = build_bootstrap(
        xds_host=host,
        xds_port=port,
        more_xds=more,
        xds_tls=xds_tls,
        node=args.node,
        node_id=args.id,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        listener_port=args.listener_port,
        delta=args.delta,
        stats_port=args.stats_port,
        stats_host=args.stats_host,
    )
    text = yaml.safe_dump(doc, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0
