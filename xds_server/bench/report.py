"""What every benchmark writes, the same way (BENCH.md): JSON, a markdown table, progress.

Summaries are median and spread over repeats, never a single run: absolute times on a
shared 2-core machine move from run to run, so a reader needs to see by how much.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_STARTED = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, prefixed with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of one sample (e.g. per-stream times of one update)."""
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "n": len(values),
    }


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max over repeats; NaNs (a repeat that had no value) are left out."""
    kept = [v for v in values if not math.isnan(v)]
    return {
        "median": percentile(kept, 50),
        "min": min(kept) if kept else math.nan,
        "max": max(kept) if kept else math.nan,
        "n": len(kept),
    }


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """HEAD and whether the working tree differs from it (results of a dirty tree say so)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def seconds(value: float) -> str:
    """A duration for a table: ms below a second, s above; 'n/a' when unknown."""
    if math.isnan(value):
        return "n/a"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def milliseconds(value: float) -> str:
    """A sub-millisecond-sensitive duration: '0.36 ms' (for costs well under a second)."""
    if math.isnan(value):
        return "n/a"
    return f"{value * 1000:.2f} ms"


def size(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def with_spread(s: Mapping[str, float], fmt: Any = seconds) -> str:
    """'median (min-max)' of a `spread()`."""
    if not s.get("n"):
        return "n/a"
    if s["n"] == 1:
        return str(fmt(s["median"]))
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"
