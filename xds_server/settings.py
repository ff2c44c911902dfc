"""One settings object for `hybridlb serve`, grouped by the part that reads it.

Each setting is declared once, here (or, for the policy's tunables, in policy/): its field
carries its flag, its help and its default (xds_server/options.py), and the command's flags,
the config-file keys, `--help`, the README's table and the validation all follow from it.
Built once in the command (flags over an optional YAML config file over these defaults);
nothing reads the environment at import time. Plain data: this module imports no part of
the control plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xds_server.options import group, option, same_as
from xds_server.policy.views import HybridSettings
from xds_server.policy.weights import PolicySettings


def _check_ports(ports: dict[str, int]) -> None:
    """Ports by flag: 0 (any free port, or off where the help says so) to 65535."""
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} {port} is not a port (0-65535)")


@dataclass(frozen=True)
class TlsSettings:
    """Files of a gRPC server's TLS; no `cert`: plaintext (the default). Reloaded on change."""

    cert: Path | None = option(None, "PEM certificate chain: serve over TLS (re-read when the "
                               "file changes, no restart)", flag="cert")
    key: Path | None = option(None, "PEM private key of the certificate", flag="key")
    client_ca: Path | None = option(None, "PEM CA bundle: require clients (Envoys) to present "
                                    "a certificate it signed (mutual TLS)", flag="client-ca")

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
    on Envoy's side: `ca` verifies the server; `cert` and `key` make it mutual TLS. No `ca`:
    plaintext."""

    ca: str | None = option(None, "PEM CA, as a path on the Envoys' side: Envoys speak TLS "
                            "and verify the server against it", flag="ca")
    cert: str | None = option(None, "PEM client certificate, as a path on the Envoys' side, "
                              "for mutual TLS", flag="cert")
    key: str | None = option(None, "PEM private key of the client certificate, on the "
                             "Envoys' side", flag="key")

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("the client certificate and its key go together")
        if self.cert is not None and self.ca is None:
            raise ValueError("a client certificate needs the server's CA")

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    @classmethod
    def from_flags(
        cls, ca: str | None, cert: str | None, key: str | None, *, flags: str
    ) -> UpstreamTls | None:
        """From a command's `{flags}-ca/-cert/-key` (e.g. `--xds-tls`); None without a CA.
        Combinations that cannot work end the command with a message."""
        try:
            tls = cls(ca, cert, key)
        except ValueError as exc:
            raise SystemExit(f"{flags}-ca/-cert/-key: {exc}") from exc
        return tls if tls.enabled else None


@dataclass(frozen=True)
class XdsSettings:
    """The ADS gRPC server."""

    host: str = option("127.0.0.1", "address the ADS gRPC server binds (in a cluster: the "
                       "pod IP; 0.0.0.0 opens it on every interface)", flag="xds-host")
    port: int = option(18000, "port of the ADS gRPC server (0: any free port)", flag="xds-port")
    #: The largest request a real Envoy (1.40) sent at 10,000 replicas on 1,250 nodes was
    #: 61,449 bytes (a delta reconnect naming what it held; 61,171 of them its node, i.e. its
    #: extension list); a view holds a few resources per pool, not per replica: 16x headroom.
    max_receive_bytes: int = option(1024 * 1024, "largest ADS request accepted (larger: the "
                                    "stream ends)", flag="xds-max-receive-bytes")
    #: Each stream holds what its Envoy was sent (~0.7 MiB at 10,000 replicas).
    max_streams: int = option(2048, "ADS streams held at once (load-report streams are "
                              "capped alike, apart); more are refused (RESOURCE_EXHAUSTED)",
                              flag="xds-max-streams")
    max_streams_per_peer: int = option(64, "ADS streams held at once from one address; more "
                                       "are refused", flag="xds-max-streams-per-peer")
    max_resource_names: int = option(10_000, "resource names one ADS request may carry (a real "
                                     "Envoy names a few per pool; a load report: its "
                                     "clusters); more end the stream (RESOURCE_EXHAUSTED)",
                                     flag="xds-max-resource-names")
    node_san: str = option("spiffe://*/ns/*/node/{node}", "with --tls-client-ca: an Envoy "
                           "asking for a node's view must present a certificate with a URI "
                           "SAN matching this ({node}: the node, *: any one path segment; "
                           "empty: no check)", flag="tls-node-san")
    #: Each report costs the control plane a parse of a few clusters per pool: at 1,250
    #: Envoys and 1 s, 1,250 small messages a second.
    load_report_interval_s: float = option(
        1.0, "how often every Envoy reports the requests it sent to each pool (Envoy's Load "
        "Reporting Service; the hybrid policy reads each Envoy's ingress from it): shorter "
        "follows a shift of traffic sooner, at one message per Envoy per interval",
        flag="load-report-interval-s")
    #: Connections are closed after this age so Envoys spread over control-plane replicas.
    max_connection_age_s: float = 1800.0
    keepalive_s: float = 30.0
    #: Grace for open streams on shutdown.
    stop_grace_s: float = 2.0
    tls: TlsSettings = group(TlsSettings, prefix="tls-")

    def __post_init__(self) -> None:
        _check_ports({"--xds-port": self.port})
        if min(self.max_streams, self.max_streams_per_peer, self.max_resource_names) < 1:
            raise ValueError("--xds-max-streams, --xds-max-streams-per-peer and "
                             "--xds-max-resource-names must be at least 1")
        if not self.load_report_interval_s >= 0.1:
            raise ValueError("--load-report-interval-s must be at least 0.1")


LbPolicy = Literal["least_request", "round_robin", "orca_wrr", "load_aware_locality"]


@dataclass(frozen=True)
class EnvoySettings:
    """What the resource builders put into every Envoy's view."""

    listener_port: int = option(10000, "port of the Envoy listener for OpenAI-style traffic "
                                "(an Envoy's bootstrap may override it)", flag="listener-port")
    listener_host: str = option("0.0.0.0", "address the Envoy listener binds",
                                flag="listener-host")
    connect_timeout_s: float = option(1.0, "Envoy's upstream connect timeout",
                                      flag="connect-timeout-s")
    route_timeout_s: float = option(600.0, "Envoy's whole-request timeout (generation can be "
                                    "long)", flag="route-timeout-s")
    model_header: str = option("x-model", "request header that names the pool",
                               flag="model-header")
    #: Header that pins a request to one node's replicas (503 if it has none ready).
    node_header: str = "x-hybridlb-node"
    #: orca_wrr and load_aware_locality are Envoy's own ORCA-driven balancers
    #: (client_side_weighted_round_robin, load_aware_locality; xds/lb_policies.py).
    lb_policy: LbPolicy = option("least_request", "Envoy's balancer within a cluster: "
                                 "least_request (weight / in-flight), round_robin (weighted), "
                                 "or Envoy's ORCA-driven orca_wrr or load_aware_locality (see "
                                 "README)", flag="lb-policy")
    #: Envoy's least-request compares this many hosts drawn at random (2: power of two
    #: choices). Drawn with replacement, so a few times the hosts of a cluster makes it a
    #: scan for the least busy (ties at random). Hosts of unequal weight are picked by
    #: weight / (in-flight + 1) instead, whatever this says.
    least_request_choices: int = option(2, "least_request: how many random hosts Envoy "
                                        "compares by in-flight requests (2: power of two "
                                        "choices; more: nearer the least busy of all)",
                                        flag="least-request-choices")
    extproc_address: str = option("", "HOST:PORT where Envoys reach the endpoint picker; adds "
                                  "the ext_proc filter (default with --extproc-port: "
                                  "127.0.0.1:PORT)", flag="extproc-address")
    extproc_timeout_s: float = option(0.2, "how long Envoy waits for a pick before routing by "
                                      "the weights (fail open)", flag="extproc-timeout-s")
    #: Envoys reach the picker over TLS (mutual with a client certificate), as files on the
    #: Envoys' side; a picker hosted in `serve` serves --tls-cert.
    extproc_tls: UpstreamTls = group(UpstreamTls, prefix="extproc-tls-")
    session_header: str = option("x-session-id", "requests with this header stick to one "
                                 "replica per session value (bounded-load consistent hashing, "
                                 "no picker needed)", flag="session-header")
    hash_balance_factor: int = option(150, "session stickiness bound: no replica above this "
                                      "percent of the mean load (>= 100)",
                                      flag="hash-balance-factor")
    #: Only failures Envoy sees itself count (connect failure, reset, timeout, 502/503/504).
    outlier_consecutive_failures: int = option(
        3, "Envoy ejects a replica for a while after this many connect failures, resets, "
        "timeouts or 502-504 in a row (not vLLM's 500s; 0: off)",
        flag="outlier-consecutive-failures")
    outlier_ejection_s: float = option(10.0, "first ejection time (longer after each ejection "
                                       "in a row)", flag="outlier-ejection-s")
    #: 0: off, as a non-streaming request sends nothing until it is done.
    upstream_idle_timeout_s: float = option(
        0.0, "a try that receives nothing for this long fails with 504, bounding a hung "
        "replica (0: off; keep it above your longest non-streaming generation)",
        flag="upstream-idle-timeout-s")

    def __post_init__(self) -> None:
        _check_ports({"--listener-port": self.listener_port})
        if self.least_request_choices < 2:
            raise ValueError("--least-request-choices must be at least 2 (Envoy's minimum)")


