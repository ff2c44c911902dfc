"""Bad input, fuzzed: every parser at a trust boundary fails only in its documented way.

Each input that reaches the control plane from outside (pod metadata and InferencePools from
the Kubernetes API, /metrics text from a replica, the pool file, the config file, ext_proc
bodies and headers from Envoy) is generated at random by `hypothesis`. The property is the same for
all: the only exception is the documented one (or none), so a bad input cannot take the
watch, the scrape, the file source or the picker down, and the other replicas keep their
routes. Examples are bounded so that the module stays a few seconds long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fakekube import make_pod
from xds_server.commands import serve
from xds_server.extproc.pick import Unreadable, read_request
from xds_server.extproc.server import Picker, add_to_server
from xds_server.extproc.state import LocalState
from xds_server.metrics import Metrics
from xds_server.model import Pool, Replica
from xds_server.settings import PickSettings, Settings
from xds_server.sources.inferencepools import parse_inference_pool
from xds_server.sources.pods import PREFIX, pod_to_replica
from xds_server.sources.static_file import PoolFileError, StaticFileSource, parse_pools
from xds_server.sources.vllm_metrics import MetricsTextError, parse_metrics
from xds_server.state import State

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text that is hard on parsers: control characters, quotes, escapes, surrogates, digits
# from other scripts, and the separators each format uses.
nasty = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(list(' \t\n\r"\'\\{}[]:=,#-/.0123456789eE+_ab\x00\u0663')),
            max_size=40),
    st.sampled_from(["", "-1", "0", "65536", "1e3", "nan", "inf", " 8000 ", "٣", "9" * 5000,
                     "true", "null", "--port", "sh -c 'vllm serve", "$(x)", "a b c"]),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), nasty)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty, inner, max_size=4),
    max_leaves=12,
)

KEYS = ["pool", "port", "dp-size-local", "dp-rank", "metrics-port", "metrics-path", "zone"]
metadata = st.dictionaries(st.sampled_from([PREFIX + k for k in KEYS]) | nasty, nasty,
                           max_size=6)
vllm_args = st.lists(
    st.sampled_from(["vllm", "serve", "Qwen/Qwen3", "--port", "--port=", "-dp", "-dpl",
                     "--data-parallel-size-local", "--data_parallel_rank",
                     "--data-parallel-start-rank", "--served-model-name", "--model"]) | nasty,
    max_size=10,
)


# --- pod metadata -------------------------------------------------------------------------


@FUZZ
@given(labels=metadata, annotations=metadata, command=vllm_args, args=vllm_args,
       ports=st.lists(st.fixed_dictionaries({"name": nasty, "containerPort": json_scalar}),
                      max_size=3),
       ip=nasty | st.just("10.0.0.9"), node=nasty, draining=st.booleans())
def test_pod_metadata_never_raises_and_bad_values_fall_back(
    labels: dict[str, str], annotations: dict[str, str], command: list[str], args: list[str],
    ports: list[dict[str, Any]], ip: str, node: str, draining: bool,
) -> None:
    """Shaped like the API server's pods (strings where the schema has strings): a value
    that does not parse is a Problem with a bounded key (a counter label), never an error."""
    pod = make_pod("p", namespace="ns", ip=ip, node=node, labels=labels,
                   annotations=annotations, command=command, args=args, ports=ports)
    if draining:
        pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    result = pod_to_replica(pod, default_pool="qwen3")
    assert {p.key for p in result.problems} <= {*KEYS, "node", "ip"}
    assert all(p.message for p in result.problems)
    if result.replica is not None:
        r = result.replica
        assert 1 <= r.port <= 65535 and 1 <= r.capacity <= 4096 and r.node
        assert r.metrics_path.startswith("/")


@FUZZ
@given(spec=st.dictionaries(st.sampled_from(["selector", "targetPorts", "endpointPickerRef"])
                            | nasty, json_value, max_size=4),
       labels=st.dictionaries(nasty, json_value, max_size=3),
       ports=st.lists(st.fixed_dictionaries({"number": json_scalar}), max_size=3),
       name=nasty)
def test_any_inference_pool_never_raises_and_a_usable_one_is_valid(
    spec: dict[str, Any], labels: dict[str, Any], ports: list[dict[str, Any]], name: str
) -> None:
    """InferencePools from the API (schema-shaped or not): a problem or a usable pool."""
    for raw_spec in (spec, {**spec, "selector": {"matchLabels": labels}, "targetPorts": ports}):
        pool = parse_inference_pool({"metadata": {"name": name, "namespace": "ns"},
                                     "spec": raw_spec})
        if not pool.problem:
            assert pool.match_labels and pool.ports
            assert all(1 <= p <= 65535 for p in pool.ports)


@FUZZ
@given(pod=st.dictionaries(st.sampled_from(["metadata", "spec", "status"]) | nasty, json_value,
                           max_size=4),
       good=st.integers(1, 4))
def test_any_json_pod_never_raises_and_leaves_the_other_pods_routable(
    pod: dict[str, Any], good: int
) -> None:
    """Not even schema-shaped: whatever the watch decodes, the conversion returns."""
    pod_to_replica(pod)
    others = [pod_to_replica(make_pod(f"ok{i}", ip=f"10.0.0.{i + 1}",
                                      annotations={PREFIX + "pool": "qwen3"}))
              for i in range(good)]
    assert all(o.replica is not None and not o.problems for o in others)


@FUZZ
@given(spec=st.fixed_dictionaries({
    "containers": st.lists(st.fixed_dictionaries({
        "command": json_value, "args": json_value, "ports": json_value}), max_size=2)
    | json_value,
    "nodeName": json_value,
}), status=st.fixed_dictionaries({"phase": st.just("Running"), "podIP": json_value,
                                  "conditions": json_value}),
    meta=st.fixed_dictionaries({"name": json_value, "annotations": json_value,
                                "labels": json_value, "deletionTimestamp": json_value}))
def test_wrongly_typed_pod_fields_never_raise(
    spec: dict[str, Any], status: dict[str, Any], meta: dict[str, Any]
) -> None:
    pod_to_replica({"metadata": meta, "spec": spec, "status": status}, default_pool="qwen3")


# --- metrics text -------------------------------------------------------------------------

METRIC_NAMES = ["vllm:num_requests_running", "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                "vllm:generation_tokens_total", "other"]
metric_line = st.builds(
    lambda name, labels, value: f"{name}{labels} {value}",
    st.sampled_from(METRIC_NAMES) | nasty,
    st.sampled_from(["", '{engine="0"}', '{engine="1",model_name="m"}', "{", '{engine=0}',
                     '{engine="\\"}']) | nasty,
    st.sampled_from(["0", "1.5", "NaN", "+Inf", "-1", "1e400", "x"]) | nasty,
)
metrics_text = st.lists(
    metric_line | st.sampled_from(["# TYPE vllm:num_requests_running gauge", "# HELP x y",
                                   "# EOF", "# TYPE x counter"]) | nasty,
    max_size=8,
).map("\n".join)


@FUZZ
@given(text=metrics_text)
def test_metrics_text_yields_loads_or_one_metrics_text_error(text: str) -> None:
    try:
        reading = parse_metrics(text)
    except MetricsTextError as exc:
        assert str(exc)
        return
    assert reading.ranks
    for load in reading.ranks:
        assert load.running >= 0 and load.waiting >= 0
    tokens = reading.generation_tokens
    assert tokens is None or (math.isfinite(tokens) and tokens >= 0)


# --- the static pool file -----------------------------------------------------------------

replica_doc = st.dictionaries(
    st.sampled_from(["address", "node", "capacity", "zone"]) | nasty,
    json_value | st.sampled_from(["127.0.0.1:8001", "[::1]:8002", "host:80", "node-a"]),
    max_size=5,
)
pool_doc = st.dictionaries(
    st.sampled_from(["name", "replicas"]) | nasty,
    st.lists(replica_doc, max_size=3) | json_value | st.sampled_from(["qwen3", "Qwen/Q3"]),
    max_size=3,
)
pool_file = st.one_of(
    st.builds(lambda pools: yaml.safe_dump({"pools": pools}), st.lists(pool_doc, max_size=3)),
    st.builds(yaml.safe_dump, json_value),
    nasty,
)


@FUZZ
@given(text=pool_file)
@example(text="[" * 2000)  # RecursionError inside the YAML parser (slow: one example)
@example(text="a: " + "9" * 5000)  # ValueError: an integer past Python's digit limit
def test_pool_file_parses_or_raises_pool_file_error(text: str) -> None:
    try:
        pools = parse_pools(text)
    except PoolFileError as exc:
        assert str(exc)
        return
    assert all(isinstance(p, Pool) for p in pools)


class CountingPath(type(Path())):  # type: ignore[misc]
    """A path that counts its reads: the static source's polls, made observable."""

    reads = 0

    def read_bytes(self) -> bytes:
        self.reads += 1
        return super().read_bytes()


