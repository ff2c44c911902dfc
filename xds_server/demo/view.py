"""The live terminal view: what each replica holds, what it weighs, where requests went.

Rendered from plain inputs (the monitor's latest sample, the requests so far) twice a
second; it reads nothing itself, so a slow endpoint can never freeze the screen.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from xds_server.demo.monitor import Sample
from xds_server.workload import Result, percentile

#: Window of the rate, the recent shares and the recent TTFT.
RECENT_S = 10.0
RATE_WINDOW_S = 5.0


@dataclass(frozen=True)
class Frame:
    """Everything one refresh shows."""

    elapsed_s: float
    duration_s: float
    phase: str
    metrics_source: str
    time_scale: float
    slots_per_replica: int
    replicas: Mapping[str, str]
    envoys: Mapping[str, str]
    sample: Sample | None
    results: Sequence[Result]
    sent_by_entry: Mapping[str, int]
    in_flight: int
    #: Planned send times, in order: the offered rate comes from them.
    arrival_times: Sequence[float] = ()


def render(frame: Frame) -> RenderableType:
    now = frame.elapsed_s
    done = list(frame.results)
    recent = [r for r in done if r.sent_s + (r.e2e_s or 0) >= now - RECENT_S]
    header = Text.assemble(
        ("hybridlb demo ", "bold"),
        f"{now:5.1f} s / {frame.duration_s:.0f} s  ",
        (frame.phase, "bold magenta" if "burst" in frame.phase else "bold"),
        f"\nloads from {frame.metrics_source}; simulated GPUs at 1/{frame.time_scale:g} of "
        "an H100's speed",
    )
    return Group(header, _replicas(frame, done, recent), _envoys(frame, done, recent),
                 _totals(frame, done, recent))


def _replicas(frame: Frame, done: Sequence[Result], recent: Sequence[Result]) -> Table:
    table = Table(title="replicas (queue: ■ running, □ waiting)", title_justify="left",
                  expand=False)
    for column in ("replica", "node", "queue", "run", "wait", "weight", "served",
                   "share", "share 10 s"):
        table.add_column(column, justify="left" if column in ("replica", "node", "queue")
                         else "right", no_wrap=True)
    served = Counter(r.replica for r in done if r.ok)
    served_recent = Counter(r.replica for r in recent if r.ok)
    total, total_recent = sum(served.values()), sum(served_recent.values())
    for address, node in frame.replicas.items():
        s = frame.sample.replicas.get(address) if frame.sample else None
        table.add_row(
            address, node, _bar(s.running, s.waiting, frame.slots_per_replica) if s else "",
            _num(s.running if s else None), _num(s.waiting if s else None),
            _num(s.weight if s else None), str(served[address]),
            _pct(served[address] / total if total else None),
            _pct(served_recent[address] / total_recent if total_recent else None),
        )
    return table


def _envoys(frame: Frame, done: Sequence[Result], recent: Sequence[Result]) -> Table:
    table = Table(title="Envoys (local: served on the Envoy's own node; keep: the share its "
                  "routes keep there)", title_justify="left")
    for column in ("envoy", "node", "sent", "ok", "failed", "local", "local 10 s", "keep",
                   "TTFT p50 10 s"):
        table.add_column(column, justify="left" if column in ("envoy", "node") else "right",
                         no_wrap=True)
    for name, node in frame.envoys.items():
        mine = [r for r in done if r.arrival.entry == name]
        mine_recent = [r for r in recent if r.arrival.entry == name and r.ok]
        keep = frame.sample.keep.get(name) if frame.sample else None
        table.add_row(
            name, node or "(central)", str(frame.sent_by_entry.get(name, 0)),
            str(sum(1 for r in mine if r.ok)),
            _styled(sum(1 for r in mine if not r.ok and r.error != "cancelled")),
            _local(mine, node, frame.replicas), _local(mine_recent, node, frame.replicas),
            "-" if keep is None or not node else f"{keep / 10:.0f}%",
            _ms(percentile([r.ttft_s for r in mine_recent if r.ttft_s is not None], 0.5)),
        )
    return table


def _totals(frame: Frame, done: Sequence[Result], recent: Sequence[Result]) -> Text:
    now = frame.elapsed_s
    finished_recently = sum(1 for r in done if r.sent_s + (r.e2e_s or 0) >= now - RATE_WINDOW_S)
    # The first `sent` arrivals are the ones sent (in order): an interrupted run sends no more.
    sent = sum(frame.sent_by_entry.values())
    sent_recently = max(0, min(bisect.bisect_right(frame.arrival_times, now), sent)
                        - bisect.bisect_left(frame.arrival_times, now - RATE_WINDOW_S))
    window = min(RATE_WINDOW_S, max(now, 1e-3))
    ttft = [r.ttft_s for r in recent if r.ok and r.ttft_s is not None]
    ttft_all = [r.ttft_s for r in done if r.ok and r.ttft_s is not None]
    failed = sum(1 for r in done if not r.ok and r.error != "cancelled")
    cancelled = sum(1 for r in done if r.error == "cancelled")
    return Text.assemble(
        f"sent {sent}  in flight {frame.in_flight}  done {sum(1 for r in done if r.ok)}  ",
        ("failed " + str(failed), "bold red" if failed else ""),
        f"  abandoned {cancelled}" if cancelled else "",
        f"\nrate: sending {sent_recently / window:.1f} req/s, "
        f"finishing {finished_recently / window:.1f} req/s"
        f"\nTTFT last {RECENT_S:.0f} s: p50 {_ms(percentile(ttft, 0.5))} "
        f"p99 {_ms(percentile(ttft, 0.99))}   "
        f"whole run: p50 {_ms(percentile(ttft_all, 0.5))} p99 {_ms(percentile(ttft_all, 0.99))}"
        "\nCtrl-C ends the run with a summary",
    )


def _bar(running: int, waiting: int, slots: int, width: int = 24) -> Text:
    """Running requests against the replica's slots, then the waiting ones past them."""
    scale = max(1.0, (slots + waiting) / width)
    run = round(running / scale)
    wait = min(width - run, round(waiting / scale))
    return Text.assemble(("■" * run, "green"), ("·" * max(0, round(slots / scale) - run), "dim"),
                         ("□" * wait, "red"))


def _local(results: Sequence[Result], node: str, replicas: Mapping[str, str]) -> str:
    served = [r for r in results if r.ok]
    if not node or not served:
        return "-"
    return _pct(sum(1 for r in served if replicas.get(r.replica) == node) / len(served))


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _styled(failed: int) -> Text:
    return Text(str(failed), style="bold red" if failed else "")
