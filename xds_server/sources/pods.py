"""Pod → replica: what one Kubernetes pod contributes to a pool, as a pure function.

Kept apart from the watch so that every rule (routability, draining, metadata precedence,
vLLM's own arguments) is a table-driven test on plain dicts: the pod as the API server
sends it (camelCase JSON), never the client's model objects.

Each value is taken from the first of these that has a usable one:

    annotation `hybridlb.io/KEY` > label `hybridlb.io/KEY` > vLLM's container args > default

A value that does not parse is reported as a `Problem` (the watch logs and counts it) and
ignored, as if it were absent: the pod keeps routing on the next source's value.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from xds_server.addresses import is_ip
from xds_server.model import Replica, ReplicaState
from xds_server.sources.names import valid_pool_name

T = TypeVar("T")

PREFIX = "hybridlb.io/"
DEFAULT_PORT = 8000
MAX_CAPACITY = 4096
_ZONE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# vLLM's short spellings (vllm/engine/arg_utils.py); long flags also accept underscores.
_ALIASES = {
    "-dp": "--data-parallel-size",
    "-dpl": "--data-parallel-size-local",
    "-dpn": "--data-parallel-rank",
    "-dpr": "--data-parallel-start-rank",
}
_VALUE_FLAGS = frozenset({
    "--port", "--model", "--served-model-name", "--data-parallel-size",
    "--data-parallel-size-local", "--data-parallel-rank", "--data-parallel-start-rank",
    "--max-num-seqs",
})
#: The most sequences a rank is believed to run at once; vLLM sets no bound.
MAX_NUM_SEQS = 1 << 20


@dataclass(frozen=True)
class Problem:
    """A value that was ignored: `key` is the metadata key (bounded, a metric label)."""

    key: str
    message: str


@dataclass(frozen=True)
class PodReplica:
    """One pod's contribution: a replica in `pool`, or `replica is None` and why not."""

    pod: str  # NAMESPACE/NAME
    pool: str = ""
    replica: Replica | None = None
    #: Why the pod is not routable (pending, not ready, ...): debug detail, not a warning.
    skipped: str = ""
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class VllmArgs:
    """What a vLLM command line says about the server, as raw strings (None: absent)."""

    model: str | None = None
    served_model_name: str | None = None
    port: str | None = None
    dp_size: str | None = None
    dp_size_local: str | None = None
    dp_rank: str | None = None
    dp_start_rank: str | None = None
    max_num_seqs: str | None = None


def parse_vllm_args(tokens: Sequence[str]) -> VllmArgs:
    """Read `vllm serve MODEL --flag value --flag=value ...` (argparse's last one wins)."""
    found: dict[str, str] = {}
    model: str | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name, eq, inline = token.partition("=")
            if name.startswith("--"):
                name = "--" + name[2:].replace("_", "-")
            name = _ALIASES.get(name, name)
            if name in _VALUE_FLAGS:
                if eq:
                    found[name] = inline
                elif i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                    found[name] = tokens[i + 1]
                    i += 1
                else:
                    found[name] = ""
        elif (token == "serve" and model is None and i + 1 < len(tokens)
              and not tokens[i + 1].startswith("-")):
            model = tokens[i + 1]
            i += 1
        i += 1
    return VllmArgs(
        model=model if model is not None else found.get("--model"),
        served_model_name=found.get("--served-model-name"),
        port=found.get("--port"),
        dp_size=found.get("--data-parallel-size"),
        dp_size_local=found.get("--data-parallel-size-local"),
        dp_rank=found.get("--data-parallel-rank"),
        dp_start_rank=found.get("--data-parallel-start-rank"),
        max_num_seqs=found.get("--max-num-seqs"),
    )


def container_tokens(container: Mapping[str, Any]) -> list[str]:
    """A container's command and args as one argv.

    `sh -c "vllm serve ..."` is common in vLLM manifests, so an element with spaces is split
    the way a shell would (a script it cannot split is split on whitespace).
    """
    tokens: list[str] = []
    for element in [*_list(container.get("command")), *_list(container.get("args"))]:
        text = str(element)
        if any(c.isspace() for c in text):
            try:
                tokens.extend(shlex.split(text))
            except ValueError:
                tokens.extend(text.split())
        else:
            tokens.append(text)
    return tokens


