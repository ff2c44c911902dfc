"""The control plane's own Prometheus metrics (`hybridlb_*`).

One registry per app, so that tests can run several control planes in one process.
Metrics read *from* vLLM live with the load sources, not here.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# `*_created` series double every counter for no use on a dashboard.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.replicas = Gauge(
            "hybridlb_replicas", "Discovered replicas by pool and state", ["pool", "state"],
            registry=r,
        )
        self.source_errors = Counter(
            "hybridlb_source_errors_total",
            "Inputs a source could not use (kept the last good state)",
            ["source", "reason"], registry=r,
        )
        self.watch_up = Gauge(
            "hybridlb_kubernetes_watch_up",
            "1 while a Kubernetes list+watch works, 0 while it fails (the log and /readyz "
            "say why)", ["resource", "namespace", "selector"], registry=r,
        )
        self.snapshots = Counter(
            "hybridlb_snapshots_total", "Snapshots built from a changed state", registry=r
        )
        self.snapshots_refused = Counter(
            "hybridlb_snapshots_refused_total",
            "Snapshots refused because a view named a cluster or assignment it lacked "
            "(the last good one stayed)", registry=r,
        )
        self.snapshot_build_seconds = Histogram(
            "hybridlb_snapshot_build_seconds", "Time to build and serialize a snapshot",
            registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.snapshot_version = Gauge(
            "hybridlb_snapshot_version", "Version of the snapshot being served", registry=r
        )
        self.resources = Gauge(
            "hybridlb_xds_resources",
            "Resources in the current snapshot (per-view types: as a gateway's view holds them)",
            ["type"], registry=r
        )
        self.streams = Gauge(
            "hybridlb_xds_streams", "Connected ADS streams", ["protocol"], registry=r
        )
        self.pushes = Counter(
            "hybridlb_xds_pushes_total", "xDS responses sent", ["type", "protocol"], registry=r
        )
        self.push_bytes = Counter(
            "hybridlb_xds_push_bytes_total", "Bytes of xDS responses sent", ["type"], registry=r
        )
        self.refused_streams = Counter(
            "hybridlb_xds_refused_streams_total",
            "ADS streams ended by the control plane, by reason (too_many_streams, "
            "too_many_from_peer, too_many_names, malformed, node_not_in_certificate)",
            ["reason"], registry=r,
        )
        self.lrs_streams = Gauge(
            "hybridlb_lrs_streams", "Connected load-report (LRS) streams", registry=r
        )
        self.lrs_reports = Counter(
            "hybridlb_lrs_reports_total",
            "Load reports received from Envoys (one per Envoy per --load-report-interval-s)",
            registry=r,
        )
        self.lrs_rejected = Counter(
            "hybridlb_lrs_rejected_total",
            "Parts of load reports left out, by reason (no_node: the stream's first message "
            "named no Envoy; bad_interval: a cluster's measured interval was not positive; "
            "implausible_rate: more requests a second than an Envoy can send)",
            ["reason"], registry=r,
        )
        self.log_suppressed = Counter(
            "hybridlb_log_suppressed_total",
            "Log lines left out by rate limiting, by kind (what a client can repeat)",
            ["what"], registry=r,
        )
        self.acks = Counter(
            "hybridlb_xds_acks_total", "Responses Envoy accepted", ["type"], registry=r
        )
        self.nacks = Counter(
            "hybridlb_xds_nacks_total", "Responses Envoy rejected", ["type"], registry=r
        )
        self.load_errors = Counter(
            "hybridlb_load_errors_total",
            "Load readings that failed (per replica for the scrape, per query for Prometheus)",
            ["source", "reason"], registry=r,
        )
        self.load_replicas = Gauge(
            "hybridlb_load_replicas", "Replicas whose latest load came from each source",
            ["source"], registry=r,
        )
        self.load_age = Gauge(
            "hybridlb_load_age_seconds", "Age of the load reading behind each weight",
            ["pool", "replica"], registry=r,
        )
        self.extproc_requests = Counter(
            "hybridlb_extproc_requests_total",
            "Requests the endpoint picker saw, by outcome (picked, or why it passed one by; "
            "ended: a picked request's stream closed, at the end of its response)",
            ["outcome"], registry=r,
        )
        self.extproc_seconds = Histogram(
            "hybridlb_extproc_decision_seconds", "Time to read a body and pick a replica",
            registry=r, buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
        )
        self.extproc_process_restarts = Counter(
            "hybridlb_extproc_process_restarts_total",
            "Times serve restarted its endpoint picker process after it exited",
            registry=r,
        )
        self.weight = Gauge(
            "hybridlb_endpoint_weight", "Endpoint weight published to Envoy",
            ["pool", "replica", "node"], registry=r,
        )


class GaugeFamily:
    """A labelled gauge set as a whole: series not in the new mapping go, the rest are reused.

    Clearing and re-labelling 10,000 replicas' series on every load reading cost the
    publisher 0.45 s (prometheus_client validates the labels of every `labels()` call).
    """

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._children: dict[tuple[str, ...], Gauge] = {}

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        for key in self._children.keys() - values.keys():
            self._gauge.remove(*key)
            del self._children[key]
        for key, value in values.items():
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._gauge.labels(*key)
            child.set(value)
