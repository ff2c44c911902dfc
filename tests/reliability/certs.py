"""Test certificates made with the `openssl` command line (no extra Python dependency).

A CA, server certificates valid for 127.0.0.1 and localhost, and client certificates, all
EC P-256 and valid for two days: enough for a test run, useless anywhere else.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ca(directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
             "-subj", f"/CN={name}")
    return pair


def issue(directory: Path, name: str, by: Pair, *, server: bool, uris: tuple[str, ...] = ()
          ) -> Pair:
    """A leaf signed by `by`: a server (SANs 127.0.0.1, localhost) or a client, with URI
    SANs `uris` (a SPIFFE id naming the Envoy's node)."""
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    sans = [*(["IP:127.0.0.1", "DNS:localhost"] if server else []), *(f"URI:{u}" for u in uris)]
    ext.write_text((f"subjectAltName={','.join(sans)}\n" if sans else "")
                   + f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(by.cert), "-CAkey", str(by.key),
             "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(ext))
    return pair
