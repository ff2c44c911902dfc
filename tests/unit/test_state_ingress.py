"""State.ingress: what Envoys' load reports say enters them, per pool and node."""

from __future__ import annotations

from xds_server.model import IngressReport
from xds_server.state import State


def test_streams_of_one_node_add_up_and_pools_stay_apart() -> None:
    state = State()
    state.set_ingress("s1", IngressReport(node="node-a", rates={"p": 3.0, "q": 1.0},
                                          at=100.0, interval_s=1.0))
    state.set_ingress("s2", IngressReport(node="node-a", rates={"p": 2.0}, at=100.0,
                                          interval_s=1.0))
    state.set_ingress("s3", IngressReport(node="", rates={"p": 4.0}, at=100.0, interval_s=1.0))
    assert state.ingress(100.5) == {"p": {"node-a": 5.0, "": 4.0}, "q": {"node-a": 1.0}}


def test_a_newer_report_replaces_its_streams_and_old_or_dropped_ones_are_left_out() -> None:
    state = State()
    state.set_ingress("s1", IngressReport(node="node-a", rates={"p": 3.0}, at=100.0,
                                          interval_s=1.0))
    state.set_ingress("s1", IngressReport(node="node-a", rates={"p": 7.0}, at=101.0,
                                          interval_s=1.0))
    state.set_ingress("s2", IngressReport(node="node-b", rates={"p": 1.0}, at=101.0,
                                          interval_s=1.0))
    assert state.ingress(101.0) == {"p": {"node-a": 7.0, "node-b": 1.0}}
    assert state.ingress(104.5) == {}  # three intervals without a report: not current
    state.drop_ingress("s2")
    assert state.ingress(101.0) == {"p": {"node-a": 7.0}}
