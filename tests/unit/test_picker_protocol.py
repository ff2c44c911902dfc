"""The picker's side of the endpoint picker protocol v1.0, message by message (no Envoy: the
real-Envoy paths are in tests/integration/test_extproc.py and test_gie.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from xds_server.extproc.pick import Candidate, Rank
from xds_server.extproc.server import Picker, RareLog, _parse_request
from xds_server.extproc.state import _local_ranks
from xds_server.metrics import Metrics
from xds_server.model import RankLoad
from xds_server.settings import PickSettings

A = Candidate("10.0.0.1:8000", "n1", 1, 0, 0)
B = Candidate("10.0.0.2:8000", "n2", 1, 2, 0)
C = Candidate("10.0.0.3:8000", "n3", 1, 4, 0)
BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


class FakeState:
    def __init__(self, candidates: list[Candidate], keep: dict[str, int] | None = None) -> None:
        self.pool = candidates
        #: Pool m's keep shares by node.
        self.keeps = keep or {}
        self.picks: list[tuple[str, int | None]] = []
        self.served: list[tuple[str, str]] = []
        self.done: list[tuple[str, int | None]] = []

    def candidates(self, pool: str) -> list[Candidate] | None:
        return list(self.pool) if pool == "m" else None

    def default_pool(self) -> str:
        return "m"

    def keep(self, pool: str, node: str) -> int:
        return self.keeps.get(node, 0) if pool == "m" else 0

    def note_pick(self, address: str, rank: int | None = None) -> None:
        self.picks.append((address, rank))

    def note_served(self, picked: str, served: str, rank: int | None = None) -> None:
        self.served.append((picked, served, rank))

    def note_done(self, address: str, rank: int | None = None) -> None:
        self.done.append((address, rank))


class FakeContext:
    aborted: Any = None

    def __init__(self, node: str = "") -> None:
        self.node = node

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-hybridlb-node", self.node),) if self.node else ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: Any, details: str) -> None:
        self.aborted = code


def run(picker: Picker, messages: list[ep.ProcessingRequest | None],
        context: FakeContext | None = None) -> list[ep.ProcessingResponse]:
    async def source() -> AsyncIterator[ep.ProcessingRequest | None]:
        for m in messages:
            yield m

    async def collect() -> list[ep.ProcessingResponse]:
        return [r async for r in picker.Process(source(), context or FakeContext())]

    return asyncio.run(collect())


def picker(state: FakeState, **settings: Any) -> Picker:
    return Picker(state=state, metrics=Metrics(), settings=PickSettings(**settings))


def headers(*, streamed: bool = False, subset: list[str] | None = None,
            content_type: str = "application/json") -> ep.ProcessingRequest:
    request = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()),
                 base_pb2.HeaderValue(key="content-length", raw_value=str(len(BODY)).encode())])))
    if streamed:
        mode = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
        request.protocol_config.request_body_mode = mode
        request.protocol_config.response_body_mode = mode
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        request.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return request


def body(data: bytes = BODY, end: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end))


def destination(response: ep.ProcessingResponse) -> tuple[str, str]:
    """(header, envoy.lb metadata) of a pick."""
    common = (response.request_body.response if response.HasField("request_body")
              else response.request_headers.response)
    header = {h.header.key: h.header.raw_value.decode()
              for h in common.header_mutation.set_headers}["x-gateway-destination-endpoint"]
    meta = response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
        "x-gateway-destination-endpoint"].string_value
    return header, meta


def test_the_pick_and_its_fallbacks_in_order_in_header_and_metadata() -> None:
    out = run(picker(FakeState([C, B, A])), [headers(), body()])
    assert destination(out[1]) == ("10.0.0.1:8000,10.0.0.2:8000,10.0.0.3:8000",) * 2


def test_fallbacks_setting_bounds_the_list() -> None:
    out = run(picker(FakeState([C, B, A]), fallbacks=0), [headers(), body()])
    assert destination(out[1]) == ("10.0.0.1:8000", "10.0.0.1:8000")


def test_subset_hint_restricts_the_choice() -> None:
    out = run(picker(FakeState([C, B, A])), [headers(subset=["10.0.0.3:8000",
                                                             "10.0.0.2:8000"]), body()])
    assert destination(out[1])[0] == "10.0.0.2:8000,10.0.0.3:8000"


@pytest.mark.parametrize("subset", [[], ["10.9.9.9:8000"]], ids=["empty", "ineligible"])
def test_empty_or_ineligible_subset_is_an_immediate_503(subset: list[str]) -> None:
    state = FakeState([A, B])
    out = run(picker(state), [headers(subset=subset), body()])
    assert out[-1].immediate_response.status.code == 503
    assert state.picks == []


def test_429_only_when_every_candidate_is_past_the_queue_bound() -> None:
    queued = [Candidate("10.0.0.1:8000", "n", 1, 4, 9), Candidate("10.0.0.2:8000", "n", 1, 4, 8)]
    out = run(picker(FakeState(queued), max_queue=7), [headers(), body()])
    assert out[-1].immediate_response.status.code == 429
    out = run(picker(FakeState([*queued, B]), max_queue=7), [headers(), body()])
    assert not out[-1].HasField("immediate_response")
    out = run(picker(FakeState(queued)), [headers(), body()])  # off by default
    assert not out[-1].HasField("immediate_response")


def test_streamed_mode_holds_the_headers_and_hands_every_chunk_back() -> None:
    half = len(BODY) // 2
    out = run(picker(FakeState([B, A])), [
        headers(streamed=True), body(BODY[:half], end=False), body(BODY[half:]),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"tok1", end_of_stream=False)),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"tok2", end_of_stream=True)),
    ])
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body",
                     "response_body"]
    assert destination(out[0])[0].startswith("10.0.0.1:8000")
    sent = out[1].request_body.response.body_mutation.streamed_response
    assert (sent.body, sent.end_of_stream) == (BODY, True)
    echoed = [r.response_body.response.body_mutation.streamed_response for r in out[3:]]
    assert [(e.body, e.end_of_stream) for e in echoed] == [(b"tok1", False), (b"tok2", True)]


def test_streamed_body_over_the_limit_goes_through_unpicked() -> None:
    state = FakeState([A])
    out = run(picker(state, max_body_bytes=10), [headers(streamed=True), body(BODY[:20], False),
                                                  body(BODY[20:])])
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "request_body"]
    assert not out[0].request_headers.response.HasField("header_mutation")
    assert b"".join(r.request_body.response.body_mutation.streamed_response.body
                    for r in out[1:]) == BODY
    assert state.picks == []


def served_by(address: str) -> ep.ProcessingRequest:
    """The response headers of a request the proxy reports `address` served."""
    served = ep.ProcessingRequest(response_headers=ep.HttpHeaders())
    lb = struct_pb2.Struct()
    lb.update({"x-gateway-destination-endpoint-served": address})
    served.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return served


def test_served_elsewhere_moves_the_pending_pick() -> None:
    state = FakeState([A, B])
    run(picker(state), [headers(), body(), served_by(B.address)])
    assert state.served == [(A.address, B.address, None)]


def test_a_picked_request_ends_once_where_it_was_served() -> None:
    trailers = ep.ProcessingRequest(response_trailers=ep.HttpTrailers())
    # Its stream closes at the response's end; trailers, where an upstream sends them,
    # come first and the close is not counted again.
    for tail in ([], [trailers]):
        state = FakeState([A, B])
        run(picker(state), [headers(), body(), *tail])
        assert state.done == [(A.address, None)]
    # Served by a fallback: it ends there.
    state = FakeState([A, B])
    run(picker(state), [headers(), body(), served_by(B.address)])
    assert state.done == [(B.address, None)]
    # With its rank, when the picker named one.
    ranked = Candidate("10.0.0.1:8000", "n", 2, 5, 0, ranks=(Rank(0, 4, 0), Rank(1, 1, 0)))
    state = FakeState([ranked])
    run(picker(state, pin_rank=True), [headers(), body()])
    assert state.done == [(ranked.address, 1)]


def test_a_request_the_picker_passed_by_ends_uncounted() -> None:
    state = FakeState([A, B])
    run(picker(state), [headers(), body(b"{not json")])
    run(picker(state), [headers(content_type="text/plain"), body()])
    assert state.picks == [] and state.done == []


def test_the_response_mode_asks_for_the_trailers_that_hold_the_stream_open() -> None:
    [answer] = run(picker(FakeState([A])), [headers()])
    mode = answer.mode_override
    assert mode.request_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    assert mode.response_trailer_mode == processing_mode_pb2.ProcessingMode.SEND


def test_rank_header_names_the_least_loaded_local_rank_by_default() -> None:
    ranked = Candidate("10.0.0.1:8000", "n", 2, 5, 0, ranks=(Rank(0, 4, 0), Rank(1, 1, 0)))
    state = FakeState([ranked, Candidate("10.0.0.2:8000", "n", 1, 9, 0)])
    out = run(picker(state), [headers(), body()])
    set_headers = {h.header.key: h.header.raw_value.decode()
                   for h in out[1].request_body.response.header_mutation.set_headers}
    assert set_headers["x-data-parallel-rank"] == "1"
    # A fallback with too few ranks for that index is left out of the list.
    assert set_headers["x-gateway-destination-endpoint"] == "10.0.0.1:8000"
    assert state.picks == [("10.0.0.1:8000", 1)]


def test_with_the_rank_choice_off_no_rank_header_is_set() -> None:
    ranked = Candidate("10.0.0.1:8000", "n", 2, 5, 0, ranks=(Rank(0, 4, 0), Rank(1, 1, 0)))
    state = FakeState([ranked, Candidate("10.0.0.2:8000", "n", 1, 9, 0)])
    out = run(picker(state, pin_rank=False), [headers(), body()])
    set_headers = {h.header.key: h.header.raw_value.decode()
                   for h in out[1].request_body.response.header_mutation.set_headers}
    assert "x-data-parallel-rank" not in set_headers
    # No rank index to honour: a fallback with fewer ranks stays in the list.
    assert set_headers["x-gateway-destination-endpoint"] == "10.0.0.1:8000,10.0.0.2:8000"
    assert state.picks == [("10.0.0.1:8000", None)]


def test_global_engine_labels_become_local_rank_indexes() -> None:
    engines = [RankLoad("5", 3, 0), RankLoad("4", 1, 2)]
    assert _local_ranks(2, 4, engines) == (Rank(0, 1, 2), Rank(1, 3, 0))
    assert _local_ranks(3, 4, engines) == ()  # a rank without a reading: no rank choice
    assert _local_ranks(1, 0, [RankLoad("0", 1, 0)]) == ()


def test_a_malformed_message_ends_the_stream_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _parse_request(b"\xff\xff\xff") is None
    p = picker(FakeState([A]))
    context = FakeContext()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            run(p, [None], context)
    assert context.aborted is not None
    assert sum("malformed" in r.message for r in caplog.records) == 1
    assert "Traceback" not in caplog.text
    assert p._metrics.extproc_requests.labels("malformed")._value.get() == 3


def test_rare_log_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    rare = RareLog(interval_s=0.0)
    with caplog.at_level(logging.WARNING):
        rare.warning("x %s", "a")
    assert "0 more like it" in caplog.text


def test_a_model_no_pool_is_named_after_goes_to_the_first_pool() -> None:
    other = json.dumps({"model": "other", "prompt": "hi"}).encode()
    out = run(picker(FakeState([A])), [headers(), body(other)])
    set_headers = {h.header.key: h.header.raw_value.decode()
                   for h in out[1].request_body.response.header_mutation.set_headers}
    assert set_headers["x-model"] == "m"


def test_a_stream_with_no_message_for_the_idle_time_is_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from xds_server.extproc import server

    monkeypatch.setattr(server, "STREAM_IDLE_S", 0.05)
    p = picker(FakeState([A]))

    async def silent() -> AsyncIterator[ep.ProcessingRequest | None]:
        await asyncio.Event().wait()  # a peer that opened a stream and sends nothing
        yield None

    async def collect() -> list[ep.ProcessingResponse]:
        return [r async for r in p.Process(silent(), FakeContext())]

    assert asyncio.run(asyncio.wait_for(collect(), 5)) == []
    assert p._metrics.extproc_requests.labels("idle_stream")._value.get() == 1


#: Node n3's only replica, with a queue: never the pool's best.
QUEUED = Candidate("10.0.0.3:8000", "n3", 1, 4, 3)
#: Busier than A and B, with a slot free: holding a request here costs it no wait.
ROOMY = Candidate("10.0.0.3:8000", "n3", 1, 3, 0)


def picks_from(node: str, state: FakeState, requests: int,
               subset: list[str] | None = None) -> list[str]:
    """The replica each of `requests` requests from an Envoy on `node` is picked for."""
    p = picker(state)
    return [destination(run(p, [headers(subset=subset), body()], FakeContext(node))[1])[0]
            .split(",")[0] for _ in range(requests)]


def test_a_keep_share_of_1000_holds_every_request_on_the_envoys_node() -> None:
    state = FakeState([A, B, ROOMY], keep={"n3": 1000})
    assert picks_from("n3", state, 8) == [ROOMY.address] * 8
    # Its fallbacks still come from the whole pool, best first.
    out = run(picker(state), [headers(), body()], FakeContext("n3"))
    assert destination(out[1])[0] == f"{ROOMY.address},{A.address},{B.address}"


def test_a_held_request_leaves_its_node_where_it_would_queue_longer_than_in_the_pool() -> None:
    state = FakeState([A, B, QUEUED], keep={"n3": 1000})
    assert picks_from("n3", state, 4) == [A.address] * 4
    # Where the pool queues longer, its own node is still the shorter wait.
    longer = Candidate("10.0.0.1:8000", "n1", 1, 4, 5)
    state = FakeState([longer, QUEUED], keep={"n3": 1000})
    assert picks_from("n3", state, 4) == [QUEUED.address] * 4


def test_a_keep_share_of_0_picks_from_the_pool_even_past_a_local_free_slot() -> None:
    # --local-first false: every keep share is 0; n2's replica has room, n1's is emptier.
    state = FakeState([A, B, QUEUED], keep={"n1": 0, "n2": 0, "n3": 0})
    assert picks_from("n2", state, 4) == [A.address] * 4


def test_any_keep_share_above_0_holds_every_request_while_the_node_has_room() -> None:
    """The fraction is for Envoy's route split: the picker sees when the node is full."""
    state = FakeState([A, B, ROOMY], keep={"n3": 250})
    assert picks_from("n3", state, 8) == [ROOMY.address] * 8
    state = FakeState([A, B, QUEUED], keep={"n3": 250})
    assert picks_from("n3", state, 4) == [A.address] * 4


def test_a_held_request_goes_to_the_pool_when_its_node_has_no_candidate() -> None:
    state = FakeState([A, B, ROOMY], keep={"n3": 1000, "n4": 1000})
    assert picks_from("n3", state, 1) == [ROOMY.address]
    # The subset hint leaves n3 none; n4 has no replica at all.
    assert picks_from("n3", state, 2, subset=[A.address, B.address]) == [A.address] * 2
    assert picks_from("n4", state, 2) == [A.address] * 2