def invalid_files(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "hybridlb_source_errors_total", {"source": "static", "reason": "invalid"})
    return value or 0.0


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=pool_file)
def test_bad_pool_file_edit_keeps_the_last_good_pools_with_one_log_line_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    """Through the running source: a rejected edit leaves the pools as they were."""
    try:
        parse_pools(text)
    except PoolFileError:
        pass
    else:
        return  # a valid file is simply applied: not this property
    path = CountingPath(tmp_path / "pools.yaml")
    path.write_text("pools:\n- name: qwen3\n  replicas:\n"
                    "  - {address: '127.0.0.1:8001', node: node-a}\n")
    state, metrics = State(), Metrics()
    source = StaticFileSource(path=path, state=state, metrics=metrics, poll_interval_s=0.005)
    source.load_once()
    good = state.pools
    caplog.clear()

    async def edit() -> None:
        task = asyncio.create_task(source.run())
        path.write_text(text)
        async with asyncio.timeout(10):
            while not invalid_files(metrics):
                await asyncio.sleep(0.005)
            # Two more polls of the same content (a poll reads only after the previous one
            # was handled, so the third read means two were): no second line, no second count.
            polled = path.reads
            while path.reads < polled + 3:
                await asyncio.sleep(0.005)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="xds_server.sources.static_file"):
        asyncio.run(edit())
    assert state.pools == good
    assert invalid_files(metrics) == 1
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and r"keeping the last good pools" in rejected[0].getMessage()


