"""The endpoint picker protocol (GIE v1.0) both ways, through real Envoys.

1. A gateway configured the way a Gateway API Inference Extension gateway configures Envoy,
   by hand (no config from this project's builders): ext_proc to the picker in
   FULL_DUPLEX_STREAMED mode both ways, a pool cluster with the override_host load balancing
   policy on the `x-gateway-destination-endpoint` header and `envoy.lb` metadata (falling
   back to round robin), the served endpoint reported back in `envoy.lb` metadata, the
   client's endpoint headers dropped first. It routes by this project's picker.
2. The ext_proc config this control plane pushes, with a minimal picker written here from
   the protocol document (the way GIE's conformance suite uses its test picker: a request
   header names the endpoint).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from tests.harness import ENVOY, ControlPlane, Envoy, Process, Sim, free_ports, running, wait_for
from tests.integration.test_extproc import MODEL, PickerProcess

pytestmark = pytest.mark.envoy
CHOSEN = "x-gateway-destination-endpoint"


GIE_CONFIG = Path(__file__).with_name("gie-envoy.yaml")


def gie_envoy_config(*, listener_port: int, admin_port: int, picker_port: int,
                     replicas: list[str]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(GIE_CONFIG.read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = doc["static_resources"]
    resources["listeners"][0]["address"]["socket_address"]["port_value"] = listener_port
    clusters = {c["name"]: c for c in resources["clusters"]}
    clusters["epp"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]["port_value"] = picker_port
    clusters["pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {
            "address": a.rpartition(":")[0], "port_value": int(a.rpartition(":")[2])}}}}
        for a in replicas]
    return doc


class GieEnvoy(Process):
    """Envoy with the hand-written gateway config above, written once the replicas are known."""

    def __init__(self, workdir: Path, sim: Sim, picker_port: int) -> None:
        self.listener_port, self.admin_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.listener_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self._sim, self._picker_port = sim, picker_port
        self.config = workdir / "gie-envoy.yaml"
        super().__init__([ENVOY, "-c", str(self.config), "--use-dynamic-base-id", "-l",
                          "warning", "--concurrency", "1", "--drain-time-s", "1"],
                         workdir / "gie-envoy.log")

    def start(self) -> None:
        self.config.write_text(yaml.safe_dump(gie_envoy_config(
            listener_port=self.listener_port, admin_port=self.admin_port,
            picker_port=self._picker_port, replicas=self._sim.addresses)))
        super().start()
        wait_for(lambda: httpx.get(f"{self.admin}/ready").status_code == 200, 30,
                 "gateway envoy ready")


class Gateway:
    def __init__(self, workdir: Path) -> None:
        self.sim = Sim(workdir, replicas=3, nodes=3, extra=["--max-num-seqs", "4"])
        self.cp = ControlPlane(workdir, self.sim.pools, listener_port=free_ports(1)[0],
                               extra=["--metrics", "scrape", "--scrape-interval-s", "0.2"])
        self.picker = PickerProcess(workdir, free_ports(1)[0], self.cp.admin)
        self.envoy = GieEnvoy(workdir, self.sim, self.picker.port)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("gie"))
    with running(g.sim, g.cp, g.picker, g.envoy):
        yield g


def post(url: str, headers: dict[str, str] | None = None, **kw: object) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, headers=headers,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 4, **kw})


def test_a_gie_gateway_routes_by_this_picker(gateway: Gateway) -> None:
    a = gateway.sim.addresses
    gateway.sim.fault(a[0], slowdown=50.0)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    flood = [pool.submit(post, f"http://{a[0]}", max_tokens=200) for _ in range(8)]
    try:
        wait_for(lambda: gateway.picker.view().get(a[0], {}).get("waiting", 0) >= 2, 20,
                 "the picker seeing a queue")
        picked = gateway.picker.count("picked")
        served_reports = gateway.picker.count("served")
        responses = [post(gateway.envoy.url) for _ in range(12)]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        # Envoy honoured the first endpoint of the picker's ordered list ...
        firsts = [r.headers["x-picked"].split(",")[0] for r in responses]
        assert firsts == [r.headers["x-hybridlb-replica"] for r in responses]
        assert all(len(r.headers["x-picked"].split(",")) == 3 for r in responses)
        # ... which never named the replica with the queue first.
        assert a[0] not in firsts
        assert gateway.picker.count("picked") >= picked + 12
        # The gateway reported each served endpoint back on the response headers.
        assert gateway.picker.count("served") >= served_reports + 12
    finally:
        gateway.sim.fault(a[0], slowdown=1.0)
        for f in flood:
            f.result(timeout=120)
        pool.shutdown()


def test_the_subset_hint_restricts_the_pick_and_an_ineligible_one_is_503(
    gateway: Gateway,
) -> None:
    only = gateway.sim.addresses[1]
    served = {post(gateway.envoy.url, headers={"x-test-subset": only})
              .headers["x-hybridlb-replica"] for _ in range(6)}
    assert served == {only}
    r = post(gateway.envoy.url, headers={"x-test-subset": "10.255.255.1:9"})
    assert r.status_code == 503
    assert "no eligible endpoint" in r.text


def test_streamed_responses_pass_through_the_picker_whole(gateway: Gateway) -> None:
    with httpx.stream("POST", gateway.envoy.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 8,
                            "stream": True}) as r:
        text = "".join(r.iter_text())
    assert r.status_code == 200
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_a_client_sent_endpoint_header_is_dropped_before_the_picker(gateway: Gateway) -> None:
    target = gateway.sim.addresses[2]
    gateway.sim.fault(target, slowdown=50.0)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    flood = [pool.submit(post, f"http://{target}", max_tokens=200) for _ in range(8)]
    try:
        wait_for(lambda: gateway.picker.view().get(target, {}).get("waiting", 0) >= 2, 20,
                 "the picker seeing a queue")
        served = [post(gateway.envoy.url, headers={CHOSEN: target}).headers["x-hybridlb-replica"]
                  for _ in range(6)]
        assert target not in served
    finally:
        gateway.sim.fault(target, slowdown=1.0)
        for f in flood:
            f.result(timeout=120)
        pool.shutdown()


# --- 2. This control plane's pushed ext_proc config with a picker written from the protocol.

SELECT = "test-epp-endpoint-selection"
DELAY = "test-epp-delay"
TIMEOUT_S = 2.0


class HeaderPicker(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The protocol's endpoint picker, minimal: the endpoint a request header names, in the
    `x-gateway-destination-endpoint` header and `envoy.lb` metadata; every other message
    answered with "continue"."""

    def __init__(self) -> None:
        #: Requests that reached this picker still carrying a client's endpoint header.
        self.saw_client_endpoint = 0

    def Process(self, requests: Iterator[ep.ProcessingRequest],
                context: grpc.ServicerContext) -> Iterator[ep.ProcessingResponse]:
        for request in requests:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                headers = {h.key: h.raw_value.decode() or h.value
                           for h in request.request_headers.headers.headers}
                self.saw_client_endpoint += CHOSEN in headers
                if DELAY in headers:
                    time.sleep(float(headers[DELAY]))  # past Envoy's message timeout
                chosen = headers.get(SELECT, "")
                common = ep.CommonResponse()
                metadata = None
                if chosen:
                    common.header_mutation.set_headers.append(base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=CHOSEN, raw_value=chosen.encode())))
                    common.clear_route_cache = True
                    metadata = struct_pb2.Struct()
                    metadata.update({"envoy.lb": {CHOSEN: chosen}})
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                            dynamic_metadata=metadata)
            elif kind == "request_body":
                yield ep.ProcessingResponse(request_body=ep.BodyResponse())
            elif kind == "request_trailers":
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            elif kind == "response_headers":
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind == "response_body":
                yield ep.ProcessingResponse(response_body=ep.BodyResponse())
            else:
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


