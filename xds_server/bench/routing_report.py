"""The routing benchmark's outputs: summary over repeats, JSON, markdown, PNG plots.

Every headline figure is a median over repeats with its spread, and its ratio to the oracle
measured in the same repeat; a ratio whose repeats disagree by more than its effect is marked
`~` (noise) rather than claimed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xds_server.bench import report
from xds_server.bench.routing_stats import is_noise, ratios

METRICS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
           "throughput_rps", "output_tokens_per_s", "failed", "imbalance_cv", "on_node_share",
           "full_rank_share", "client_cpu_s", "cp_cpu_s", "cross_node_requests", "cross_node_bytes")
RATIOS = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s")
BASELINE = "oracle"


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`point -> policy -> {metric: spread, ratio_to_oracle: {metric: spread + noise}}`."""
    by: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for run in runs:
        by.setdefault(run["point"], {}).setdefault(run["policy"], {})[run["repeat"]] = run
    summary: dict[str, dict[str, Any]] = {}
    for point, per_policy in by.items():
        summary[point] = {}
        oracle = per_policy.get(BASELINE, {})
        for policy, repeats in per_policy.items():
            keys = sorted(repeats)
            entry: dict[str, Any] = {
                m: report.spread([float(repeats[k].get(m, math.nan)) for k in keys])
                for m in METRICS
            }
            entry["repeats"] = len(keys)
            shared = [k for k in keys if k in oracle]
            entry["ratio_to_oracle"] = {}
            for m in RATIOS:
                r = ratios([float(repeats[k][m]) for k in shared],
                           [float(oracle[k][m]) for k in shared])
                entry["ratio_to_oracle"][m] = {**report.spread(r), "per_repeat": r,
                                               "noise": is_noise(r)}
            summary[point][policy] = entry
    return summary


def _ratio(entry: Mapping[str, Any], metric: str) -> str:
    r = entry["ratio_to_oracle"].get(metric)
    if not r or not r["n"]:
        return "n/a"
    text = report.with_spread(r, lambda v: f"{v:.2f}x")
    return f"~{text}" if r["noise"] else text


def _share(s: Mapping[str, float]) -> str:
    return report.with_spread(s, lambda v: "n/a" if math.isnan(v) else f"{v:.2f}")


def _loads(runs: Sequence[Mapping[str, Any]]) -> str:
    return report.with_spread(report.spread([float(r.get("loadavg_1m", math.nan))
                                             for r in runs]), lambda v: f"{v:.1f}")


def _cross(e: Mapping[str, Any]) -> str:
    count, size = e["cross_node_requests"], e["cross_node_bytes"]
    if math.isnan(count["median"]):
        return "n/a"
    return f"{count['median']:.0f} ({size['median'] / 1e6:.2f})"


def table(summary: Mapping[str, Any], point: str, order: Sequence[str]) -> str:
    header = ["policy", "TTFT p50", "TTFT p99", "e2e p99", "req/s", "failed", "queue CV",
              "to a full rank", "on-node", "cross-node req (MB)", "CP CPU s",
              "TTFT p50 / oracle", "TTFT p99 / oracle", "e2e p99 / oracle"]
    rows = []
    for policy in order:
        e = summary.get(point, {}).get(policy)
        if e is None:
            continue
        rows.append([
            policy, report.with_spread(e["ttft_p50_s"]), report.with_spread(e["ttft_p99_s"]),
            report.with_spread(e["e2e_p99_s"]),
            report.with_spread(e["throughput_rps"], lambda v: f"{v:.1f}"),
            report.with_spread(e["failed"], lambda v: f"{v:.0f}"),
            _share(e["imbalance_cv"]), _share(e["full_rank_share"]), _share(e["on_node_share"]),
            _cross(e),
            _share(e["cp_cpu_s"]),
            _ratio(e, "ttft_p50_s"), _ratio(e, "ttft_p99_s"), _ratio(e, "e2e_p99_s"),
        ])
    return report.markdown_table(header, rows)