# --- the config file ----------------------------------------------------------------------

config_doc = st.one_of(
    st.dictionaries(st.sampled_from([*(o.flag for o in serve.OPTIONS), "kubernetes_pools",
                                     "xds_port"]) | nasty,
                    json_value, max_size=5),
    json_value,
)


@FUZZ
@given(doc=config_doc)
def test_config_file_gives_settings_or_a_clear_system_exit(tmp_path: Path, doc: Any) -> None:
    """A config file is read at start-up: a bad one must end with a message naming the
    problem (SystemExit with text), never a traceback."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--config", str(path)])
    try:
        result = serve.settings_from_args(args)
    except SystemExit as exc:
        assert isinstance(exc.code, str) and exc.code
        return
    assert isinstance(result, Settings)


@pytest.mark.parametrize("text", ["[" * 2000, "xds-port: " + "9" * 5000, "\x00", ": :"])
def test_config_file_yaml_cannot_load_is_a_system_exit(tmp_path: Path, text: str) -> None:
    """Found by the fuzzer: YAML's loader raises ValueError and RecursionError too."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=r"config .*YAML"):
        serve.load_config(path)


# --- ext_proc bodies and headers ----------------------------------------------------------

body_doc = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda d: json.dumps(d).encode(), json_value),
    st.builds(lambda model, prompt, messages: json.dumps(
        {"model": model, "prompt": prompt, "messages": messages}).encode(),
        json_value, json_value, json_value),
    st.sampled_from([b"[" * 10_000, b'{"model": "m", "prompt": ["\\udfff"]}', b"\xff\xfe"]),
)