class Pushed:
    def __init__(self, workdir: Path, picker_port: int, picker: HeaderPicker) -> None:
        self.picker = picker
        self.sim = Sim(workdir, replicas=3, nodes=3, name="sim2")
        self.cp = ControlPlane(workdir, self.sim.pools, listener_port=free_ports(1)[0],
                               name="cp2",
                               extra=["--extproc-address", f"127.0.0.1:{picker_port}",
                                      "--extproc-timeout-s", str(TIMEOUT_S)])
        self.envoy = Envoy(workdir, xds_port=self.cp.xds_port, name="envoy2")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    port = free_ports(1)[0]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    picker = HeaderPicker()
    ep_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    p = Pushed(tmp_path_factory.mktemp("pushed"), port, picker)
    try:
        with running(p.sim, p.cp, p.envoy):
            wait_for(lambda: post(p.envoy.url).status_code == 200, 20, "routes")
            yield p
    finally:
        threading.Thread(target=server.stop, args=(1,)).start()


@pytest.mark.parametrize("model_header", [False, True], ids=["no-x-model", "x-model"])
def test_the_pushed_config_obeys_a_protocol_picker(pushed: Pushed, model_header: bool) -> None:
    pool = yaml.safe_load(pushed.sim.pools.read_text())["pools"][0]["name"]
    for target in pushed.sim.addresses:
        headers = {SELECT: target, **({"x-model": pool} if model_header else {})}
        served = {post(pushed.envoy.url, headers=headers).headers["x-hybridlb-replica"]
                  for _ in range(4)}
        assert served == {target}, (target, served)


def test_without_a_pick_the_pushed_config_goes_by_the_weights(pushed: Pushed) -> None:
    served = {post(pushed.envoy.url).headers["x-hybridlb-replica"] for _ in range(30)}
    assert len(served) > 1


def test_a_client_cannot_choose_its_replica_when_the_pick_times_out(pushed: Pushed) -> None:
    target = pushed.sim.addresses[0]
    served = []
    for _ in range(5):
        r = post(pushed.envoy.url, headers={CHOSEN: target, DELAY: str(TIMEOUT_S + 0.5)})
        assert r.status_code == 200  # failed open ...
        served.append(r.headers["x-hybridlb-replica"])
    # ... to the weights, not to the replica the client named, which no picker ever saw.
    assert set(served) != {target}
    assert pushed.picker.saw_client_endpoint == 0
