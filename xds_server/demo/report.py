"""The demo's results: counts and latencies (`summarize`), `summary.json`, the plot, tables.

`summarize` is pure (results and samples in, a JSON-ready dict out) so that the live view and
the final summary count the same way.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from xds_server.demo.monitor import Sample
from xds_server.workload import Result, percentile


def latency(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": _round(percentile(values, q / 100)) for q in (50, 90, 99)}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(
    results: Sequence[Result],
    *,
    replicas: Mapping[str, str],
    envoys: Mapping[str, str],
    samples: Sequence[Sample] = (),
) -> dict[str, Any]:
    """Counts per run, replica and Envoy. `replicas`: address -> node; `envoys`: name -> node.

    A request is `cancelled` when the demo abandoned it (a second Ctrl-C), `failed` when it
    got an error or an incomplete stream; `sent` is their sum with `succeeded`.
    """
    ok = [r for r in results if r.ok]
    cancelled = [r for r in results if r.error == "cancelled"]
    by_replica: dict[str, dict[str, Any]] = {
        address: {"node": node, "sent": 0, "succeeded": 0, "failed": 0, "share": 0.0,
                  "ranks": Counter[int]()}
        for address, node in replicas.items()
    }
    for r in results:
        if not r.replica or r.error == "cancelled":
            continue
        entry = by_replica.setdefault(r.replica, {"node": "?", "sent": 0, "succeeded": 0,
                                                  "failed": 0, "share": 0.0,
                                                  "ranks": Counter[int]()})
        entry["sent"] += 1
        entry["succeeded" if r.ok else "failed"] += 1
        if r.ok and r.rank is not None:
            entry["ranks"][r.rank] += 1
    for entry in by_replica.values():
        entry["share"] = round(entry["succeeded"] / len(ok), 4) if ok else 0.0
        entry["ranks"] = {str(k): v for k, v in sorted(entry["ranks"].items())}

    by_envoy: dict[str, dict[str, Any]] = {}
    for name, node in envoys.items():
        mine = [r for r in results if r.arrival.entry == name]
        served = [r for r in mine if r.ok]
        local = sum(1 for r in served if replicas.get(r.replica) == node)
        keeps = [k for s in samples if (k := s.keep.get(name)) is not None]
        by_envoy[name] = {
            "node": node,
            "sent": len(mine),
            "succeeded": len(served),
            "failed": sum(1 for r in mine if not r.ok and r.error != "cancelled"),
            "cancelled": sum(1 for r in mine if r.error == "cancelled"),
            # A central Envoy has no node of its own: nothing is local to it.
            "local_share": round(local / len(served), 4) if node and served else None,
            "keep_per_mille_mean": round(sum(keeps) / len(keeps), 1) if keeps else None,
            "keep_per_mille_min": min(keeps) if keeps else None,
            "ttft_s": latency([r.ttft_s for r in served if r.ttft_s is not None]),
        }
    node_served = [r for r in ok if envoys.get(r.arrival.entry)]
    local_all = sum(1 for r in node_served if replicas.get(r.replica) == envoys[r.arrival.entry])
    span = max((r.sent_s + (r.e2e_s or 0.0) for r in results), default=0.0)
    errors = Counter(r.error for r in results if r.error and r.error != "cancelled")
    return {
        "sent": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok) - len(cancelled),
        "cancelled": len(cancelled),
        "burst_requests": sum(1 for r in results if r.arrival.burst),
        # Served requests whose replica the endpoint picker chose (0 with --no-extproc).
        "picked": sum(1 for r in ok if r.picked),
        "throughput_rps": round(len(ok) / span, 3) if span else 0.0,
        "ttft_s": latency([r.ttft_s for r in ok if r.ttft_s is not None]),
        "e2e_s": latency([r.e2e_s for r in ok if r.e2e_s is not None]),
        "prompt_tokens": sum(r.arrival.prompt_tokens for r in ok),
        "output_tokens": sum(r.arrival.output_tokens for r in ok),
        "local_share": round(local_all / len(node_served), 4) if node_served else None,
        "replicas": by_replica,
        "envoys": by_envoy,
        "errors": dict(errors.most_common(10)),
    }


def write_json(path: Path, summary: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def plot(
    path: Path,
    samples: Sequence[Sample],
    *,
    replicas: Mapping[str, str],
    envoys: Mapping[str, str],
    burst: tuple[float, float] | None,
    title: str,
) -> None:
    """Queue depth, published weight and keep share over time, one line per replica/Envoy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted(set(replicas.values()))
    colors = plt.get_cmap("tab10")
    color = {node: colors(i % 10) for i, node in enumerate(nodes)}
    styles = ["-", "--", ":", "-."]
    fig, (queue_ax, weight_ax, keep_ax) = plt.subplots(
        3, 1, sharex=True, figsize=(8, 7.5), height_ratios=[3, 2, 1.4])
    times = [s.t_s for s in samples]
    seen: Counter[str] = Counter()
    for address, node in replicas.items():
        style = styles[seen[node] % len(styles)]
        seen[node] += 1
        points = [(s.t_s, s.replicas.get(address)) for s in samples]
        depth = [p.running + p.waiting if p else None for _, p in points]
        weight = [p.weight if p else None for _, p in points]
        label = f"{node} {address.rsplit(':', 1)[-1]}"
        queue_ax.plot(times, depth, style, color=color[node], label=label, linewidth=1.3)
        weight_ax.plot(times, weight, style, color=color[node], label=label, linewidth=1.3)
    for name, node in envoys.items():
        if not node:
            continue
        keep_ax.plot(times, [s.keep.get(name) for s in samples], color=color.get(node, "k"),
                     label=name, linewidth=1.3)
    queue_ax.set_ylabel("requests on replica\n(running + waiting)")
    weight_ax.set_ylabel("endpoint weight")
    keep_ax.set_ylabel("kept on node\n(per mille)")
    keep_ax.set_xlabel("seconds")
    keep_ax.set_ylim(-30, 1030)
    queue_ax.legend(fontsize=7, ncol=3, loc="upper left")
    keep_ax.legend(fontsize=7, ncol=4, loc="lower left")
    for ax in (queue_ax, weight_ax, keep_ax):
        ax.grid(alpha=0.3)
        if burst is not None:
            ax.axvspan(burst[0], burst[1], color="orange", alpha=0.15,
                       label="burst" if ax is weight_ax else None)
    if burst is not None:
        weight_ax.legend(handles=[h for h in weight_ax.get_legend_handles_labels()[0]
                                  if h.get_label() == "burst"], fontsize=7, loc="upper left")
    queue_ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    # A few flat colours on white: a 64-colour palette looks the same at a quarter of the
    # bytes, which matters for a plot committed to the repository.
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)


