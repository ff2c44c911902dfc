"""Envoy's own load-aware balancers as a cluster's `load_balancing_policy`.

`--lb-policy` offers them beside least-request and round robin so that a user (and the
routing benchmark) can compare the project's weights with what Envoy 1.40 does alone:

- `orca_wrr`: `client_side_weighted_round_robin`. Endpoint weight = rps_fractional /
  utilization from ORCA reports (Envoy's OrcaWeightManager refuses a report without a positive
  `rps_fractional`, and a host without a valid weight gets the median, else 1). vLLM reports
  only `named_metrics.num_requests_waiting` and `named_metrics.kv_cache_usage_perc`, and only
  on non-streamed responses: every weight stays at the default, so this is a weighted round
  robin of equal weights. Built as documented (utilization from vLLM's KV-cache use) so it
  would work the day vLLM reports a request rate.
- `load_aware_locality`: locality weights = healthy hosts x (1 - smoothed utilization), all
  traffic local while the local locality's utilization is within a threshold of the remote
  average, a probe share elsewhere; least-request inside a locality. Utilization is ORCA's
  `application_utilization` or `cpu_utilization` only (its named-metric selection is not
  implemented in 1.40), which vLLM never sends: every locality reads idle, so a node's Envoy
  stays local (less the probe share) and an Envoy on no node spreads by host count.
  xds-protos does not carry this message (it is alpha in 1.40), so it is encoded here from
  its .proto (envoy/extensions/load_balancing_policies/load_aware_locality/v3).

The local locality is the Envoy's bootstrap `node.locality` (`sub_zone` = its node), which
`hybridlb bootstrap` sets.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    message_factory,
    wrappers_pb2,  # noqa: F401 (the descriptor below depends on it)
)
from google.protobuf.message import Message

#: `--lb-policy` values that configure an extension policy rather than the `lb_policy` enum.
EXTENSION_POLICIES = ("orca_wrr", "load_aware_locality")
#: The request header that asks vLLM for an ORCA report, and the format Envoy parses.
ORCA_FORMAT_HEADER = ("endpoint-load-metrics-format", "TEXT")

_LAL_PACKAGE = "envoy.extensions.load_balancing_policies.load_aware_locality.v3"


def _load_aware_locality_class() -> Any:
    """The LoadAwareLocality message class, from a descriptor equal to the .proto's fields."""
    full_name = f"{_LAL_PACKAGE}.LoadAwareLocality"
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    except KeyError:
        pass
    f = descriptor_pb2.FieldDescriptorProto
    fields = [
        ("endpoint_picking_policy", 1, ".envoy.config.cluster.v3.LoadBalancingPolicy"),
        ("weight_update_period", 2, ".google.protobuf.Duration"),
        ("utilization_variance_threshold", 4, ".google.protobuf.DoubleValue"),
        ("ewma_alpha", 5, ".google.protobuf.DoubleValue"),
        ("probe_percentage", 6, ".google.protobuf.DoubleValue"),
        ("weight_expiration_period", 7, ".google.protobuf.Duration"),
    ]
    message = descriptor_pb2.DescriptorProto(name="LoadAwareLocality", field=[
        f(name=name, number=number, label=f.LABEL_OPTIONAL, type=f.TYPE_MESSAGE, type_name=kind)
        for name, number, kind in fields
    ])
    message.field.append(f(name="metric_names_for_computing_utilization", number=3,
                           label=f.LABEL_REPEATED, type=f.TYPE_STRING))
    pool.Add(descriptor_pb2.FileDescriptorProto(
        name="envoy/extensions/load_balancing_policies/load_aware_locality/v3/"
             "load_aware_locality.proto",
        package=_LAL_PACKAGE, syntax="proto3", message_type=[message],
        dependency=["envoy/config/cluster/v3/cluster.proto", "google/protobuf/duration.proto",
                    "google/protobuf/wrappers.proto"],
    ))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


LoadAwareLocality = _load_aware_locality_class()


def _policy(name: str, config: Message) -> cluster_pb2.LoadBalancingPolicy:
    packed = any_pb2.Any()
    packed.Pack(config)
    return cluster_pb2.LoadBalancingPolicy(policies=[cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=f"envoy.load_balancing_policies.{name}", typed_config=packed))])


def extension_policy(lb_policy: str) -> cluster_pb2.LoadBalancingPolicy:
    """The cluster's `load_balancing_policy` for one of EXTENSION_POLICIES."""
    if lb_policy == "orca_wrr":
        return _policy("client_side_weighted_round_robin", cswrr_pb2.ClientSideWeightedRoundRobin(
            metric_names_for_computing_utilization=["named_metrics.kv_cache_usage_perc"],
            weight_update_period=duration_pb2.Duration(seconds=1),
        ))
    if lb_policy == "load_aware_locality":
        return _policy("load_aware_locality", LoadAwareLocality(
            endpoint_picking_policy=_policy("least_request", least_request_pb2.LeastRequest()),
            weight_update_period=duration_pb2.Duration(seconds=1),
        ))
    raise ValueError(f"not an extension policy: {lb_policy!r}")
