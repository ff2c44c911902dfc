"""Envoy's TLS to a gRPC server (the control plane, the endpoint picker), in one place.

A plain dict, as the bootstrap writes it; the builders parse the same dict into the
protobuf they push, so both connections are configured the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xds_server.addresses import is_ip
from xds_server.settings import UpstreamTls


def transport_socket(tls: UpstreamTls, hosts: Sequence[str]) -> dict[str, Any]:
    """UpstreamTlsContext: verify the server against `ca` and the hosts' names (SAN), send
    SNI for a host name, and present a client certificate for mutual TLS when given."""
    assert tls.ca is not None, "transport_socket of a plaintext UpstreamTls"
    sans = [{"san_type": "IP_ADDRESS" if is_ip(h) else "DNS", "matcher": {"exact": h}}
            for h in dict.fromkeys(hosts)]
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {"trusted_ca": {"filename": tls.ca},
                               "match_typed_subject_alt_names": sans},
    }
    if tls.cert is not None and tls.key is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": tls.cert},
                                       "private_key": {"filename": tls.key}}]
    context: dict[str, Any] = {
        "@type": "type.googleapis.com/"
                 "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    }
    names = [h for h in hosts if not is_ip(h)]
    if names:
        context["sni"] = names[0]
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