@dataclass(frozen=True)
class AdminSettings:
    """The admin HTTP server: health, metrics, debug state."""

    host: str = option("127.0.0.1", "address the admin HTTP server binds", flag="admin-host")
    port: int = option(18080, "port of the admin server: /healthz /readyz /metrics "
                       "/debug/state /picker/state", flag="admin-port")

    def __post_init__(self) -> None:
        _check_ports({"--admin-port": self.port})


@dataclass(frozen=True)
class StaticSettings:
    """Static discovery from a YAML pool file."""

    path: Path | None = option(None, "YAML file of pools to serve (watched for changes)",
                               flag="static")
    #: Content, not just mtime: survives a ConfigMap's symlink swap.
    poll_interval_s: float = option(1.0, "how often the pool file is checked",
                                    flag="static-poll-interval-s")


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
    #: The InferencePool of this name (in `namespaces`) defines the pool instead of `name`
    #: and `selector`: its name, the pods its selector matches, its target ports.
    inference_pool: str = ""


@dataclass(frozen=True)
class KubernetesSettings:
    """Discovery of vLLM pods through the Kubernetes API (sources/kubernetes.py)."""

    enabled: bool = option(False, "discover vLLM pods through the Kubernetes API",
                           flag="kubernetes")
    kubeconfig: Path | None = option(None, "kubeconfig for --kubernetes (default: the "
                                     "in-cluster service account)", flag="kubeconfig")
    namespaces: tuple[str, ...] = option((), "namespace to watch; repeat for several "
                                         "(default: all, which needs the ClusterRole)",
                                         flag="namespace")
    selector: str = option("", "label selector of the vLLM pods, e.g. app=vllm (several "
                           "pools: kubernetes_pools in --config)", flag="selector")
    inference_pools: bool = option(False, "with --kubernetes: every InferencePool "
                                   "(inference.networking.k8s.io/v1) in the watched namespaces "
                                   "is a pool: its name, the pods its selector matches, its "
                                   "target ports", flag="inference-pools")
    #: What is watched: `kubernetes_pools` of the config file (in their own namespaces, else
    #: `namespaces`) and a pool for `selector`; composed by the command.
    pools: tuple[KubernetesPool, ...] = ()
    resync_interval_s: float = option(600.0, "full relist of the pods, a safety net for the "
                                      "watch", flag="kubernetes-resync-interval-s")
    watch_timeout_s: int = option(300, "server-side end of each watch request (it then "
                                  "resumes)", flag="kubernetes-watch-timeout-s")
    watch_silence_s: float = option(90.0, "a watch that receives no event and no bookmark for "
                                    "this long is taken for dead and resumed (API servers "
                                    "send a bookmark about once a minute)",
                                    flag="kubernetes-watch-silence-s")
    list_page_size: int = 500
    list_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    #: Retry delays after errors double from the first to the cap (with jitter).
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True)
class PickSettings:
    """Tunables of the endpoint picker (extproc/pick.py)."""

    #: The weight policy's own: the room per rank until a replica with requests waiting
    #: shows the real one (policy/load.py), for both deciders.
    max_num_seqs: int = same_as(PolicySettings, "max_num_seqs")
    #: Among a server's ranks with as many requests, the one named is the one vLLM's own
    #: balancer would prefer (waiting weighs more).
    waiting_factor: float = same_as(PolicySettings, "waiting_factor")
    #: Above this wait a replica gets no affinity bonus: a warm cache is not worth a queue.
    room_threshold: float = same_as(HybridSettings, "room_threshold")
    affinity_bonus: float = option(0.15, "score bonus (in units of a replica's room) for the "
                                   "replicas that took a prompt's leading block before",
                                   flag="affinity-bonus")
    #: Characters of the prompt that make up its leading block (about 64 tokens).
    prefix_chars: int = 256
    #: Below Envoy's per-connection buffer limit (1 MiB), which the picker asks Envoy to
    #: buffer bodies of this size or less in.
    max_body_bytes: int = option(1_000_000, "larger bodies are not parsed (the request goes "
                                 "by the weights)", flag="max-body-bytes")
    #: The protocol's fallback list: Envoy goes down it on retries.
    fallbacks: int = option(2, "endpoints the picker names after its pick, for Envoy to fall "
                            "back to", flag="fallbacks")
    max_queue: int = option(0, "the picker answers 429 when every candidate has more waiting "
                            "requests than this (0: never)", flag="max-queue")
    #: On by default: with its own requests counted to the rank (extproc/state.py's
    #: PickLedger), the picker knows a rank is full sooner than a hybrid-mode server's own
    #: balancer, which scores ranks on counts up to 100 ms old and sent 4-17% of requests to
    #: a full rank while the replica's other rank had a free slot (bench/README, issue 15's
    #: sixth run). Ranks are named only where the replica's per-engine loads are read.
    pin_rank: bool = option(True, "name the picked replica's least-loaded DP rank in "
                            "X-data-parallel-rank (false: the replica's own balancer "
                            "chooses)", flag="pin-rank")


