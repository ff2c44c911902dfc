"""One settings object for `hybridlb serve`, grouped by the part that reads it.

Built once in the command (flags over an optional YAML config file over these defaults);
nothing reads the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xds_server.extproc.pick import PickSettings
from xds_server.policy.views import HybridSettings
from xds_server.policy.weights import PolicySettings
from xds_server.sources.prometheus import PrometheusQueries

LbPolicy = Literal["least_request", "round_robin", "orca_wrr", "load_aware_locality"]


@dataclass(frozen=True)
class TlsSettings:
    """Files of a gRPC server's TLS; no `cert`: plaintext (the default)."""

    #: PEM certificate chain the server presents.
    cert: Path | None = None
    #: PEM private key of `cert`.
    key: Path | None = None
    #: PEM CA bundle that client certificates must chain to: set, mutual TLS is required.
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def check(self, what: str) -> None:
        """Flag combinations that cannot work end the command with a message."""
        if (self.cert is None) != (self.key is None):
            raise SystemExit(f"{what}: --tls-cert and --tls-key go together")
        if self.client_ca is not None and self.cert is None:
            raise SystemExit(f"{what}: --tls-client-ca needs --tls-cert and --tls-key")


@dataclass(frozen=True)
class UpstreamTls:
    """Files for Envoy's TLS to a gRPC server (the control plane, the picker), as paths
    on Envoy's side: `ca` verifies the server; `cert` and `key` make it mutual TLS."""

    ca: str
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_flags(
        cls, ca: str | None, cert: str | None, key: str | None, *, flags: str
    ) -> UpstreamTls | None:
        """From a command's `{flags}-ca/-cert/-key` (e.g. `--xds-tls`); None without a CA.
        Combinations that cannot work end the command with a message."""
        if (cert is None) != (key is None):
            raise SystemExit(f"{flags}-cert and {flags}-key go together")
        if cert is not None and ca is None:
            raise SystemExit(f"{flags}-cert needs {flags}-ca (the server's CA)")
        return None if ca is None else cls(ca, cert, key)


@dataclass(frozen=True)
class XdsSettings:
    """The ADS gRPC server."""

    host: str = "0.0.0.0"
    #: ADS port Envoys connect to.
    port: int = 18000
    #: gRPC receive limit; a delta reconnect from a large Envoy exceeds gRPC's 4 MiB default.
    max_receive_bytes: int = 64 * 1024 * 1024
    #: Connections are closed after this age so Envoys spread over control-plane replicas.
    max_connection_age_s: float = 1800.0
    keepalive_s: float = 30.0
    #: Grace for open streams on shutdown.
    stop_grace_s: float = 2.0
    #: TLS (and mutual TLS with a client CA) for the ADS server; files reloaded on change.
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass(frozen=True)
class EnvoySettings:
    """What the resource builders put into every Envoy's view."""

    #: Listener port for OpenAI-style traffic; an Envoy's node metadata may override it.
    listener_port: int = 10000
    listener_host: str = "0.0.0.0"
    connect_timeout_s: float = 1.0
    #: Whole-request timeout; generation can be long, so it is generous.
    route_timeout_s: float = 600.0
    #: Header whose value names the pool (model) a request goes to.
    model_header: str = "x-model"
    #: Header that pins a request to one node's replicas (503 if it has none ready).
    node_header: str = "x-hybridlb-node"
    #: Envoy's balancer within a cluster: least_request (weight / in-flight, the default)
    #: or round_robin (weighted), for comparison; or Envoy's own ORCA-driven balancers,
    #: orca_wrr (client_side_weighted_round_robin) and load_aware_locality (xds/lb_policies.py).
    lb_policy: LbPolicy = "least_request"
    #: Where Envoys reach the endpoint picker (HOST:PORT); empty: no ext_proc filter.
    extproc_address: str = ""
    #: How long Envoy waits for a pick before routing by the weights (fail open).
    extproc_timeout_s: float = 0.2
    #: Envoys reach the picker over TLS (mutual with a client certificate); None: plaintext.
    extproc_tls: UpstreamTls | None = None
    #: Requests carrying this header stick to a replica (bounded-load consistent hashing).
    session_header: str = "x-session-id"
    #: Bound of that hashing: no replica above this percent of the mean load (>= 100).
    hash_balance_factor: int = 150
    #: Outlier detection: a replica is ejected from an Envoy's balancer for a while after
    #: this many failures in a row that Envoy sees itself (connect failure, reset, timeout,
    #: 502/503/504); vLLM's own 500s do not count. 0: off.
    outlier_consecutive_failures: int = 3
    #: First ejection time; Envoy multiplies it by the number of ejections in a row.
    outlier_ejection_s: float = 10.0
    #: A try whose upstream sends nothing for this long fails (504) instead of waiting for
    #: the whole-request timeout: bounds a hung replica. 0: off, as a non-streaming request
    #: sends nothing until it is done; set it above your longest non-streaming generation.
    upstream_idle_timeout_s: float = 0.0