def markdown(doc: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    params = doc["params"]
    order = list(doc["policies"])
    cap = doc.get("capacity", {})
    over = doc.get("client_overhead", {})
    git = doc["git"]
    lines = [
        f"# Routing benchmark: case `{doc['case']}`{' (quick)' if params['quick'] else ''}",
        "",
        f"git {git.get('commit')}{' (dirty tree)' if git.get('dirty') else ''}, "
        f"{doc['started_at']}, run time {doc.get('run_time_s', math.nan) / 60:.1f} min, "
        f"{params['repeats']} repeat(s) of {params['duration_s']:.0f} s per point, "
        f"policies interleaved (order rotated each repeat).",
        "",
        "Cells: median over repeats (min-max). Latencies are wall seconds at the simulator's "
        f"time scale {params['time_scale']} (simulated seconds = wall / {params['time_scale']}"
        ", plus the proxy and client). Ratios are per repeat against the oracle of the same "
        "repeat; `~` marks noise (repeats disagree by more than the effect).",
        "",
        "Fleet: " + ", ".join(f"{a} on {n} ({doc['fleet']['ranks'][a]} ranks)"
                              for a, n in doc["fleet"]["replicas"].items())
        + "; Envoys: " + ", ".join(f"{k} (node {v or 'none'})"
                                   for k, v in doc["fleet"]["envoys"].items()) + ".",
        "",
        f"Cross-node hop (simulated, paid by a request served off its entry's node; the "
        f"central Envoy is on no node): {params.get('hop_s', 0) * 1000:.2f} ms per request, "
        f"{params.get('hop_chunk_s', 0) * 1000:.3f} ms per streamed chunk.",
        "",
        f"Capacity (direct overload probe, every replica offered load in proportion to its "
        f"ranks): {cap.get('measured_rps', math.nan):.1f} req/s (timing-model estimate "
        f"{cap.get('model_estimate_rps', math.nan):.1f}); each point's rate is its share of it.",
        "",
        f"Machine: {doc['machine']['nproc']} cores shared with other work; 1-minute load "
        f"average during the points {_loads(doc.get('runs', []))}. Control plane restart "
        f"(start to every Envoy's ACK, plus 2 s for the first loads): "
        f"{report.with_spread(doc.get('control_plane_restart_s', {}))}.",
        "",
        f"Load generator overhead (against an instant endpoint at "
        f"{over.get('rate_rps', math.nan):.1f} req/s): TTFT p50 "
        f"{report.seconds(over.get('ttft_p50_s', math.nan))}, p99 "
        f"{report.seconds(over.get('ttft_p99_s', math.nan))}; "
        f"{over.get('cpu_s_per_request', math.nan) * 1000:.2f} ms client CPU per request.",
        "",
    ]
    rates = {r["point"]: r["offered_rps"] for r in doc.get("runs", [])}
    for point in (p["name"] for p in params["points"]):
        lines += [f"## {point} ({rates.get(point, math.nan):.1f} req/s offered)", "",
                  table(summary, point, order)]
    lines += ["## Policies", ""] + [f"- `{k}`: {v}" for k, v in doc["policies"].items()]
    lines += [f"- `{k}`: skipped ({v})" for k, v in doc["skipped_policies"].items()]
    lines += ["", "## Simulator timing model", "", "```"]
    lines += [f"{k} = {v}" for k, v in doc["timing_model"].items()] + ["```", ""]
    return "\n".join(lines)


def plot(doc: Mapping[str, Any], summary: Mapping[str, Any], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = [p for p in doc["params"]["points"] if p["kind"] == "poisson"]
    if len(sweep) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, title in ((axes[0], "ttft_p99_s", "TTFT p99"),
                                  (axes[1], "ttft_p50_s", "TTFT p50")):
            for policy in doc["policies"]:
                xs, ys, lo, hi = [], [], [], []
                for p in sweep:
                    e = summary.get(p["name"], {}).get(policy)
                    if e and e[metric]["n"]:
                        xs.append(p["load"] * 100)
                        ys.append(e[metric]["median"])
                        lo.append(e[metric]["median"] - e[metric]["min"])
                        hi.append(e[metric]["max"] - e[metric]["median"])
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=policy)
            ax.set_xlabel("load (% of measured capacity)")
            ax.set_ylabel("seconds (wall)")
            ax.set_title(f"{title} vs load (median, min-max over repeats)")
            ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    series = doc.get("series", {})
    if series:
        keys = sorted(series)
        fig, axes = plt.subplots(len(keys), 1, figsize=(10, 1.9 * len(keys)), sharex=True,
                                 squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            samples = series[key]
            addresses = sorted({a for _, s in samples for a in s})
            for address in addresses:
                ax.plot([t for t, _ in samples], [s.get(address, math.nan) for _, s in samples],
                        linewidth=0.8)
            ax.set_title(key, fontsize=9)
            ax.set_ylabel("queue/rank", fontsize=8)
        axes[-1, 0].set_xlabel("seconds into the point (one line per replica; repeat 1)")
        fig.tight_layout()
        path = out / f"{stem}-queues.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(doc: dict[str, Any], out: Path, stem: str) -> list[Path]:
    summary = summarize(doc.get("runs", []))
    doc["summary"] = summary
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    report.write_json(json_path, doc)
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(doc, summary))
    return [json_path, md_path, *plot(doc, summary, out, stem)]
