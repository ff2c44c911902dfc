"""Pod → replica: routability, draining, metadata precedence and vLLM's own arguments."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakekube import make_pod
from xds_server.model import Replica, ReplicaState
from xds_server.sources.pods import (
    PodReplica,
    VllmArgs,
    container_tokens,
    parse_vllm_args,
    pod_to_replica,
)


def pod(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("ip", "10.0.0.7")
    kwargs.setdefault("annotations", {"hybridlb.io/pool": "qwen3"})
    return make_pod("p", namespace="ns", **kwargs)


def replica(result: PodReplica) -> Replica:
    assert result.replica is not None, result
    return result.replica


def test_running_ready_pod_is_a_ready_replica_with_documented_defaults() -> None:
    result = pod_to_replica(pod(node="gpu-1"))
    assert result.pool == "qwen3" and result.problems == ()
    assert result.replica == Replica(host="10.0.0.7", port=8000, node="gpu-1", capacity=1,
                                     state=ReplicaState.READY, origin="pod ns/p")


@pytest.mark.parametrize(
    ("changes", "skipped"),
    [
        ({"phase": "Pending"}, "phase Pending"),
        ({"phase": "Succeeded"}, "phase Succeeded"),
        ({"ip": None}, "no pod IP"),
        ({"ready": False}, "not Ready"),
    ],
)
def test_pod_that_cannot_serve_is_not_routed(changes: dict[str, Any], skipped: str) -> None:
    result = pod_to_replica(pod(**changes))
    assert result.replica is None
    assert result.skipped == skipped


def test_terminating_pod_is_draining_even_once_it_turns_unready() -> None:
    for ready in (True, False):
        p = pod(ready=ready)
        p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        assert replica(pod_to_replica(p)).state is ReplicaState.DRAINING


def test_terminating_pod_without_ip_is_gone() -> None:
    p = pod(ip=None)
    p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_to_replica(p).replica is None


def test_unannotated_hybrid_vllm_pod_just_works() -> None:
    p = make_pod("vllm-1", namespace="ml", ip="10.1.2.3", node="gpu-7", command=["vllm"], args=[
        "serve", "Qwen/Qwen3-0.6B", "--port", "8100", "--data-parallel-size", "8",
        "--data-parallel-size-local=4", "--data-parallel-start-rank", "4",
        "--data-parallel-hybrid-lb"])
    result = pod_to_replica(p)
    assert result.problems == ()
    assert result.pool == "Qwen/Qwen3-0.6B"
    r = replica(result)
    assert (r.host, r.port, r.node, r.capacity, r.dp_rank) == ("10.1.2.3", 8100, "gpu-7", 4, 4)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["vllm", "serve", "m", "--port=9000"], VllmArgs(model="m", port="9000")),
        (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m",
          "--served-model-name", "a", "b"], VllmArgs(model="m", served_model_name="a")),
        (["vllm", "serve", "m", "-dp", "4", "-dpl", "2", "-dpr", "2"],
         VllmArgs(model="m", dp_size="4", dp_size_local="2", dp_start_rank="2")),
        (["vllm", "serve", "m", "--data_parallel_rank", "3", "--port", "1", "--port", "2"],
         VllmArgs(model="m", dp_rank="3", port="2")),  # argparse: the last one wins
        (["vllm", "serve", "m", "--port"], VllmArgs(model="m", port="")),
        (["vllm", "serve", "--enforce-eager", "--model", "m"], VllmArgs(model="m")),
        (["vllm", "serve", "m", "--max-num-seqs", "64"], VllmArgs(model="m", max_num_seqs="64")),
        (["vllm", "serve", "m", "--max_num_seqs=32"], VllmArgs(model="m", max_num_seqs="32")),
    ],
)
def test_vllm_arguments_in_both_spellings(argv: list[str], expected: VllmArgs) -> None:
    assert parse_vllm_args(argv) == expected


def test_shell_wrapped_command_is_split_like_a_shell() -> None:
    container = {"command": ["/bin/sh", "-c"],
                 "args": ["exec vllm serve 'my model' --port 8200"]}
    assert parse_vllm_args(container_tokens(container)) == VllmArgs(model="my model",
                                                                    port="8200")


@pytest.mark.parametrize(
    ("annotations", "labels", "args", "ports", "port"),
    [
        ({"hybridlb.io/port": "1"}, {"hybridlb.io/port": "2"}, ["--port", "3"], [4], 1),
        ({}, {"hybridlb.io/port": "2"}, ["--port", "3"], [4], 2),
        ({}, {}, ["--port", "3"], [4], 3),
        ({}, {}, [], [4], 4),
        ({}, {}, [], [], 8000),
    ],
)
def test_port_precedence_annotation_label_args_named_port_default(
    annotations: dict[str, str], labels: dict[str, str], args: list[str], ports: list[int],
    port: int,
) -> None:
    p = pod(annotations={"hybridlb.io/pool": "q", **annotations}, labels=labels,
            args=["vllm", "serve", "m", *args],
            ports=[{"name": "metrics", "containerPort": 9}]
            + [{"name": "http", "containerPort": n} for n in ports])
    assert replica(pod_to_replica(p)).port == port


def test_pool_precedence_annotation_label_config_served_name_model() -> None:
    args = ["vllm", "serve", "model-path", "--served-model-name", "served"]
    both = {"annotations": {"hybridlb.io/pool": "ann"}, "labels": {"hybridlb.io/pool": "lab"}}
    assert pod_to_replica(pod(**both, args=args), default_pool="cfg").pool == "ann"
    assert pod_to_replica(pod(annotations={}, labels=both["labels"], args=args),
                          default_pool="cfg").pool == "lab"
    assert pod_to_replica(pod(annotations={}, args=args), default_pool="cfg").pool == "cfg"
    assert pod_to_replica(pod(annotations={}, args=args)).pool == "served"
    assert pod_to_replica(pod(annotations={}, args=args[:3])).pool == "model-path"


def test_capacity_and_rank_follow_the_dp_mode() -> None:
    def rc(args: list[str], annotations: dict[str, str] | None = None) -> tuple[int, int]:
        r = replica(pod_to_replica(pod(args=["vllm", "serve", "m", *args], annotations={
            "hybridlb.io/pool": "q", **(annotations or {})})))
        return r.capacity, r.dp_rank

    assert rc([]) == (1, 0)
    assert rc(["--data-parallel-size", "4"]) == (4, 0)  # internal LB: one server, all ranks
    assert rc(["--data-parallel-size", "4", "--data-parallel-rank", "3"]) == (1, 3)  # external
    assert rc(["-dp", "8", "-dpl", "4", "-dpr", "4"]) == (4, 4)  # hybrid
    assert rc(["-dpl", "4", "-dpr", "4"], {"hybridlb.io/dp-size-local": "2",
                                          "hybridlb.io/dp-rank": "6"}) == (2, 6)


def test_room_per_rank_from_metadata_else_the_servers_args_else_unknown() -> None:
    def seqs(args: list[str], annotations: dict[str, str] | None = None) -> int | None:
        return replica(pod_to_replica(pod(args=["vllm", "serve", "m", *args], annotations={
            "hybridlb.io/pool": "q", **(annotations or {})}))).max_num_seqs

    assert seqs([]) is None  # vLLM's default depends on its version and GPU: learnt instead
    assert seqs(["--max-num-seqs", "48"]) == 48
    assert seqs(["--max-num-seqs", "48"], {"hybridlb.io/max-num-seqs": "16"}) == 16


def test_metrics_zone_from_annotations() -> None:
    r = replica(pod_to_replica(pod(annotations={
        "hybridlb.io/pool": "q", "hybridlb.io/metrics-port": "9100",
        "hybridlb.io/metrics-path": "/vllm/metrics", "hybridlb.io/zone": "us-east-1a"})))
    assert (r.metrics_port, r.metrics_path, r.zone) == (9100, "/vllm/metrics", "us-east-1a")


@pytest.mark.parametrize(
    ("key", "value", "field", "fallback"),
    [
        ("port", "http", "port", 8100),  # falls back to --port
        ("port", "70000", "port", 8100),
        ("dp-size-local", "0", "capacity", 2),  # falls back to --data-parallel-size-local
        ("dp-size-local", "many", "capacity", 2),
        ("dp-rank", "-1", "dp_rank", 0),
        ("metrics-port", "x", "metrics_port", 0),
        ("metrics-path", "metrics", "metrics_path", "/metrics"),
        ("zone", "a zone", "zone", ""),
        ("max-num-seqs", "0", "max_num_seqs", 12),  # falls back to --max-num-seqs
        ("max-num-seqs", "lots", "max_num_seqs", 12),
    ],
)
def test_bad_value_is_reported_and_the_next_source_wins(
    key: str, value: str, field: str, fallback: Any
) -> None:
    p = pod(annotations={"hybridlb.io/pool": "q", f"hybridlb.io/{key}": value},
            args=["vllm", "serve", "m", "--port", "8100", "-dpl", "2", "--max-num-seqs", "12"])
    result = pod_to_replica(p)
    assert getattr(replica(result), field) == fallback
    assert [problem.key for problem in result.problems] == [key]
    assert f"hybridlb.io/{key}" in result.problems[0].message
    assert repr(value) in result.problems[0].message


def test_bad_vllm_argument_falls_back_to_the_default() -> None:
    result = pod_to_replica(pod(args=["vllm", "serve", "m", "--port", "eighty", "-dpl", "x"]))
    assert (replica(result).port, replica(result).capacity) == (8000, 1)
    assert sorted(p.key for p in result.problems) == ["dp-size-local", "port"]


def test_pod_without_any_pool_name_is_skipped_with_a_problem() -> None:
    result = pod_to_replica(pod(annotations={}, args=["some-server"]))
    assert result.replica is None and result.skipped == "no pool"
    assert [p.key for p in result.problems] == ["pool"]


def test_shell_wrapped_vllm_with_an_unexpanded_model_is_one_pool_problem() -> None:
    result = pod_to_replica(pod(annotations={}, command=["sh", "-c"],
                                args=["vllm serve $MODEL --port 8000"]))
    assert result.replica is None and result.skipped == "no pool"
    (problem,) = result.problems  # counted once in bad_pool, not once per source tried
    assert problem.key == "pool"
    assert "'$MODEL'" in problem.message and "no pool name" in problem.message


def test_invalid_pod_ip_is_skipped_with_a_problem() -> None:
    result = pod_to_replica(pod(ip="not-an-ip"))
    assert result.replica is None and [p.key for p in result.problems] == ["ip"]


def test_sidecar_first_still_finds_the_vllm_container() -> None:
    p = pod(annotations={})
    p["spec"]["containers"] = [
        {"name": "proxy", "args": ["--port", "15001"],
         "ports": [{"name": "http", "containerPort": 15001}]},
        {"name": "engine", "command": ["vllm", "serve", "m", "--port", "8300"]},
    ]
    result = pod_to_replica(p)
    assert (result.pool, replica(result).port) == ("m", 8300)


def test_garbage_metadata_types_never_raise() -> None:
    p = pod()
    p["metadata"]["annotations"] = None
    p["metadata"]["labels"] = {"hybridlb.io/port": 8123}  # not a string
    p["spec"]["containers"] = [{"args": [1, None]}]
    p["status"]["conditions"] = [None, {"type": "Ready", "status": "True"}]
    p["spec"]["nodeName"] = None
    result = pod_to_replica(p, default_pool="q")
    assert (replica(result).port, replica(result).node) == (8123, "unknown")
    assert [p.key for p in result.problems] == ["node"]
