"""The demo's accounting: what summary.json counts per run, replica and Envoy; its plot."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from xds_server.demo.monitor import ReplicaSample, Sample
from xds_server.demo.report import plot, summarize, tables
from xds_server.demo.view import Frame, render
from xds_server.workload import Arrival, Result

REPLICAS = {"10.0.0.1:8000": "node-a", "10.0.0.2:8000": "node-b"}
ENVOYS = {"envoy-node-a": "node-a", "envoy-central": ""}


def result(index: int, entry: str, replica: str = "", *, status: int | None = 200,
           error: str = "", rank: int | None = 0, burst: bool = False) -> Result:
    arrival = Arrival(index=index, at_s=index * 0.1, entry=entry, prompt_tokens=10,
                      output_tokens=20, burst=burst)
    return Result(arrival=arrival, sent_s=index * 0.1, status=status, ttft_s=0.1 * (index + 1),
                  e2e_s=1.0, replica=replica, rank=rank, error=error)


RESULTS = [
    result(0, "envoy-node-a", "10.0.0.1:8000", rank=0),
    result(1, "envoy-node-a", "10.0.0.1:8000", rank=1),
    result(2, "envoy-node-a", "10.0.0.2:8000", rank=2, burst=True),  # spilled to node-b
    result(3, "envoy-central", "10.0.0.2:8000", rank=3),
    result(4, "envoy-central", "10.0.0.2:8000", status=500, error="boom", rank=3),
    result(5, "envoy-central", status=None, error="ClientConnectorError: refused", rank=None),
    result(6, "envoy-node-a", status=None, error="cancelled", rank=None),
]
SAMPLES = [
    Sample(t_s=float(t), replicas={
        "10.0.0.1:8000": ReplicaSample(running=t, waiting=max(0, t - 2), weight=200 - 10 * t),
        "10.0.0.2:8000": ReplicaSample(running=1, waiting=0, weight=190),
    }, keep={"envoy-node-a": 1000 - 100 * t, "envoy-central": 0})
    for t in range(5)
]


def test_summary_counts_sent_succeeded_failed_and_cancelled_apart() -> None:
    s = summarize(RESULTS, replicas=REPLICAS, envoys=ENVOYS, samples=SAMPLES)
    assert (s["sent"], s["succeeded"], s["failed"], s["cancelled"]) == (7, 4, 2, 1)
    assert s["burst_requests"] == 1
    assert s["errors"] == {"boom": 1, "ClientConnectorError: refused": 1}


def test_summary_per_replica_counts_what_each_replica_answered() -> None:
    replicas = summarize(RESULTS, replicas=REPLICAS, envoys=ENVOYS)["replicas"]
    a, b = replicas["10.0.0.1:8000"], replicas["10.0.0.2:8000"]
    assert (a["sent"], a["succeeded"], a["failed"], a["share"]) == (2, 2, 0, 0.5)
    assert (b["sent"], b["succeeded"], b["failed"], b["share"]) == (3, 2, 1, 0.5)
    assert a["ranks"] == {"0": 1, "1": 1}
    assert b["ranks"] == {"2": 1, "3": 1}


def test_summary_per_envoy_local_share_and_keep() -> None:
    s = summarize(RESULTS, replicas=REPLICAS, envoys=ENVOYS, samples=SAMPLES)
    a, central = s["envoys"]["envoy-node-a"], s["envoys"]["envoy-central"]
    assert (a["sent"], a["succeeded"], a["failed"], a["cancelled"]) == (4, 3, 0, 1)
    assert a["local_share"] == round(2 / 3, 4)
    assert (a["keep_per_mille_mean"], a["keep_per_mille_min"]) == (800.0, 600)
    assert (central["sent"], central["succeeded"], central["failed"]) == (3, 1, 2)
    assert central["local_share"] is None  # a central Envoy has no node of its own
    assert s["local_share"] == round(2 / 3, 4)  # over node Envoys only
    assert a["ttft_s"]["p50"] == 0.2


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "demo.png"
    plot(path, SAMPLES, replicas=REPLICAS, envoys=ENVOYS, burst=(1.0, 2.0), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_and_live_view_render_the_counts() -> None:
    console = Console(width=200, record=True)
    s = summarize(RESULTS, replicas=REPLICAS, envoys=ENVOYS, samples=SAMPLES)
    console.print(tables(s))
    console.print(render(Frame(
        elapsed_s=3.0, duration_s=60.0, phase="steady load", metrics_source="scrape",
        time_scale=10.0, slots_per_replica=16, replicas=REPLICAS, envoys=ENVOYS,
        sample=SAMPLES[-1], results=RESULTS, sent_by_entry={"envoy-node-a": 4,
                                                            "envoy-central": 3},
        in_flight=0, arrival_times=[r.arrival.at_s for r in RESULTS],
    )))
    text = console.export_text()
    assert "sent 7" in text and "failed 2" in text and "cancelled 1" in text
    assert "abandoned 1" in text
    assert "10.0.0.1:8000" in text and "envoy-central" in text
