"""Host and port spellings shared by the pool file, the Kubernetes source, the bootstrap and
the builders: one rule for what counts as an IP literal and as `HOST:PORT`."""

from __future__ import annotations

import ipaddress
import re


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 literal (brackets allowed): what Envoy's EDS and STATIC clusters take."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def host_port(host: str, port: int) -> str:
    """`HOST:PORT`, an IPv6 literal in brackets (`[fd00::1]:18000`), as gRPC binds it."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` into (host, port); ValueError says what is wrong."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} in {text!r} is out of range")
    return host, port
