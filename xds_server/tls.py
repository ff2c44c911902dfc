"""TLS and mutual TLS for the gRPC servers (ADS and ext_proc), reloaded without a restart.

Certificates rotate (cert-manager renews a Secret, the kubelet swaps the mounted files), and
a control plane that must restart to pick them up either drops every Envoy's stream or
serves an expired certificate. gRPC asks `certificate_configuration_fetcher` before every
new handshake whether the configuration changed; the answer compares the files' content
(cheap `stat` first), so a rotation applies to the next connection while the open streams
keep their session. A file that is unreadable or not PEM (half-written) is not applied: the
last good set stays in force, with one log line per bad content. A certificate and key from
different renewals can meet only until the second file lands: any change of either is seen.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import grpc

from xds_server.settings import TlsSettings

log = logging.getLogger(__name__)


class TlsFiles:
    """The files' current content as a gRPC certificate configuration, re-read on change."""

    def __init__(self, settings: TlsSettings) -> None:
        assert settings.cert is not None and settings.key is not None
        self._paths = [p for p in (settings.cert, settings.key, settings.client_ca)
                       if p is not None]
        self._mutual = settings.client_ca is not None
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._stats: list[tuple[int, int, int]] = []
        self._digest = b""
        self._rejected = b""
        self.reloads = 0
        config = self._load()
        if config is None:
            raise SystemExit(f"TLS files {', '.join(map(str, self._paths))} are not usable PEM")
        self._initial = config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self._mutual)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed (and read well), else None."""
        with self._lock:
            try:
                stats = [self._stat(p) for p in self._paths]
            except OSError:
                return None
            if stats == self._stats:
                return None
            config = self._load()
            if config is not None:
                self.reloads += 1
                log.info("TLS files changed: the next connections use the new certificate")
            return config

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> grpc.ServerCertificateConfiguration | None:
        """Read all files; None (logged once per content) when unusable or unchanged."""
        try:
            self._stats = [self._stat(p) for p in self._paths]
            data = [p.read_bytes() for p in self._paths]
        except OSError as exc:
            log.error("TLS files unreadable (%s: %s); keeping the last good certificate",
                      exc.filename, exc.strerror)
            return None
        digest = hashlib.blake2b(b"\0".join(data), digest_size=16).digest()
        if digest == self._digest:
            return None
        if not all(b"-----BEGIN " in d for d in data):
            if digest != self._rejected:
                self._rejected = digest
                log.error("TLS files %s are not all PEM (being written?); keeping the last "
                          "good certificate", ", ".join(map(str, self._paths)))
            return None
        self._digest = digest
        cert, key = data[0], data[1]
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=data[2] if self._mutual else None)


def add_port(server: grpc.aio.Server, address: str, settings: TlsSettings) -> int:
    """Listen on `address` with TLS when configured, else in plaintext; the bound port."""
    if not settings.enabled:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, TlsFiles(settings).credentials()))


def describe(settings: TlsSettings) -> str:
    """How a server speaks, for its "listening on" log line."""
    if settings.client_ca is not None:
        return " (mutual TLS)"
    return " (TLS)" if settings.enabled else " (plaintext)"
