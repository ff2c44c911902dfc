"""Reading vLLM's own metrics: the names, and parsing one server's /metrics text.

vLLM's V1 engine labels every engine metric with `model_name` and `engine` (the global DP
rank); a hybrid-mode API server reports all its local ranks on one /metrics. The loads
that matter for balancing are the gauges below; older vLLM versions called the KV-cache
gauge `vllm:gpu_cache_usage_perc`. The output-token counter is read too: over two readings
it gives a replica's decode speed (scrape.py), the direct measure of a slow GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from xds_server.model import RankLoad

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_LEGACY = "vllm:gpu_cache_usage_perc"
#: A counter: prometheus_client exposes `vllm:generation_tokens` with the `_total` suffix.
GENERATION_TOKENS = "vllm:generation_tokens_total"
_WANTED = {RUNNING, WAITING, KV_USAGE, KV_USAGE_LEGACY, GENERATION_TOKENS}
_WANTED_PREFIXES = tuple(_WANTED)


class MetricsTextError(ValueError):
    """The body is not usable Prometheus text with vLLM's load gauges."""


@dataclass(frozen=True)
class Reading:
    """One server's /metrics: its engines' loads and their output tokens so far."""

    ranks: list[RankLoad]
    #: vLLM's output-token counter summed over `ranks`; None unless each of them has a
    #: usable one (an unknown speed, never an error for the load).
    generation_tokens: float | None = None


def parse_metrics(text: str) -> Reading:
    """Per-engine running, waiting, KV use and output tokens; raises MetricsTextError when
    unusable.

    A NaN, infinite or negative gauge makes that engine's reading unusable (it is left
    out); a body with no engine left is an error, so that the caller counts it once.
    """
    values: dict[str, dict[str, float]] = {}
    # A vLLM /metrics is hundreds of histogram lines; the parser (pure Python) need only see
    # the gauges and the token counter. A line is kept when it starts with a wanted name and
    # then a label set or a space, so `vllm:num_requests_running_x` is not mistaken for it.
    wanted = "\n".join(
        line for line in text.splitlines()
        if line.startswith(_WANTED_PREFIXES) and line.split("{", 1)[0].split(" ", 1)[0]
        in _WANTED
    )
    try:
        for family in text_string_to_metric_families(wanted):
            for sample in family.samples:
                if sample.name not in _WANTED:
                    continue
                engine = sample.labels.get("engine", "0")
                values.setdefault(engine, {})[sample.name] = float(sample.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsTextError(f"not Prometheus text: {exc}") from exc
    loads: list[RankLoad] = []
    bad: list[str] = []
    for engine, got in sorted(values.items()):
        running, waiting = got.get(RUNNING), got.get(WAITING)
        if running is None or waiting is None:
            bad.append(f"engine {engine}: missing {RUNNING if running is None else WAITING}")
            continue
        if not (_valid(running) and _valid(waiting)):
            bad.append(f"engine {engine}: running={running} waiting={waiting}")
            continue
        kv = got.get(KV_USAGE, got.get(KV_USAGE_LEGACY))
        loads.append(RankLoad(engine, running, waiting, kv if kv is not None and _valid(kv)
                              else None))
    if not loads:
        raise MetricsTextError("; ".join(bad) or f"no {RUNNING} / {WAITING} series")
    tokens = [values[r.engine].get(GENERATION_TOKENS, math.nan) for r in loads]
    return Reading(loads, sum(tokens) if all(_valid(t) for t in tokens) else None)


def _valid(value: float) -> bool:
    return math.isfinite(value) and value >= 0
