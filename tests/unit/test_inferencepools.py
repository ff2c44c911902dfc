"""InferencePool → pool: what an object of the API says, and which replicas it makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakekube import make_inference_pool, make_pod
from xds_server.sources.inferencepools import (
    GROUP,
    PLURAL,
    VERSION,
    InferencePool,
    parse_inference_pool,
    pod_member,
    replicas,
)


def test_a_valid_inference_pool_is_read() -> None:
    pool = parse_inference_pool(make_inference_pool(
        "qwen3", namespace="ml", match_labels={"model": "qwen3", "app": "vllm"},
        ports=[8000, 8001]))
    assert pool == InferencePool(namespace="ml", name="qwen3",
                                 match_labels=(("app", "vllm"), ("model", "qwen3")),
                                 ports=(8000, 8001))


def broken(edit: Any) -> dict[str, Any]:
    obj = make_inference_pool("qwen3")
    edit(obj)
    return obj


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        (broken(lambda o: o["spec"].update(selector={})), "matchLabels"),
        (broken(lambda o: o["spec"].update(selector={"matchLabels": {"a": 1}})), "matchLabels"),
        (broken(lambda o: o["spec"].update(targetPorts=[])), "targetPorts is empty"),
        (broken(lambda o: o["spec"].pop("targetPorts")), "targetPorts is empty"),
        (broken(lambda o: o["spec"].update(targetPorts=[{"number": 0}])), "targetPorts[0]"),
        (broken(lambda o: o["spec"].update(targetPorts=[{"number": "80"}])), "targetPorts[0]"),
        (broken(lambda o: o.update(spec=None)), "matchLabels"),
        (broken(lambda o: o["metadata"].update(name="")), "not a valid pool name"),
    ],
)
def test_a_malformed_inference_pool_carries_its_problem(obj: dict[str, Any], problem: str) -> None:
    assert problem in parse_inference_pool(obj).problem


def test_replicas_are_the_target_ports_of_the_selected_routable_pods_of_its_namespace() -> None:
    pool = parse_inference_pool(make_inference_pool(
        "qwen3", match_labels={"model": "qwen3"}, ports=[8000, 8001]))
    members = [pod_member(p) for p in [
        make_pod("a", ip="10.0.0.1", labels={"model": "qwen3"},
                 annotations={"hybridlb.io/dp-rank": "4"}),
        make_pod("b", ip="10.0.0.2", labels={"model": "qwen3"}, ready=False),
        make_pod("c", ip="10.0.0.3", labels={"model": "llama"}),
        make_pod("d", ip="10.0.0.4", labels={"model": "qwen3"}, namespace="other"),
        make_pod("e", ip="10.0.0.5", labels={"model": "qwen3"},
                 args=["vllm", "serve", "m", "--data-parallel-size-local", "2"]),
    ]]
    found = {(r.address, r.dp_rank, r.capacity) for r in replicas(pool, members)}
    assert found == {("10.0.0.1:8000", 4, 1), ("10.0.0.1:8001", 5, 1),
                     ("10.0.0.5:8000", 0, 2), ("10.0.0.5:8001", 1, 2)}


def test_a_pod_needs_no_pool_name_of_its_own() -> None:
    member = pod_member(make_pod("a", ip="10.0.0.1", args=["python", "-m", "server"]))
    assert member.result.replica is not None and member.result.problems == ()


def test_the_shipped_crd_takes_what_the_test_api_server_serves_and_refuses_broken_pools() -> None:
    """deploy/crds/inferencepool.yaml's schema (as the API server would apply it) against
    the objects the fake API server serves in these tests."""
    jsonschema = pytest.importorskip("jsonschema")  # with kubernetes-validate (test extra)
    crd = yaml.safe_load((Path(__file__).parents[2] / "deploy/crds/inferencepool.yaml")
                         .read_text())
    (version,) = crd["spec"]["versions"]
    assert (crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]) == (
        GROUP, VERSION, PLURAL)
    validator = jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])
    validator.validate(make_inference_pool("qwen3", match_labels={"model": "qwen3"},
                                           ports=[8000, 8001]))
    for bad in (broken(lambda o: o["spec"].update(targetPorts=[])),
                broken(lambda o: o["spec"].update(targetPorts=[{"number": 70000}])),
                broken(lambda o: o["spec"].update(selector={})),
                broken(lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Maybe"))):
        assert not validator.is_valid(bad)