@dataclass(frozen=True)
class ExtprocSettings:
    """The endpoint picker run by `serve` (port 0: none)."""

    port: int = option(0, "run the ext_proc endpoint picker on this port, in a child process "
                       "of its own, restarted if it dies (0: none)", flag="extproc-port")
    host: str = option("", "address the hosted picker binds (default: the host of "
                       "--extproc-address, else 127.0.0.1)", flag="extproc-host")
    #: The child's counters (picks, fail-opens, requests it could not read) live in the
    #: child: without this port nothing exports them.
    admin_port: int = option(0, "serve the hosted picker's own /metrics, /healthz and "
                             "/debug/state on this port of --extproc-host (0: none; its "
                             "hybridlb_extproc_* metrics are then on serve's /metrics only "
                             "with --extproc-in-process)", flag="extproc-admin-port")
    pick: PickSettings = group(PickSettings, prefix="extproc-")
    #: On the control plane's own event loop instead of a child process: picks then wait
    #: behind snapshot builds (and fail open during a large publish). For tests, tiny setups.
    in_process: bool = option(False, "host the picker on the control plane's own event loop "
                              "instead (tests, tiny setups: picks fail open while a large "
                              "snapshot builds)", flag="extproc-in-process")
    #: The child reads /picker/state at most this often (it long-polls: an unchanged fleet
    #: costs one empty reply per 10 s); the control plane renders it at most every 0.1 s.
    poll_interval_s: float = 0.1

    def __post_init__(self) -> None:
        _check_ports({"--extproc-port": self.port, "--extproc-admin-port": self.admin_port})


