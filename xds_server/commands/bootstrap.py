"""Print an Envoy bootstrap (YAML) that connects to the control plane over ADS.

The Envoy identifies its node in its node metadata (`hybridlb.node`); a listener port given
here travels there too and overrides the server's, so several Envoys can share one machine.
In a cluster, run this in an init container with the node name from the downward API.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

import yaml

XDS_CLUSTER = "hybridlb_xds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds-address", required=True, metavar="HOST:PORT",
                        help="where the control plane's ADS server listens")
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
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"node": node}
    if listener_port is not None:
        metadata["listener_port"] = listener_port
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {
            "id": node_id or f"hybridlb-{node or 'gateway'}",
            "cluster": "hybridlb",
            "metadata": {"hybridlb": metadata},
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
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
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
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                            "socket_address": {"address": xds_host, "port_value": xds_port}
                        }}}]}],
                    },
                }
            ]
        },
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from xds_server.sources.static_file import parse_address

    try:
        host, port = parse_address(args.xds_address)
    except ValueError as exc:
        raise SystemExit(f"--xds-address: {exc}") from exc
    doc = build_bootstrap(
        xds_host=host,
        xds_port=port,
        node=args.node,
        node_id=args.id,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        listener_port=args.listener_port,
        delta=args.delta,
    )
    text = yaml.safe_dump(doc, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0
