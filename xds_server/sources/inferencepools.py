"""InferencePool (Gateway API Inference Extension, inference.networking.k8s.io/v1) → pools.

Pure functions on the objects as the API server sends them (camelCase JSON), kept apart
from the watches like `pods.py`. The API (api/v1/inferencepool_types.go of
kubernetes-sigs/gateway-api-inference-extension):

    spec.selector.matchLabels   {key: value}: the pods of the pool, in its own namespace only
    spec.targetPorts[].number   the ports the pods serve on (1..65535), each `podIP:port` its
                                own endpoint: how external-LB data-parallel ranks are modelled
    spec.endpointPickerRef      the gateway's endpoint picker (not used here)

The pool's name is the InferencePool's name. Every target port of every routable pod the
selector matches is a replica; its capacity, metrics port and DP rank come from the pod as for
any pod (`pods.py`: metadata, then vLLM's arguments), the serving port from the pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xds_server.model import Replica
from xds_server.sources.names import valid_pool_name
from xds_server.sources.pods import PodReplica, pod_to_replica

GROUP = "inference.networking.k8s.io"
VERSION = "v1"
PLURAL = "inferencepools"
#: The placeholder pool a pod is read under: its pool comes from the InferencePool.
_ANY_POOL = "inferencepool"


@dataclass(frozen=True)
class InferencePool:
    """One InferencePool as the balancer reads it; `problem` set: unusable, and why."""

    namespace: str
    name: str
    match_labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[int, ...] = ()
    problem: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, member: PodMember) -> bool:
        return member.namespace == self.namespace and all(
            member.labels.get(k) == v for k, v in self.match_labels)


@dataclass(frozen=True)
class PodMember:
    """A pod of a namespace where InferencePools are watched, read before any pool claims it."""

    uid: str
    namespace: str
    labels: Mapping[str, str]
    result: PodReplica


def parse_inference_pool(obj: Mapping[str, Any]) -> InferencePool:
    """What an InferencePool object says; a malformed one carries `problem`, never raises."""
    meta = _mapping(obj.get("metadata"))
    spec = _mapping(obj.get("spec"))
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    pool = InferencePool(namespace=namespace, name=name)
    if not valid_pool_name(name):
        return dataclasses.replace(pool, problem=f"name {name!r} is not a valid pool name")
    labels = _mapping(_mapping(spec.get("selector")).get("matchLabels"))
    if not labels or not all(isinstance(k, str) and isinstance(v, str)
                             for k, v in labels.items()):
        # Required by the API: an empty selector would take every pod of the namespace.
        return dataclasses.replace(
            pool, problem="spec.selector.matchLabels must be a non-empty map of strings")
    ports: list[int] = []
    raw_ports = spec.get("targetPorts")
    for i, port in enumerate(raw_ports if isinstance(raw_ports, list) else []):
        number = _mapping(port).get("number")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            return dataclasses.replace(
                pool, problem=f"spec.targetPorts[{i}].number {number!r} is not a port")
        if number not in ports:
            ports.append(number)
    if not ports:
        return dataclasses.replace(pool, problem="spec.targetPorts is empty")
    return dataclasses.replace(pool, match_labels=tuple(sorted(labels.items())),
                               ports=tuple(ports))


def pod_member(pod: Mapping[str, Any]) -> PodMember:
    meta = _mapping(pod.get("metadata"))
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels")).items()}
    uid = str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
    return PodMember(uid=uid, namespace=str(meta.get("namespace") or ""), labels=labels,
                     result=pod_to_replica(pod, default_pool=_ANY_POOL))


def replicas(pool: InferencePool, members: Iterable[PodMember]) -> list[Replica]:
    """Every target port of every routable pod the pool selects, the first port first.

    With several ports per pod (one vLLM server per DP rank), port i fronts the pod's first
    rank + i.
    """
    found: list[Replica] = []
    for member in members:
        base = member.result.replica
        if base is None or pool.problem or not pool.selects(member):
            continue
        found.extend(dataclasses.replace(base, port=port, dp_rank=base.dp_rank + i)
                     for i, port in enumerate(pool.ports))
    return found


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