LoadMode = Literal["auto", "prometheus", "scrape", "none"]


@dataclass(frozen=True)
class PrometheusQueries:
    """PromQL per signal; each must return one series per replica carrying `label`."""

    # Per engine (the global DP rank), so that rank endpoints get their own rank's load.
    running: str = option("sum by (instance, engine) (vllm:num_requests_running)",
                          "PromQL: running requests per replica", flag="query-running")
    waiting: str = option("sum by (instance, engine) (vllm:num_requests_waiting)",
                          "PromQL: waiting requests per replica", flag="query-waiting")
    kv_cache_usage: str = option("avg by (instance, engine) (vllm:kv_cache_usage_perc)",
                                 "PromQL: KV-cache use per replica", flag="query-kv")
    #: The oldest rank's sample of a replica.
    sampled_at: str = option("min by (instance) (timestamp(vllm:num_requests_running))",
                             "PromQL: when each replica's samples were taken",
                             flag="query-sampled-at")
    #: Output tokens per second per running request (1/TPOT) over a window of a few scrape
    #: intervals: a replica's lasting speed, which the persistent load model weighs by. A zero
    #: denominator (idle) yields NaN or Inf, read as no speed.
    decode_speed: str = option(
        "sum by (instance) (rate(vllm:generation_tokens_total[30s])) / sum by (instance) "
        "(avg_over_time(vllm:num_requests_running[30s]))",
        "PromQL: output tokens per second per running request of each replica (empty: none)",
        flag="query-decode-speed")
    label: str = option("instance", "label that carries a replica's metrics address "
                        "(IP:PORT) in query results", flag="query-label")


