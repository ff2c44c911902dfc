"""Client strings in logs: capped and on one line; repeated warnings limited and counted."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from xds_server.admin import Rendered
from xds_server.logsafe import MAX_CHARS, LogLimiter, clip
from xds_server.xds.guard import NodeSan


def test_a_short_printable_string_is_unchanged() -> None:
    assert clip("envoy-node-a 1.2") == "envoy-node-a 1.2"


def test_a_huge_string_is_cut_and_says_how_long_it_was() -> None:
    out = clip("x" * 1_000_000)
    assert out.startswith("x" * MAX_CHARS) and out.endswith("...[1000000 chars]")
    assert len(out) < MAX_CHARS + 30


@pytest.mark.parametrize("forged", ["ok\n2026-01-01 ERROR forged", "a\r\nb", "a\u2028b",
                                    "\x1b[31mred", "nul\x00"])
def test_no_character_can_break_a_line_or_reach_the_terminal(forged: str) -> None:
    out = clip(forged)
    assert out.isprintable() and "\n" not in out and "\x1b" not in out
    assert "\\" in out  # escaped, not dropped: the operator still sees what was sent


def test_escaping_stays_bounded() -> None:
    assert len(clip("\n" * 100_000)) <= 6 * MAX_CHARS + 30


def _limiter(now: list[float]) -> tuple[LogLimiter, Counter]:
    counter = Counter("suppressed", "", ["what"], registry=CollectorRegistry())
    return LogLimiter(counter, burst=3, interval_s=10, clock=lambda: now[0]), counter


def test_repeated_lines_are_limited_counted_and_summed_up_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter, counter = _limiter(now)
    log = logging.getLogger("test.logsafe")
    with caplog.at_level(logging.INFO, "test.logsafe"):
        for i in range(100):
            limiter.log(log, logging.WARNING, "nack", "nack %d", i)
        limiter.log(log, logging.WARNING, "other", "another kind")
        assert [r.getMessage() for r in caplog.records] == [
            "nack 0", "nack 1", "nack 2", "another kind"]
        assert counter.labels("nack")._value.get() == 97
        now[0] = 10.0
        limiter.log(log, logging.WARNING, "nack", "nack %d", 100)
    assert caplog.records[-1].getMessage() == (
        "nack 100 (97 more like it left out in the last 10 s)")


def test_a_disabled_level_costs_nothing_and_counts_nothing() -> None:
    limiter, counter = _limiter([0.0])
    log = logging.getLogger("test.logsafe.quiet")
    log.setLevel(logging.ERROR)
    for _ in range(10):
        limiter.log(log, logging.INFO, "connect", "connected")
    assert counter.labels("connect")._value.get() == 0


@pytest.mark.parametrize(("pattern", "uris", "nodes"), [
    ("spiffe://*/ns/*/node/{node}", ["spiffe://td/ns/hybridlb/node/gpu-1"], {"gpu-1"}),
    ("spiffe://*/ns/*/node/{node}", ["spiffe://td/ns/a/b/node/gpu-1"], set()),
    ("spiffe://*/ns/*/node/{node}", ["spiffe://td/ns/x/node/gpu-1/extra"], set()),
    ("spiffe://prod/node/{node}", ["spiffe://dev/node/gpu-1", "spiffe://prod/node/gpu-2"],
     {"gpu-2"}),
    ("spiffe://a.b/{node}", ["spiffe://aXb/gpu-1"], set()),  # dots are literal
])
def test_node_san_pattern(pattern: str, uris: list[str], nodes: set[str]) -> None:
    assert NodeSan(pattern).nodes(uris) == nodes


def test_a_node_san_pattern_names_the_node_once() -> None:
    with pytest.raises(ValueError):
        NodeSan("spiffe://td/ns/x")


def test_the_debug_document_is_built_once_per_interval() -> None:
    now, builds = [0.0], []

    def build() -> dict[str, int]:
        builds.append(1)
        return {"n": len(builds)}

    doc = Rendered(build, max_age_s=0.2, clock=lambda: now[0])
    assert [doc.body() for _ in range(200)] == [b'{"n": 1}'] * 200
    now[0] = 0.2
    assert doc.body() == b'{"n": 2}'