@FUZZ
@example(body=b"[" * 10_000, content_type="application/json")  # RecursionError in json
@example(body=b'{"model": "m", "prompt": "\\ud800abcdefgh"}', content_type="application/json")
@given(body=body_doc,
       content_type=st.sampled_from(["application/json", "application/json; charset=x"]) | nasty)
def test_extproc_body_gives_request_info_or_unreadable(body: bytes, content_type: str) -> None:
    try:
        info = read_request(body, content_type, PickSettings(prefix_chars=8))
    except Unreadable as exc:
        assert exc.reason in {"not_json", "too_large", "bad_json", "no_model"}
        return
    assert info.model and info.prompt_chars >= 0


class _PickerServer:
    """The real gRPC Picker on a loop in a thread, with one pool of two replicas."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.state = State()
        self.state.expect_source("test")
        self.state.set_pools("test", [Pool(name="qwen3", replicas=(
            Replica(host="10.0.0.1", port=8000, node="a"),
            Replica(host="10.0.0.2", port=8000, node="b"),
        ))])
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def __enter__(self) -> _PickerServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        server = grpc.aio.server()
        add_to_server(server, Picker(state=LocalState(self.state), metrics=self.metrics,
                                     settings=PickSettings(prefix_chars=8)))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@pytest.fixture(scope="module")
def picker() -> Iterator[_PickerServer]:
    with _PickerServer() as server:
        yield server


def _headers(pairs: list[tuple[str, bytes]], eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v)
                                            for k, v in pairs]),
        end_of_stream=eos))


header_pairs = st.lists(st.tuples(
    st.sampled_from(["content-type", "content-length", "x-model", "x-other"]),
    st.sampled_from([b"application/json", b"text/plain", b"-1", b"99999999999", b"qwen3",
                     b"nope", b"\xff\xfe"]) | st.binary(max_size=20),
), max_size=4)
processing_request = st.one_of(
    st.builds(_headers, header_pairs, st.booleans()),
    st.builds(lambda body, eos: ep.ProcessingRequest(
        request_body=ep.HttpBody(body=body, end_of_stream=eos)), body_doc, st.booleans()),
    st.sampled_from([
        ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
        ep.ProcessingRequest(response_body=ep.HttpBody()),
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
        ep.ProcessingRequest(),
    ]),
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(processing_request, min_size=1, max_size=5),
       node=st.sampled_from(["", "a", "b"]))
def test_picker_answers_every_message_of_any_sequence(
    picker: _PickerServer, sequence: list[ep.ProcessingRequest], node: str
) -> None:
    """Envoy's side of the stream, in any order: one answer per message, status OK, and a
    pick (when there is one) names replicas of the pool."""
    with grpc.insecure_channel(f"127.0.0.1:{picker.port}") as channel:
        stub = ep_grpc.ExternalProcessorStub(channel)
        responses = list(stub.Process(iter(sequence), metadata=(("x-hybridlb-node", node),),
                                      timeout=10))
    assert len(responses) == len(sequence)
    for response in responses:
        mutation = response.request_body.response.header_mutation
        for option in mutation.set_headers:
            if option.header.key == "x-gateway-destination-endpoint":
                # The protocol's value: the pick, then its fallbacks, comma-separated.
                named = option.header.raw_value.split(b",")
                assert len(set(named)) == len(named)
                assert set(named) <= {b"10.0.0.1:8000", b"10.0.0.2:8000"}