@dataclass(frozen=True)
class LoadSettings:
    """Where replica loads come from (see sources/loads.py for the modes)."""

    mode: LoadMode = option("auto", "where loads come from: auto (Prometheus if "
                            "--prometheus-url, else/when stale the direct scrape), prometheus, "
                            "scrape, none (capacity-only weights)", flag="metrics")
    prometheus_url: str = option("", "Prometheus base URL", flag="prometheus-url")
    prometheus_interval_s: float = option(2.0, "how often Prometheus is queried (mode "
                                          "prometheus)", flag="prometheus-interval-s")
    prometheus_timeout_s: float = 2.0
    prometheus_max_age_s: float = option(20.0, "in auto mode, older Prometheus samples are "
                                         "replaced by a scrape", flag="prometheus-max-age-s")
    queries: PrometheusQueries = group(PrometheusQueries)
    scrape_interval_s: float = option(1.0, "how often each replica's /metrics is scraped",
                                      flag="scrape-interval-s")
    scrape_timeout_s: float = option(0.5, "timeout of one scrape", flag="scrape-timeout-s")
    scrape_concurrency: int = option(32, "scrapes in flight at once",
                                     flag="scrape-concurrency")


@dataclass(frozen=True)
class Settings:
    static: StaticSettings = group(StaticSettings)
    kubernetes: KubernetesSettings = group(KubernetesSettings)
    xds: XdsSettings = group(XdsSettings)
    admin: AdminSettings = group(AdminSettings)
    envoy: EnvoySettings = group(EnvoySettings)
    loads: LoadSettings = group(LoadSettings)
    policy: PolicySettings = group(PolicySettings)
    hybrid: HybridSettings = group(HybridSettings)
    extproc: ExtprocSettings = group(ExtprocSettings)


@dataclass(frozen=True)
class PickerSettings:
    """`hybridlb extproc`: the endpoint picker in a process of its own."""

    port: int = option(9002, "gRPC port", flag="port")
    host: str = option("127.0.0.1", "address to bind; in a pod, its IP or 0.0.0.0", flag="host")
    control_plane: str = option("http://127.0.0.1:18080", "the control plane's admin URL, "
                                "whose /picker/state is followed", flag="control-plane")
    poll_interval_s: float = option(0.5, "/picker/state is read at most this often; it is a "
                                    "long poll, answered when the fleet changes",
                                    flag="poll-interval-s")
    admin_port: int = option(0, "serve /healthz, /readyz, /metrics and /debug/state (the "
                             "picker's view of the replicas) here (0: off)", flag="admin-port")
    admin_host: str = option("127.0.0.1", "address the admin server binds", flag="admin-host")
    model_header: str = same_as(EnvoySettings, "model_header")
    #: `serve` sets it for the picker it runs, so a killed `serve` leaves no picker holding
    #: the port.
    parent_pid: int = option(0, "exit when this process is gone (0: never)", flag="parent-pid")
    tls: TlsSettings = group(TlsSettings, prefix="tls-")
    pick: PickSettings = group(PickSettings)

    def __post_init__(self) -> None:
        _check_ports({"--port": self.port, "--admin-port": self.admin_port})
