"""Show the control plane's pools, replicas, weights and connected Envoys as tables.

Reads the admin server's /debug/state; `--json` prints that document as it is.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default="http://127.0.0.1:18080",
                        help="the control plane's admin URL (default http://127.0.0.1:18080)")
    parser.add_argument("--json", action="store_true", help="print the raw /debug/state JSON")


def fetch_state(admin: str, timeout_s: float = 5.0) -> dict[str, Any]:
    url = admin.rstrip("/") + "/debug/state"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            doc: dict[str, Any] = json.load(response)
            return doc
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"cannot reach the control plane at {url}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    doc = fetch_state(args.admin)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"xDS version {doc.get('xds_version')}, state version {doc.get('state_version')}")
    for what, why in sorted((doc.get("problems") or {}).items()):
        print(f"failing: {what}: {why}")
    for pool in doc.get("pools", []):
        rows = []
        for r in pool["replicas"]:
            load = r.get("load") or {}
            rows.append([
                r["address"], r["node"], str(r["capacity"]), r["state"],
                _fmt(load.get("running")), _fmt(load.get("waiting")),
                _fmt(load.get("kv_cache_usage")), _fmt(load.get("age_s")),
                _fmt(r.get("weight")),
                _fmt((r.get("weight_inputs") or {}).get("utilization")),
            ])
        print(_table(f"pool {pool['name']}",
                     ["replica", "node", "capacity", "state", "running", "waiting", "kv",
                      "age s", "weight", "utilization"], rows, left=3))
    rows = []
    for e in doc.get("envoys", []):
        acked = " ".join(f"{t}:{v[:8]}" for t, v in sorted(e.get("acked", {}).items()) if v)
        nacked = " ".join(sorted(e.get("nacked", {})))
        keep = " ".join(f"{pool}:{per_mille / 10:.0f}%"
                        for pool, per_mille in sorted(e.get("keep_per_mille", {}).items()))
        rows.append([e["id"], e.get("node") or "(gateway)", e["protocol"],
                     str(e.get("listener_port") or "default"), keep or "-", acked,
                     nacked or "-"])
    print(_table("connected Envoys", ["id", "node", "protocol", "listener",
                                      "keeps on its node", "acked", "nacked"], rows, left=7))
    return 0


def _table(title: str, header: list[str], rows: list[list[str]], *, left: int) -> str:
    """Plain aligned columns (the runtime image carries no table library): the first `left`
    columns are names, aligned left; the rest are figures, aligned right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [f"\n{title}"]
    for cells in (header, *rows):
        lines.append("  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(cells, widths, strict=True)))
                     .rstrip())
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
