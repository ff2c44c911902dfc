"""The ext_proc endpoint picker with real Envoy: it picks, Envoy obeys, and it fails open."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    ControlPlane,
    Envoy,
    Process,
    Sim,
    free_ports,
    running,
    wait_for,
)

pytestmark = pytest.mark.envoy
MODEL = "Qwen/Qwen3-0.6B"


class PickerProcess(Process):
    def __init__(self, workdir: Path, port: int, control_plane: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port
        self.admin_port = free_ports(1)[0]
        super().__init__(
            [sys.executable, "-m", "xds_server", "extproc", "--port", str(port),
             "--host", "127.0.0.1", "--control-plane", control_plane,
             "--poll-interval-s", "0.2", "--admin-port", str(self.admin_port),
             # The room the picker reckons with: a replica's realistic concurrency, not the
             # simulator's tiny --max-num-seqs that makes queues form at test rates.
             "--max-num-seqs", "64", *extra],
            workdir / "picker.log",
        )

    def start(self) -> None:
        super().start()
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz").status_code
                 == 200, 20, "picker ready")

    def view(self) -> dict[str, dict[str, float]]:
        """The picker's own view of the replicas, by address (its /debug/state)."""
        doc = httpx.get(f"http://127.0.0.1:{self.admin_port}/debug/state").json()
        return {r["address"]: r for pool in doc["pools"] for r in pool["replicas"]}

    def count(self, outcome: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "hybridlb_extproc_requests_total"
                        and sample.labels.get("outcome") == outcome):
                    return sample.value
        return 0.0


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.sim = Sim(workdir, replicas=3, nodes=3, extra=["--max-num-seqs", "4"])
        picker_port = free_ports(1)[0]
        self.cp = ControlPlane(
            workdir, self.sim.pools, listener_port=free_ports(1)[0],
            extra=["--metrics", "scrape", "--scrape-interval-s", "0.2", "--max-num-seqs", "4",
                   "--extproc-address", f"127.0.0.1:{picker_port}",
                   # Generous: on a busy 2-core test machine a pick can take longer than the
                   # 0.2 s default, and a late pick fails open (correct, but not what we test).
                   "--extproc-timeout-s", "2"])
        self.picker = PickerProcess(workdir, picker_port, self.cp.admin)
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("extproc"))
    with running(s.sim, s.cp, s.picker, s.envoy):
        yield s


def complete(url: str, prompt: str = "hello", headers: dict[str, str] | None = None,
             **kw: object) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, headers=headers,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw})


def test_picker_sends_each_request_to_the_least_loaded_replica(stack: Stack) -> None:
    a = stack.sim.addresses
    for busy in a[:2]:
        stack.sim.fault(busy, slowdown=50.0)
    # Deep queues: the picker also counts its own recent picks as pending on the idle
    # replica (until a reading includes them), so the gap must outweigh a burst of picks.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=24)
    flood = [pool.submit(complete, f"http://{busy}", max_tokens=200)
             for busy in a[:2] for _ in range(12)]
    try:
        # The picker decides from its own poll of the control plane, which lags the control
        # plane's view: wait until the picker itself sees the queues.
        def loaded() -> bool:
            view = stack.picker.view()
            return all(view.get(busy, {}).get("waiting", 0) >= 6 for busy in a[:2])

        wait_for(loaded, 20, "the picker seeing two replicas with queues")
        picked_before = stack.picker.count("picked")
        responses = [complete(stack.envoy.url) for _ in range(20)]
        missing = [dict(r.headers) for r in responses if "x-hybridlb-picked" not in r.headers]
        assert not missing, (missing[:2], stack.picker.count("picked") - picked_before,
                             [ln for ln in httpx.get(stack.envoy.admin + "/stats").text
                              .splitlines() if "ext_proc" in ln and not ln.endswith(" 0")])
        # Envoy sent each request where the picker said (it echoes the pick and its
        # fallbacks back: the first of them) ...
        assert all(r.headers["x-hybridlb-picked"].split(",")[0] == r.headers["x-hybridlb-replica"]
                   for r in responses)
        assert all(len(r.headers["x-hybridlb-picked"].split(",")) == 3 for r in responses)
        # ... and the picker said: the replica without a queue.
        assert Counter(r.headers["x-hybridlb-replica"] for r in responses) == Counter({a[2]: 20})
        assert stack.picker.count("picked") >= picked_before + 20
    finally:
        for busy in a[:2]:
            stack.sim.fault(busy, slowdown=1.0)
        for f in flood:
            f.result(timeout=120)
        pool.shutdown()


def test_same_long_prefix_lands_on_the_same_replica(stack: Stack) -> None:
    shared = "You are a careful assistant. " * 20  # well over one leading block
    same = set()
    for i in range(10):
        same.add(complete(stack.envoy.url, shared + f"question {i}").headers["x-hybridlb-replica"])
        # A chat's turns are not back to back: by the next one the load readings include
        # this one, so the picker's own count of recent picks does not outweigh the prefix.
        wait_for(lambda: all(r["pending"] == 0 for r in stack.picker.view().values()), 20,
                 "the picker's readings to include its picks")
    assert len(same) == 1
    # Different prompts at once: each in flight counts against its replica, so they spread
    # (one after another, each would find every replica idle and go to the first).
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        spread = set(pool.map(lambda i: complete(stack.envoy.url, f"{i} " * 200)
                              .headers["x-hybridlb-replica"], range(30)))
    assert len(spread) > 1