@dataclass(frozen=True)
class AdminSettings:
    """The admin HTTP server: health, metrics, debug state."""

    host: str = "127.0.0.1"
    port: int = 18080


@dataclass(frozen=True)
class StaticSettings:
    """Static discovery from a YAML pool file."""

    path: Path | None = None
    #: How often the file is checked for changes (content, not just mtime).
    poll_interval_s: float = 1.0


@dataclass(frozen=True)
class KubernetesPool:
    """One pool's pods: a label selector, in some namespaces."""

    #: Pool name for its pods; a pod's `hybridlb.io/pool` wins, vLLM's
    #: --served-model-name is used when this is empty.
    name: str = ""
    #: Label selector, as `kubectl -l` takes it (`app=vllm,tier in (gpu)`).
    selector: str = ""
    #: Namespaces to watch; empty: all namespaces (needs the ClusterRole).
    namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class KubernetesSettings:
    """Discovery of vLLM pods through the Kubernetes API (sources/kubernetes.py)."""

    enabled: bool = False
    #: Kubeconfig file; None: the pod's in-cluster service account.
    kubeconfig: Path | None = None
    pools: tuple[KubernetesPool, ...] = ()
    #: Server-side end of each watch request (the watch then resumes where it was).
    watch_timeout_s: int = 300
    #: Full relist however quiet the watch: the safety net for a missed event.
    resync_interval_s: float = 600.0
    list_page_size: int = 500
    list_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: Retry delays after errors double from the first to the cap (with jitter).
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True)
class ExtprocSettings:
    """The endpoint picker hosted inside `serve` (port 0: not hosted)."""

    host: str = "0.0.0.0"
    port: int = 0
    pick: PickSettings = field(default_factory=PickSettings)


LoadMode = Literal["auto", "prometheus", "scrape", "none"]


@dataclass(frozen=True)
class LoadSettings:
    """Where replica loads come from (see sources/loads.py for the modes)."""

    mode: LoadMode = "auto"
    #: Prometheus base URL; in `auto` mode without it, the scrape alone is used.
    prometheus_url: str = ""
    queries: PrometheusQueries = field(default_factory=PrometheusQueries)
    prometheus_interval_s: float = 2.0
    prometheus_timeout_s: float = 2.0
    #: In `auto`, a Prometheus sample older than this is replaced by a direct scrape.
    prometheus_max_age_s: float = 20.0
    scrape_interval_s: float = 1.0
    scrape_timeout_s: float = 0.5
    scrape_concurrency: int = 32


@dataclass(frozen=True)
class Settings:
    xds: XdsSettings = field(default_factory=XdsSettings)
    envoy: EnvoySettings = field(default_factory=EnvoySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    static: StaticSettings = field(default_factory=StaticSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    loads: LoadSettings = field(default_factory=LoadSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    hybrid: HybridSettings = field(default_factory=HybridSettings)
    extproc: ExtprocSettings = field(default_factory=ExtprocSettings)
