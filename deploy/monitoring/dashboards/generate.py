"""Generate the Grafana dashboards (JSON) of the fleet and of the control plane.

Why generated rather than exported from Grafana: every panel's query is written once here,
with the same label filter for every panel, so a renamed metric or label is one edit; the JSON
stays reviewable in a diff; and the tests read the JSON this writes, substitute the variables
and run every query against a real Prometheus that scraped a real stack, so a dashboard cannot
silently show "No data". The dashboards' structure (panels, targets, variables, the grid
layout) comes from Grafana's own typed builders, grafana-foundation-sdk (the `test` extra);
this file only says what to show.

    python deploy/monitoring/dashboards/generate.py          # rewrite the JSON files
    python deploy/monitoring/dashboards/generate.py --check  # exit 1 if they are stale

Variables every dashboard has: `datasource` (a Prometheus), `pool` and `node` (multi-value,
"All" = `.*`). Series labels the scrape configs add (deploy/monitoring, deploy/prometheus):
`instance` (podIP:port), `pod`, `node`; vLLM's series also `pool`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

HERE = Path(__file__).parent
DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
#: vLLM's series of the selected pools and nodes.
VLLM = 'pool=~"$pool", node=~"$node"'
#: The control plane's per-replica series of the selected pools and nodes.
WEIGHT = 'hybridlb_endpoint_weight{pool=~"$pool", node=~"$node"}'
# Each control-plane replica exports the same weights: one value per endpoint.
WEIGHT_PER_ENDPOINT = f"max by (pool, node, replica, rank) ({WEIGHT})"
# Envoy's per-cluster request counters; `POOL/node/NODE` are the node-local clusters, `POOL`
# and `POOL/pinned` the whole pool. Requests through the aggregate `POOL/prefer/NODE` count
# on the member cluster that served them (Envoy 1.40), so local + global is the total.
ENVOY_LOCAL = 'envoy_cluster_upstream_rq_total{envoy_cluster_name=~"$pool/node/.+", node=~"$node"}'
ENVOY_ALL = (
    'envoy_cluster_upstream_rq_total{envoy_cluster_name=~"$pool(/node/.+|/pinned)?", '
    'node=~"$node"}'
)
ENVOY_GLOBAL = (
    'envoy_cluster_upstream_rq_total{envoy_cluster_name=~"$pool(/pinned)?", node=~"$node"}'
)


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    width: int = 12
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel]


def _variable(name: str, label: str, query: str) -> dashboard_builder.QueryVariable:
    return (dashboard_builder.QueryVariable(name).label(label).datasource(DS)
            .query({"query": query, "refId": name})
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(model.VariableOption(selected=True, text=["All"], value=["$__all"])))


def _dashboard(uid: str, title: str, description: str, rows: list[Row]) -> dict[str, Any]:
    board = (dashboard_builder.Dashboard(title).uid(uid).description(description)
             .tags(["hybridlb", "vllm", "envoy"]).timezone("browser").editable()
             .refresh("10s").time("now-1h", "now")
             .with_variable(dashboard_builder.DatasourceVariable("datasource")
                            .label("Prometheus").type("prometheus"))
             .with_variable(_variable("pool", "Pool", "label_values(hybridlb_replicas, pool)"))
             .with_variable(_variable(
                 "node", "Node", 'label_values(hybridlb_endpoint_weight{pool=~"$pool"}, node)')))
    for row in rows:
        board = board.with_row(dashboard_builder.Row(row.title))
        for panel in row.panels:
            board = board.with_panel(_timeseries(panel))
    built = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    # Grafana gives a panel without an id one when it loads the dashboard, but links and
    # the "view panel" URL use them: fixed ids, in order.
    for panel_id, panel in enumerate(built["panels"], start=1):
        panel["id"] = panel_id
    return dict(built)


def _timeseries(panel: Panel) -> timeseries.Panel:
    built = (timeseries.Panel().title(panel.title).description(panel.description)
             .datasource(DS).span(panel.width).height(8).unit(panel.unit)
             .line_width(1).fill_opacity(40 if panel.stack else 10)
             .show_points(common.VisibilityMode.NEVER)
             .legend(common_builder.VizLegendOptions()
                     .display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builder.VizTooltipOptions()
                      .mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)))
    if panel.stack:
        built = built.stacking(common_builder.StackingConfig()
                               .mode(common.StackingMode.NORMAL).group("A"))
    for i, (expr, legend) in enumerate(panel.targets):
        built = built.with_target(prometheus.Dataquery().ref_id(chr(ord("A") + i))
                                  .datasource(DS).expr(expr).legend_format(legend).range())
    return built


def fleet() -> dict[str, Any]:
    """Queues, KV cache, weights, requests and routing of the vLLM fleet."""
    f = VLLM
    quantile = "histogram_quantile({q}, sum by (node, instance, le) (rate({m}_bucket{{{f}}}[{r}])))"
    rows = [
        Row("Queues", [
            Panel("Waiting requests per replica",
                  "vllm:num_requests_waiting summed over the replica's DP ranks: requests no "
                  "rank has room for. Balanced routing keeps these flat and low.",
                  [(f"sum by (node, instance) (vllm:num_requests_waiting{{{f}}})",
                    "{{node}} {{instance}}")]),
            Panel("Running requests per replica",
                  "vllm:num_requests_running summed over the replica's DP ranks.",
                  [(f"sum by (node, instance) (vllm:num_requests_running{{{f}}})",
                    "{{node}} {{instance}}")]),
            Panel("Queue depth per node (running + waiting)",
                  "Every rank on the node; the control plane weighs nodes by this headroom.",
                  [(f"sum by (node) (vllm:num_requests_running{{{f}}}) + "
                    f"sum by (node) (vllm:num_requests_waiting{{{f}}})", "{{node}}")]),
            Panel("Waiting requests per DP rank",
                  "Per engine (vLLM's global DP rank): a hybrid-mode replica fronts several.",
                  [(f"sum by (node, instance, engine) (vllm:num_requests_waiting{{{f}}})",
                    "{{node}} {{instance}} rank {{engine}}")]),
        ]),
        Row("KV cache", [
            Panel("KV-cache use per replica", "vllm:kv_cache_usage_perc, mean of the ranks.",
                  [(f"avg by (node, instance) (vllm:kv_cache_usage_perc{{{f}}})",
                    "{{node}} {{instance}}")], unit="percentunit"),
            Panel("KV-cache use per node", "vllm:kv_cache_usage_perc, mean of the node's ranks.",
                  [(f"avg by (node) (vllm:kv_cache_usage_perc{{{f}}})", "{{node}}")],
                  unit="percentunit"),
        ]),
        Row("Weights", [
            Panel("Endpoint weight per replica",
                  "The weight the control plane publishes to Envoy (EDS), from free capacity. "
                  "`rank` is set for per-rank endpoints.",
                  [(WEIGHT_PER_ENDPOINT, "{{node}} {{replica}} {{rank}}")]),
            Panel("Weight per node",
                  "Sum of the node's endpoint weights: how the global cluster splits by node.",
                  [(f"sum by (node) ({WEIGHT_PER_ENDPOINT})", "{{node}}")], stack=True),
        ]),
        Row("Requests", [
            Panel("Requests finished per replica",
                  "rate(vllm:request_success_total), every finished_reason.",
                  [(f"sum by (node, instance) (rate(vllm:request_success_total{{{f}}}[{RATE}]))",
                    "{{node}} {{instance}}")], unit="reqps", stack=True),
            Panel("Time to first token per replica (p50, p95)",
                  "From vllm:time_to_first_token_seconds; queueing shows here first.",
                  [(quantile.format(q="0.5", m="vllm:time_to_first_token_seconds", f=f, r=RATE),
                    "p50 {{node}} {{instance}}"),
                   (quantile.format(q="0.95", m="vllm:time_to_first_token_seconds", f=f, r=RATE),
                    "p95 {{node}} {{instance}}")], unit="s"),
            Panel("Queue time per replica (p95)",
                  "vllm:request_queue_time_seconds: time spent waiting for a rank.",
                  [(quantile.format(q="0.95", m="vllm:request_queue_time_seconds", f=f, r=RATE),
                    "{{node}} {{instance}}")], unit="s"),
            Panel("Generated tokens per node",
                  "rate(vllm:generation_tokens_total): the work each node does.",
                  [(f"sum by (node) (rate(vllm:generation_tokens_total{{{f}}}[{RATE}]))",
                    "{{node}}")], stack=True),
        ]),
        Row("Envoy routing", [
            Panel("Requests per Envoy: node-local vs whole-pool clusters",
                  "Envoy's upstream requests on the node-local clusters (POOL/node/NODE) and on "
                  "the whole-pool clusters (POOL, POOL/pinned). A node Envoy keeps requests "
                  "local while its node has room; a gateway Envoy uses only the pool cluster. "
                  "The pool cluster may still pick a replica on the Envoy's own node.",
                  [(f"sum by (pod) (rate({ENVOY_LOCAL}[{RATE}]))", "{{pod}} local"),
                   (f"sum by (pod) (rate({ENVOY_GLOBAL}[{RATE}]))", "{{pod}} pool")],
                  unit="reqps", stack=True),
            Panel("Local share per Envoy",
                  "Node-local clusters' share of the Envoy's upstream requests (1: nothing "
                  "spilled to the whole pool).",
                  [(f"sum by (pod) (rate({ENVOY_LOCAL}[{RATE}])) / "
                    f"sum by (pod) (rate({ENVOY_ALL}[{RATE}]))", "{{pod}}")],
                  unit="percentunit"),
            Panel("Responses per Envoy by status class",
                  "Downstream responses of the hybridlb listener (every pool).",
                  [("sum by (pod, envoy_response_code_class) (rate(envoy_http_downstream_rq_xx"
                    f'{{envoy_http_conn_manager_prefix="hybridlb", node=~"$node"}}[{RATE}]))',
                    "{{pod}} {{envoy_response_code_class}}xx")], unit="reqps"),
        ]),
    ]
    return _dashboard(
        "hybridlb-fleet", "vLLM Hybrid LB: fleet",
        "Queue depth and KV use per replica and node, published weights, requests and time "
        "to first token, and how each Envoy splits local and spilled traffic.",
        rows,
    )


def control_plane() -> dict[str, Any]:
    """The control plane's own health: streams, pushes, NACKs, snapshots, loads, picks."""
    build = ("histogram_quantile({q}, "
             "sum by (le) (rate(hybridlb_snapshot_build_seconds_bucket[{r}])))")
    decide = ("histogram_quantile({q}, "
              "sum by (le) (rate(hybridlb_extproc_decision_seconds_bucket[{r}])))")
    rows = [
        Row("xDS", [
            Panel("Connected Envoys per control plane",
                  "Open ADS streams by protocol (sotw, delta). Envoys spread over the replicas "
                  "as connections reach their maximum age.",
                  [("sum by (pod, protocol) (hybridlb_xds_streams)", "{{pod}} {{protocol}}")],
                  stack=True),
            Panel("Pushes by type", "xDS responses sent, per resource type.",
                  [(f"sum by (type) (rate(hybridlb_xds_pushes_total[{RATE}]))", "{{type}}")],
                  unit="ops"),
            Panel("Push bytes by type", "Bytes of xDS responses sent, per resource type.",
                  [(f"sum by (type) (rate(hybridlb_xds_push_bytes_total[{RATE}]))", "{{type}}")],
                  unit="Bps"),
            Panel("ACKs and NACKs",
                  "A NACK is a config Envoy rejected (it keeps its last good one); "
                  "/debug/state shows Envoy's error.",
                  [(f"sum by (type) (rate(hybridlb_xds_acks_total[{RATE}]))", "ACK {{type}}"),
                   (f"sum by (pod, type) (increase(hybridlb_xds_nacks_total[{RATE}]))",
                    "NACK {{pod}} {{type}}")]),
        ]),
        Row("Snapshots", [
            Panel("Snapshot build latency (p50, p99)",
                  "Build and serialize one snapshot after a state change.",
                  [(build.format(q="0.5", r=RATE), "p50"), (build.format(q="0.99", r=RATE), "p99")],
                  unit="s"),
            Panel("Snapshots built", "Snapshots per second: state changes worth a push.",
                  [(f"sum by (pod) (rate(hybridlb_snapshots_total[{RATE}]))", "{{pod}}")],
                  unit="ops"),
            Panel("Snapshot version per control plane",
                  "Replicas build from the same inputs; a replica stuck behind shows here.",
                  [("max by (pod) (hybridlb_snapshot_version)", "{{pod}}")]),
            Panel("Resources in the snapshot", "Clusters, endpoint sets, listeners, routes.",
                  [("max by (type) (hybridlb_xds_resources)", "{{type}}")]),
        ]),
        Row("Discovery and loads", [
            Panel("Replicas by state", "Discovered replicas per pool: ready, draining, ...",
                  [('max by (pool, state) (hybridlb_replicas{pool=~"$pool"})',
                    "{{pool}} {{state}}")]),
            Panel("Load age (metric staleness)",
                  "Age of the load reading behind each weight; past --stale-after-s it is "
                  "doubted and the pool mean stands in.",
                  [('max by (pool, replica) (hybridlb_load_age_seconds{pool=~"$pool"})',
                    "{{pool}} {{replica}}")], unit="s"),
            Panel("Replicas by load source",
                  "Where the latest loads came from (prometheus, scrape).",
                  [("max by (source) (hybridlb_load_replicas)", "{{source}}")]),
            Panel("Load errors", "Failed load readings by source and reason.",
                  [(f"sum by (source, reason) (rate(hybridlb_load_errors_total[{RATE}]))",
                    "{{source}} {{reason}}")], unit="ops"),
            Panel("Endpoint weight per node",
                  "Sum of the published endpoint weights on each node.",
                  [(f"sum by (node) ({WEIGHT_PER_ENDPOINT})", "{{node}}")], stack=True),
        ]),
        Row("Endpoint picker", [
            Panel("Picker requests by outcome",
                  "What the ext_proc picker did with each request: picked, ended (a picked "
                  "request's response closed), or why it passed one by to Envoy's weights "
                  "(no pool, no candidate, a body it could not read, ...).",
                  [(f"sum by (outcome) (rate(hybridlb_extproc_requests_total[{RATE}]))",
                    "{{outcome}}")], unit="ops", stack=True),
            Panel("Picker decision time (p50, p99)",
                  "Reading a request's body and picking a replica; Envoy fails open to the "
                  "weights past --extproc-timeout-s.",
                  [(decide.format(q="0.5", r=RATE), "p50"),
                   (decide.format(q="0.99", r=RATE), "p99")], unit="s"),
        ]),
    ]
    return _dashboard(
        "hybridlb-control-plane", "vLLM Hybrid LB: control plane",
        "Connected Envoys, xDS pushes and NACKs, snapshot builds, the freshness of the "
        "loads behind the weights, and the endpoint picker's outcomes and decision time.",
        rows,
    )


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "hybridlb-fleet.json": fleet, "hybridlb-control-plane.json": control_plane}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a file differs from what would be written")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write to")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
