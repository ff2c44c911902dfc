"""The routing benchmark's arithmetic, kept pure so its tests need no fleet.

Queue imbalance is the coefficient of variation across replicas of each replica's
running + waiting requests per rank (a 4-rank replica with 4 requests is as busy as a 2-rank
one with 2), sampled over time and averaged over the samples where anything was queued: an
idle fleet is not "balanced", it says nothing.

A comparison is noise when its repeats disagree by more than the effect it would claim
(BENCH.md rule 7): the spread (max - min) of the per-repeat ratios against the baseline is
larger than the distance of their median from 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xds_server.bench.report import percentile, spread
from xds_server.workload import Result


def cv(values: Sequence[float]) -> float | None:
    """Population standard deviation over mean; None when the mean is 0 (nothing queued)."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if mean <= 0:
        return None
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(variance) / mean


def per_rank_depths(states: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`address -> (running + waiting) / ranks` from each replica's `/sim/state`."""
    depths: dict[str, float] = {}
    for address, state in states.items():
        ranks = state.get("ranks") or []
        if ranks:
            queued = sum(int(r["running"]) + int(r["waiting"]) for r in ranks)
            depths[address] = queued / len(ranks)
    return depths


def mean_cv(samples: Iterable[Mapping[str, float]]) -> float:
    """Mean over time of the CV across replicas; NaN when no sample had anything queued."""
    cvs = [c for c in (cv(list(s.values())) for s in samples) if c is not None]
    return sum(cvs) / len(cvs) if cvs else math.nan


def on_node_share(results: Iterable[Result], entry_nodes: Mapping[str, str],
                  replica_nodes: Mapping[str, str]) -> float:
    """Share of served requests that entered through a node's Envoy and stayed on that node.

    Requests through an Envoy on no node (`entry_nodes` has no entry, or an empty one) have
    no "local" and are left out; so are requests with no replica (they failed before one).
    """
    local = total = 0
    for result in results:
        node = entry_nodes.get(result.arrival.entry, "")
        served_on = replica_nodes.get(result.replica, "")
        if not node or not served_on:
            continue
        total += 1
        local += served_on == node
    return local / total if total else math.nan


def picked_share(results: Iterable[Result]) -> float:
    """Share of served requests whose replica the endpoint picker chose (the rest: Envoy's
    balancer, with no picker or where the picker failed open); NaN when none was served."""
    served = [r for r in results if r.replica]
    return sum(r.picked for r in served) / len(served) if served else math.nan


def full_rank_share(results: Iterable[Result], room: int) -> float:
    """Share of served requests sent to a rank that already had `room` requests in flight,
    by the client's own send-to-end times of the others on that rank: the requests that met
    no free slot there, the queueing a router avoids while another rank has one. Only served
    requests with a known rank count; NaN when there are none."""
    spans: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in results:
        if r.ok and r.rank is not None and r.e2e_s is not None:
            spans.setdefault((r.replica, r.rank), []).append((r.sent_s, r.sent_s + r.e2e_s))
    full = total = 0
    for rank in spans.values():
        rank.sort()
        for i, (sent, _end) in enumerate(rank):
            total += 1
            full += sum(1 for _s, end in rank[:i] if end > sent) >= room
    return full / total if total else math.nan


def cross_node(results: Iterable[Result], origins: Mapping[str, str],
               replica_nodes: Mapping[str, str]) -> dict[str, int]:
    """Served requests that crossed nodes (entry's node != replica's) and their bytes."""
    requests = size = 0
    for result in results:
        served_on = replica_nodes.get(result.replica, "")
        if served_on and origins.get(result.arrival.entry, "") != served_on:
            requests += 1
            size += result.bytes
    return {"cross_node_requests": requests, "cross_node_bytes": size}


def node_depth_ratio(samples: Iterable[Mapping[str, float]], replica_nodes: Mapping[str, str],
                     node: str) -> float:
    """`node`'s requests per rank over the other nodes', each the mean over their replicas
    of the sampler's per-rank depths, summed over the point's samples (a ratio of time
    averages): how much fuller a hot entry's node runs than the rest. NaN when the others
    never held a request."""
    here = there = 0.0
    for sample in samples:
        mine = [d for a, d in sample.items() if replica_nodes.get(a) == node]
        rest = [d for a, d in sample.items() if replica_nodes.get(a, node) != node]
        if mine and rest:
            here += sum(mine) / len(mine)
            there += sum(rest) / len(rest)
    return here / there if there > 0 else math.nan


def latency(results: Sequence[Result], window_s: float) -> dict[str, float]:
    """TTFT and end-to-end p50/p90/p99 of the successful requests, throughput, failures.

    Throughput is successful requests (and generated tokens) per second of the window the
    arrivals were planned over, which is what an open-loop client offered.
    """
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    doc: dict[str, float] = {"requests": len(results), "ok": len(ok),
                             "failed": len(results) - len(ok)}
    for name, values in (("ttft", ttft), ("e2e", e2e)):
        for q in (50, 90, 99):
            doc[f"{name}_p{q}_s"] = percentile(values, q)
    doc["throughput_rps"] = len(ok) / window_s if window_s > 0 else math.nan
    doc["output_tokens_per_s"] = (sum(r.arrival.output_tokens for r in ok) / window_s
                                  if window_s > 0 else math.nan)
    return doc


def is_noise(ratios: Sequence[float]) -> bool:
    """True when the repeats' ratios spread wider than their median's distance from 1.

    A single repeat cannot show its own noise, so it is flagged as well.
    """
    kept = [r for r in ratios if not math.isnan(r)]
    if len(kept) < 2:
        return True
    s = spread(kept)
    return (s["max"] - s["min"]) > abs(s["median"] - 1.0)


def ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-repeat ratios of a figure to the baseline's figure in the same repeat."""
    return [v / b if b and not math.isnan(b) and not math.isnan(v) else math.nan
            for v, b in zip(values, baseline, strict=True)]
