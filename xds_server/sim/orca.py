"""ORCA load reports in a response header, as vLLM's OpenAI server sends them.

vLLM (vllm/entrypoints/openai/orca_metrics.py, `metrics_header`) answers a request that
carries `endpoint-load-metrics-format: TEXT|JSON` (either case; anything else: no header)
with an `endpoint-load-metrics` response header holding two named metrics read from its
Prometheus registry, each the registry's FIRST sample (so in hybrid mode, the first engine's
value, not a sum over ranks):

    endpoint-load-metrics: TEXT named_metrics.num_requests_waiting=3.0,
                                named_metrics.kv_cache_usage_perc=0.4      (one line)
    endpoint-load-metrics: JSON {"named_metrics": {"num_requests_waiting": 3.0,
                                                   "kv_cache_usage_perc": 0.4}}

Nothing else: no qps, no rps_fractional, no cpu or application utilization. Only
non-streaming, successful completion and chat responses carry it (its API router adds the
header to the JSONResponse; a StreamingResponse and an error get none).
"""

from __future__ import annotations

import json

FORMAT_HEADER = "endpoint-load-metrics-format"
REPORT_HEADER = "endpoint-load-metrics"


def orca_header(requested: str, *, num_requests_waiting: int,
                kv_cache_usage_perc: float) -> dict[str, str]:
    """The response header for a request's `endpoint-load-metrics-format` value ({} if none)."""
    kind = requested.lower()
    if kind not in ("text", "json"):
        return {}
    # vLLM reports Prometheus sample values: floats (Python's repr, `3.0`).
    metrics = {"num_requests_waiting": float(num_requests_waiting),
               "kv_cache_usage_perc": float(kv_cache_usage_perc)}
    if kind == "text":
        text = ", ".join(f"named_metrics.{name}={value}" for name, value in metrics.items())
        return {REPORT_HEADER: f"TEXT {text}"}
    return {REPORT_HEADER: f"JSON {json.dumps({'named_metrics': metrics})}"}