def pod_to_replica(pod: Mapping[str, Any], *, default_pool: str = "") -> PodReplica:
    """What `pod` contributes; `default_pool` is the configured pool name of its selector."""
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    status = _mapping(pod.get("status"))
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    if status.get("phase") != "Running":
        return PodReplica(pod=key, skipped=f"phase {status.get('phase') or 'unknown'}")
    host = status.get("podIP")
    if not host:
        return PodReplica(pod=key, skipped="no pod IP")
    draining = bool(meta.get("deletionTimestamp"))
    if not draining and not _ready(status):
        return PodReplica(pod=key, skipped="not Ready")
    if not is_ip(str(host)):
        problem = Problem("ip", f"status.podIP {host!r} is not an IP address")
        return PodReplica(pod=key, skipped="bad pod IP", problems=(problem,))

    reader = _Reader(
        annotations=_mapping(meta.get("annotations")), labels=_mapping(meta.get("labels"))
    )
    containers = [_mapping(c) for c in _list(spec.get("containers"))]
    vllm = _vllm_container(containers)
    args = parse_vllm_args(container_tokens(vllm)) if vllm is not None else VllmArgs()

    pool = reader.pick(
        "pool",
        [("pool", default_pool or None), ("--served-model-name", args.served_model_name),
         ("model", args.model)],
        _pool_name,
    )
    port = reader.pick(
        "port",
        [("--port", args.port), ("container port http", _named_port(vllm, containers, "http")),
         ("default", str(DEFAULT_PORT))],
        _port,
    )
    capacity = reader.pick(
        "dp-size-local",
        [("--data-parallel-size-local", args.dp_size_local),
         # One rank per server in external-LB mode; all of them in single-node internal mode.
         ("--data-parallel-rank", "1" if args.dp_rank is not None else None),
         ("--data-parallel-size", args.dp_size), ("default", "1")],
        _capacity,
    )
    dp_rank = reader.pick(
        "dp-rank",
        [("--data-parallel-start-rank", args.dp_start_rank),
         ("--data-parallel-rank", args.dp_rank), ("default", "0")],
        _rank,
    )
    max_num_seqs = reader.pick("max-num-seqs", [("--max-num-seqs", args.max_num_seqs)],
                               _max_num_seqs)
    metrics_port = reader.pick("metrics-port", [("default", "0")], _metrics_port)
    metrics_path = reader.pick("metrics-path", [("default", "/metrics")], _metrics_path)
    zone = reader.pick("zone", [("default", "")], _zone)
    node = str(spec.get("nodeName") or "")
    if not node:
        reader.problems.append(Problem("node", "spec.nodeName is empty; using 'unknown'"))
        node = "unknown"
    if pool is None:
        reader.problems.append(Problem(
            "pool", f"no pool name: set {PREFIX}pool, a pool name in the config, or "
            "vLLM's --served-model-name"))
        return PodReplica(pod=key, skipped="no pool", problems=_one_per_key(reader.problems))
    assert port is not None and capacity is not None and dp_rank is not None  # has defaults
    replica = Replica(
        host=str(host),
        port=port,
        node=node,
        capacity=capacity,
        state=ReplicaState.DRAINING if draining else ReplicaState.READY,
        zone=zone or "",
        origin=f"pod {key}",
        metrics_port=metrics_port or 0,
        metrics_path=metrics_path or "/metrics",
        dp_rank=dp_rank,
        max_num_seqs=max_num_seqs,
    )
    return PodReplica(pod=key, pool=pool, replica=replica,
                      problems=_one_per_key(reader.problems))


class _Reader:
    """Walks one key's sources in precedence order, collecting what it had to ignore."""

    def __init__(self, *, annotations: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        self.annotations = annotations
        self.labels = labels
        self.problems: list[Problem] = []

    def pick(
        self, key: str, fallbacks: Sequence[tuple[str, str | None]], parse: Callable[[str], T]
    ) -> T | None:
        candidates = [
            (f"annotation {PREFIX}{key}", self.annotations.get(PREFIX + key)),
            (f"label {PREFIX}{key}", self.labels.get(PREFIX + key)),
            *fallbacks,
        ]
        for where, raw in candidates:
            if raw is None:
                continue
            try:
                return parse(str(raw))
            except ValueError as exc:
                self.problems.append(Problem(key, f"{where}: {raw!r} ignored: {exc}"))
        return None


def _one_per_key(problems: Sequence[Problem]) -> tuple[Problem, ...]:
    """One problem per key, so a pod counts once per key however many sources failed
    (`sh -c "vllm serve $MODEL"`: the unexpanded model, then no pool name at all)."""
    merged: dict[str, list[str]] = {}
    for problem in problems:
        merged.setdefault(problem.key, []).append(problem.message)
    return tuple(Problem(key, "; ".join(messages)) for key, messages in merged.items())


def _pool_name(text: str) -> str:
    if not valid_pool_name(text):
        raise ValueError("not a valid pool name")
    return text


def _int_in(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"not in {low}..{high}")
    return value


def _port(text: str) -> int:
    return _int_in(text, 1, 65535)


def _metrics_port(text: str) -> int:
    return _int_in(text, 0, 65535)


def _capacity(text: str) -> int:
    return _int_in(text, 1, MAX_CAPACITY)


def _rank(text: str) -> int:
    return _int_in(text, 0, 1 << 20)


def _max_num_seqs(text: str) -> int:
    return _int_in(text, 1, MAX_NUM_SEQS)


def _metrics_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError("not an absolute URL path")
    return text


def _zone(text: str) -> str:
    if text and not _ZONE.match(text):
        raise ValueError("not a valid zone name")
    return text


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    """A list field of the pod, or none: a wrongly typed field must not stop the watch."""
    return value if isinstance(value, list) else []


def _ready(status: Mapping[str, Any]) -> bool:
    return any(
        _mapping(c).get("type") == "Ready" and _mapping(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )


def _vllm_container(containers: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The container that runs vLLM: the first whose argv mentions vllm, else the first."""
    for container in containers:
        if any("vllm" in token for token in container_tokens(container)):
            return container
    return containers[0] if containers else None


def _named_port(
    first: Mapping[str, Any] | None, containers: Sequence[Mapping[str, Any]], name: str
) -> str | None:
    ordered = [first, *containers] if first is not None else list(containers)
    for container in ordered:
        for port in _list(container.get("ports")):
            port = _mapping(port)
            if port.get("name") == name and port.get("containerPort") is not None:
                return str(port["containerPort"])
    return None