@pytest.mark.parametrize(
    ("content", "headers", "outcome"),
    [
        (b"{not json", {"content-type": "application/json"}, "bad_json"),
        (json.dumps({"prompt": "hi"}).encode(), {"content-type": "application/json"},
         "no_model"),
        (b"model=x", {"content-type": "application/x-www-form-urlencoded"}, "not_json"),
        (json.dumps({"model": MODEL, "prompt": "x" * 3_000_000}).encode(),
         {"content-type": "application/json"}, "too_large"),
    ],
    ids=["malformed", "no-model", "not-json", "huge"],
)
def test_unusable_bodies_pass_through_to_the_weights_and_are_counted(
    stack: Stack, content: bytes, headers: dict[str, str], outcome: str
) -> None:
    before = stack.picker.count(outcome)
    r = httpx.post(stack.envoy.url + "/v1/completions", content=content, headers=headers,
                   timeout=60)
    # A replica answered (its own verdict on the body), not Envoy or the picker.
    assert "x-hybridlb-replica" in r.headers, (r.status_code, r.text[:200])
    assert stack.picker.count(outcome) == before + 1


def test_killed_picker_fails_open_and_picks_resume(stack: Stack) -> None:
    failures: list[str] = []
    with httpx.Client(timeout=30) as client:
        def burst(n: int) -> None:
            for _ in range(n):
                r = client.post(stack.envoy.url + "/v1/completions",
                                json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:80]}")

        burst(10)
        stack.picker.stop(signal.SIGKILL)
        burst(40)
        stack.picker.start()
        wait_for(lambda: (burst(5), stack.picker.count("picked") >= 5)[1], 20, "picks again")
    assert failures == []


CHOSEN = "x-gateway-destination-endpoint"
BIG = json.dumps({"model": MODEL, "prompt": "x" * 3_000_000}).encode()


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"hello", {"content-type": "text/plain"}),
        (json.dumps({"model": MODEL, "prompt": "hi"}).encode(), {}),
        (BIG, {"content-type": "application/json"}),
    ],
    ids=["text-plain", "no-content-type", "over-the-buffer-limit"],
)
def test_a_client_cannot_choose_its_replica_where_the_picker_passes_through(
    stack: Stack, content: bytes, headers: dict[str, str]
) -> None:
    target = stack.sim.addresses[0]
    served = []
    for _ in range(9):
        r = httpx.post(stack.envoy.url + "/v1/completions", content=content,
                       headers={**headers, CHOSEN: target}, timeout=60)
        # The picked route (it echoes the endpoint header) was not taken: the header was
        # gone before routing, so override_host had nothing to honour.
        assert "x-hybridlb-picked" not in r.headers, r.headers
        served.append(r.headers["x-hybridlb-replica"])
    assert set(served) != {target}


def test_a_client_cannot_choose_its_replica_while_the_picker_is_down(stack: Stack) -> None:
    target = stack.sim.addresses[0]
    stack.picker.stop(signal.SIGKILL)
    try:
        served = []
        for _ in range(9):
            r = complete(stack.envoy.url, headers={CHOSEN: target})
            assert "x-hybridlb-picked" not in r.headers, r.headers
            served.append(r.headers["x-hybridlb-replica"])
        assert set(served) != {target}
    finally:
        stack.picker.start()


def test_grpc_health_checks_as_the_protocol_asks(stack: Stack) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.picker.port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_malformed_message_ends_its_stream_counted_without_a_traceback(stack: Stack) -> None:
    import grpc

    before = stack.picker.count("malformed")
    with grpc.insecure_channel(f"127.0.0.1:{stack.picker.port}") as channel:
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as ended:
                list(process(iter([b"\xff\xff\xff\xff"]), timeout=5))
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stack.picker.count("malformed") == before + 5
    log = stack.picker.output()
    assert "Traceback" not in log
    assert log.count("a malformed ext_proc message") == 1




def test_the_picker_counts_a_picked_request_out_when_its_response_ends(stack: Stack) -> None:
    """The filter asks for the response trailers, so Envoy keeps each request's stream to
    the picker open until the response ends (the simulator, like vLLM, sends no trailers):
    a streamed response still running is still counted, and one that ended is not."""
    slow = stack.sim.addresses
    for a in slow:
        stack.sim.fault(a, slowdown=20.0)
    first_chunk = threading.Event()

    def stream() -> int:
        with httpx.stream("POST", stack.envoy.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "hello", "max_tokens": 64, "stream": True}) as r:
            for _ in r.iter_bytes():
                first_chunk.set()
            return r.status_code

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        ended = stack.picker.count("ended")
        running = pool.submit(stream)
        assert first_chunk.wait(20), "no streamed chunk came through Envoy"
        time.sleep(0.5)
        assert not running.done()
        assert stack.picker.count("ended") == ended
    finally:
        for a in slow:
            stack.sim.fault(a, slowdown=1.0)
    assert running.result(timeout=60) == 200
    wait_for(lambda: stack.picker.count("ended") == ended + 1, 10, "its end counted")
    for streamed in (False, True):
        assert complete(stack.envoy.url, stream=streamed).status_code == 200
    wait_for(lambda: stack.picker.count("ended") == ended + 3, 10, "every end counted")
    pool.shutdown()