def tables(summary: Mapping[str, Any]) -> Group:
    """The final summary for the terminal."""
    replicas = Table(title="replicas", title_justify="left")
    for column in ("replica", "node", "served", "failed", "share", "by rank"):
        replicas.add_column(column, justify="left" if column in ("replica", "node") else "right")
    for address, r in summary["replicas"].items():
        ranks = " ".join(f"{k}:{v}" for k, v in r["ranks"].items())
        replicas.add_row(address, r["node"], str(r["succeeded"]), str(r["failed"]),
                         f"{r['share']:.1%}", ranks)
    envoys = Table(title="Envoys", title_justify="left")
    for column in ("envoy", "node", "sent", "ok", "failed", "local share", "keep (mean/min)",
                   "TTFT p50", "TTFT p99"):
        envoys.add_column(column, justify="left" if column in ("envoy", "node") else "right")
    for name, e in summary["envoys"].items():
        keep = ("-" if e["keep_per_mille_mean"] is None
                else f"{e['keep_per_mille_mean']:.0f}/{e['keep_per_mille_min']}")
        envoys.add_row(name, e["node"] or "(central)", str(e["sent"]), str(e["succeeded"]),
                       str(e["failed"]), _pct(e["local_share"]), keep,
                       _ms(e["ttft_s"]["p50"]), _ms(e["ttft_s"]["p99"]))
    totals = Table.grid(padding=(0, 2))
    totals.add_row(
        f"sent {summary['sent']}", f"succeeded {summary['succeeded']}",
        f"failed {summary['failed']}", f"cancelled {summary['cancelled']}",
        f"{summary['throughput_rps']:.1f} req/s",
        f"TTFT p50 {_ms(summary['ttft_s']['p50'])} p99 {_ms(summary['ttft_s']['p99'])}",
        f"local {_pct(summary['local_share'])}",
    )
    return Group(replicas, envoys, totals)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"
