"""The in-cluster deployment (deploy/), read as files: what `kubectl apply -k` would send.

No cluster runs here, so these tests hold the manifests to what the code they configure
accepts: serve's config loader reads the ConfigMap, bootstrap's parser reads the Envoy init
containers' arguments, the pod → replica function reads the vLLM example, and the security
posture (restricted Pod Security Standard, least-privilege RBAC) is checked field by field.
Where `kubectl` is installed, every overlay is also rendered by its built-in kustomize.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from xds_server.commands import bootstrap, serve
from xds_server.sources.pods import pod_to_replica

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBECTL = shutil.which("kubectl")
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob"}
OVERLAYS = ["overlays/gateway", "overlays/node-local", "overlays/full", "examples/vllm"]
Doc = dict[str, Any]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def patch_files() -> set[Path]:
    """Partial objects that kustomize merges into others: not manifests of their own."""
    found = set()
    for path in DEPLOY.rglob("kustomization.yaml"):
        for patch in docs(path)[0].get("patches", []):
            if "path" in patch:
                found.add((path.parent / patch["path"]).resolve())
    return found


def all_docs() -> Iterator[tuple[Path, Doc]]:
    """Every whole manifest (no kustomization, no patch, no Prometheus config)."""
    patches = patch_files()
    for path in yaml_files():
        if (path.name != "kustomization.yaml" and path.resolve() not in patches
                and path.parent.name != "prometheus"):
            for doc in docs(path):
                yield path, doc


def find(kind: str, name: str) -> Doc:
    matches = [d for _, d in all_docs() if d.get("kind") == kind
               and d.get("metadata", {}).get("name") == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} definitions"
    return matches[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def port_named(container: Doc, name: str) -> int:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"{container['name']}: no single port named {name}"
    return int(ports[0])


# --- every file -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_typed_documents(path: Path) -> None:
    found = docs(path)
    assert found, "empty"
    if path.parent.name == "prometheus":
        assert "scrape_configs" in found[0]
        return
    for doc in found:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: untyped document"


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomization_references_exist(path: Path) -> None:
    doc = docs(path)[0]
    refs = [*doc.get("resources", []), *doc.get("components", [])]
    refs += [p["path"] for p in doc.get("patches", []) if "path" in p]
    for generator in doc.get("configMapGenerator", []):
        refs += [f.split("=", 1)[-1] for f in generator.get("files", [])]
    assert refs, "references nothing"
    for ref in refs:
        target = (path.parent / ref).resolve()
        assert target.exists(), f"{ref} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{ref}: no kustomization.yaml"
        # kustomize refuses files outside the kustomization's root (LoadRestrictionsRootOnly).
        if ref in [f.split("=", 1)[-1] for g in doc.get("configMapGenerator", [])
                   for f in g.get("files", [])]:
            assert path.parent in target.parents


def test_every_manifest_is_used_by_some_kustomization() -> None:
    """A manifest no kustomization lists is never applied: a forgotten file, not a feature."""
    used: set[Path] = set()
    for path in kustomizations():
        doc = docs(path)[0]
        names = [*doc.get("resources", []), *[p["path"] for p in doc.get("patches", [])
                                              if "path" in p]]
        used |= {(path.parent / n).resolve() for n in names}
    manifests = {p.resolve() for p in yaml_files()
                 if p.name != "kustomization.yaml" and p.parent.name != "prometheus"}
    assert manifests - used == set()


# --- security posture -----------------------------------------------------------------------


def workloads() -> list[tuple[str, Doc]]:
    return [(f"{p.relative_to(DEPLOY)}:{d['metadata']['name']}", d) for p, d in all_docs()
            if d.get("kind") in WORKLOADS]


def test_the_deployment_has_workloads_of_every_kind_it_promises() -> None:
    names = {d["metadata"]["name"] for _, d in workloads()}
    assert {"hybridlb", "hybridlb-gateway", "hybridlb-node-envoy", "vllm-qwen3"} <= names


@pytest.mark.parametrize(("where", "workload"), workloads(), ids=[w for w, _ in workloads()])
def test_every_container_is_locked_down_and_bounded(where: str, workload: Doc) -> None:
    pod_security = pod_spec(workload).get("securityContext", {})
    for c in containers(workload):
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert not sc.get("capabilities", {}).get("add"), c["name"]
        assert not sc.get("privileged"), c["name"]
        seccomp = sc.get("seccompProfile") or pod_security.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
        resources = c.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{c['name']} {bound}"
    assert not pod_spec(workload).get("hostNetwork")
    assert not pod_spec(workload).get("hostPID")


def test_rbac_grants_only_reading_pods_and_inference_pools() -> None:
    roles = [d for _, d in all_docs() if d.get("kind") in ("Role", "ClusterRole")]
    assert {r["kind"] for r in roles} == {"Role", "ClusterRole"}
    for role in roles:
        readable = {(g, r) for rule in role["rules"] for g in rule["apiGroups"]
                    for r in rule["resources"]}
        assert readable == {("", "pods"), ("inference.networking.k8s.io", "inferencepools")}
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
            assert "resourceNames" not in rule


def test_only_the_control_plane_gets_a_service_account_token() -> None:
    for _, workload in workloads():
        spec = pod_spec(workload)
        if workload["metadata"]["name"] == "hybridlb":
            assert spec["serviceAccountName"] == "hybridlb"
        else:
            assert spec.get("automountServiceAccountToken") is False


# --- the control plane ----------------------------------------------------------------------


def serve_settings(tmp_path: Path) -> Any:
    config = tmp_path / "config.yaml"
    config.write_text(find("ConfigMap", "hybridlb-config")["data"]["config.yaml"])
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    deployment = find("Deployment", "hybridlb")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:1] == ["serve"]
    mount = {v["mountPath"]: v["name"] for v in
             deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    config_path = Path(args[args.index("--config") + 1])
    assert mount[str(config_path.parent)] == "config"
    flags = [str(config) if a == str(config_path) else a for a in args[1:]]
    return serve.settings_from_args(parser.parse_args(flags))


def test_the_configmap_is_a_config_serve_accepts(tmp_path: Path) -> None:
    settings = serve_settings(tmp_path)
    assert settings.kubernetes.enabled
    assert settings.kubernetes.kubeconfig is None  # the pod's service account
    namespace = docs(DEPLOY / "base/kustomization.yaml")[0]["namespace"]
    assert {ns for p in settings.kubernetes.pools for ns in p.namespaces} == {namespace}
    # The kubelet's probes, the Envoys and Prometheus reach the pod IP; nothing else binds.
    assert settings.admin.host == settings.xds.host == settings.extproc.host == "$(POD_IP)"
    container = find("Deployment", "hybridlb")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_probes_and_services_point_at_the_ports_serve_binds(tmp_path: Path) -> None:
    settings = serve_settings(tmp_path)
    deployment = find("Deployment", "hybridlb")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert port_named(container, "admin") == settings.admin.port
    assert port_named(container, "grpc-xds") == settings.xds.port
    # The picker runs by default, and Envoys reach it through its Service in this namespace.
    assert port_named(container, "grpc-extproc") == settings.extproc.port > 0
    # Its counters are exported from the child it runs in, on a port of its own.
    assert port_named(container, "picker-admin") == settings.extproc.admin_port > 0
    namespace = docs(DEPLOY / "base/kustomization.yaml")[0]["namespace"]
    assert settings.envoy.extproc_address == (
        f"hybridlb-extproc.{namespace}.svc.cluster.local:{settings.extproc.port}")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name, ports in (("hybridlb-xds", [settings.xds.port]),
                        ("hybridlb-admin", [settings.admin.port, settings.extproc.admin_port]),
                        ("hybridlb-extproc", [settings.extproc.port])):
        service = find("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert [p["port"] for p in service["spec"]["ports"]] == ports
    pdb = find("PodDisruptionBudget", "hybridlb")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def _policies_for(labels: dict[str, str]) -> list[Doc]:
    return [d for _, d in all_docs() if d.get("kind") == "NetworkPolicy"
            and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]


def _admitted(policies: list[Doc], port: str | int) -> list[list[Doc]]:
    """The `from` lists of the rules that open `port` (an empty list: from anywhere)."""
    return [rule.get("from", []) for p in policies for rule in p["spec"]["ingress"]
            if any(q["port"] == port for q in rule.get("ports", []))]


PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def test_network_policies_admit_only_envoys_to_ads_and_only_prometheus_to_metrics() -> None:
    control_plane = find("Deployment", "hybridlb")
    policies = _policies_for(control_plane["spec"]["template"]["metadata"]["labels"])
    assert policies and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    envoy_labels = find("Deployment", "hybridlb-gateway")["spec"]["template"]["metadata"][
        "labels"]
    # ADS and the picker serve hosts: Envoys of this namespace only.
    for port in ("grpc-xds", "grpc-extproc"):
        (sources,) = _admitted(policies, port)
        assert len(sources) == 1 and set(sources[0]) == {"podSelector"}, sources
        assert sources[0]["podSelector"]["matchLabels"].items() <= envoy_labels.items()
    assert _admitted(policies, "admin") == _admitted(policies, "picker-admin") == [[PROMETHEUS]]
    # Every port of the control plane is covered by some rule: none is open to all.
    for port in control_plane["spec"]["template"]["spec"]["containers"][0]["ports"]:
        assert _admitted(policies, port["name"]), port


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "hybridlb-gateway"),
                                            ("DaemonSet", "hybridlb-node-envoy")])
def test_envoys_listeners_are_open_and_their_stats_only_to_prometheus(
    kind: str, name: str
) -> None:
    workload = find(kind, name)
    policies = _policies_for(workload["spec"]["template"]["metadata"]["labels"])
    assert _admitted(policies, "http") == [[]]
    assert _admitted(policies, "stats") == [[PROMETHEUS]]
    for port in pod_spec(workload)["containers"][0]["ports"]:
        assert _admitted(policies, port["name"]), port


# --- Envoy ----------------------------------------------------------------------------------


def bootstrap_args(workload: Doc) -> argparse.Namespace:
    init = pod_spec(workload)["initContainers"][0]
    assert init["image"] == find("Deployment", "hybridlb")["spec"]["template"]["spec"][
        "containers"][0]["image"], "the bootstrap comes from the control-plane image"
    assert init["args"][0] == "bootstrap"
    parser = argparse.ArgumentParser()
    bootstrap.add_arguments(parser)
    return parser.parse_args(init["args"][1:])


@pytest.mark.parametrize(("name", "kind", "node"), [
    ("hybridlb-gateway", "Deployment", ""),
    ("hybridlb-node-envoy", "DaemonSet", "$(NODE_NAME)"),
])
def test_envoy_bootstrap_reaches_the_control_plane_and_keeps_its_admin_local(
    tmp_path: Path, name: str, kind: str, node: str
) -> None:
    workload = find(kind, name)
    args = bootstrap_args(workload)
    settings = serve_settings(tmp_path)
    namespace = docs(DEPLOY / "base/kustomization.yaml")[0]["namespace"]
    assert args.xds_address == [f"hybridlb-xds.{namespace}.svc.cluster.local:{settings.xds.port}"]
    assert args.node == node
    assert args.id == "envoy-$(POD_NAME)"
    assert args.admin_host == "127.0.0.1"
    init = pod_spec(workload)["initContainers"][0]
    env = env_of(init)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    if node:
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    envoy = pod_spec(workload)["containers"][0]
    config = envoy["args"][envoy["args"].index("-c") + 1]
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    assert Path(args.output).parent == Path(mounts["bootstrap"]) == Path(config).parent
    assert port_named(envoy, "stats") == args.stats_port
    assert port_named(envoy, "http") == settings.envoy.listener_port
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "stats"}


def test_node_envoys_run_only_on_gpu_nodes() -> None:
    spec = pod_spec(find("DaemonSet", "hybridlb-node-envoy"))
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert find("Service", "hybridlb-local")["spec"]["internalTrafficPolicy"] == "Local"


def test_stats_listener_forwards_only_stats_and_ready_to_the_admin() -> None:
    doc = bootstrap.build_bootstrap(xds_host="10.0.0.1", xds_port=18000, admin_port=9901,
                                    stats_port=9902)
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9902}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = {r["match"]["path"] for r in routes if "route" in r}
    assert forwarded == {"/stats/prometheus", "/ready"}
    assert all(r["match"]["headers"][0]["string_match"] == {"exact": "GET"}
               for r in routes if "route" in r)
    assert routes[-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    admin = {c["name"]: c for c in doc["static_resources"]["clusters"]}[bootstrap.ADMIN_CLUSTER]
    endpoint = admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_without_stats_port_the_bootstrap_is_unchanged() -> None:
    doc = bootstrap.build_bootstrap(xds_host="10.0.0.1", xds_port=18000)
    assert "listeners" not in doc["static_resources"]
    assert [c["name"] for c in doc["static_resources"]["clusters"]] == [bootstrap.XDS_CLUSTER]


def test_the_rendered_in_cluster_bootstrap_is_current() -> None:
    """envoy/bootstrap-incluster.yaml is what its header's command prints today."""
    rendered = bootstrap.build_bootstrap(
        xds_host="hybridlb-xds.hybridlb.svc.cluster.local", xds_port=18000,
        node="NODE_NAME_FROM_DOWNWARD_API", node_id="envoy-POD_NAME", stats_port=9902,
    )
    assert yaml.safe_load((ROOT / "envoy/bootstrap-incluster.yaml").read_text()) == rendered


# --- the vLLM example -----------------------------------------------------------------------


def as_running_pod(template: Doc, *, node: str) -> Doc:
    """A pod made from a workload's template, as the API server would list it once Ready."""
    return {
        "metadata": {"namespace": "hybridlb", "name": "vllm-x", **template["metadata"]},
        "spec": {**template["spec"], "nodeName": node},
        "status": {"phase": "Running", "podIP": "10.1.2.3",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_the_vllm_example_is_hybrid_mode_with_vllms_real_flags() -> None:
    workload = find("Deployment", "vllm-qwen3")
    vllm = pod_spec(workload)["containers"][0]
    argv = [*vllm["command"], *vllm["args"]]
    assert argv[:2] == ["vllm", "serve"]
    for flag in ("--data-parallel-hybrid-lb", "--data-parallel-size",
                 "--data-parallel-size-local", "--data-parallel-start-rank",
                 "--data-parallel-address", "--data-parallel-rpc-port"):
        assert flag in argv
    size, local = (int(argv[argv.index(f) + 1]) for f in ("--data-parallel-size",
                                                           "--data-parallel-size-local"))
    gpus = vllm["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == local
    assert size % local == 0
    assert workload["spec"]["template"]["metadata"]["labels"]["app"] == "vllm"
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    prestop = " ".join(vllm["lifecycle"]["preStop"]["exec"]["command"])
    assert "vllm:num_requests_running" in prestop and "vllm:num_requests_waiting" in prestop
    assert "deadline" in prestop
    # The preStop's bound (5 + 295 s) fits in the grace period, so SIGTERM follows it.
    assert pod_spec(workload)["terminationGracePeriodSeconds"] > 300


def test_the_control_plane_reads_the_vllm_template_as_one_replica_per_node(
    tmp_path: Path,
) -> None:
    settings = serve_settings(tmp_path)
    (pool,) = settings.kubernetes.pools
    template = find("Deployment", "vllm-qwen3")["spec"]["template"]
    labels = template["metadata"]["labels"]
    wanted = dict(term.split("=") for term in pool.selector.split(","))
    assert wanted.items() <= labels.items(), "the config's selector selects the example"
    found = pod_to_replica(as_running_pod(template, node="gpu-node-0"), default_pool=pool.name)
    assert found.pool == "qwen3" and found.replica is not None
    assert (found.replica.port, found.replica.capacity) == (8000, 8)


def rendered(overlay: str | Path) -> list[Doc]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


def bound_accounts(binding: Doc) -> set[tuple[str, str]]:
    """(namespace, name) of a binding's ServiceAccount subjects as the API server's RBAC
    authorizer reads them: on a RoleBinding, a subject without a namespace is in the
    binding's own (kubernetes pkg/registry/rbac/validation/rule.go, appliesToUser)."""
    own = binding["metadata"].get("namespace", "")
    return {(s.get("namespace") or own, s["name"]) for s in binding["subjects"]
            if s["kind"] == "ServiceAccount"}


def applied_with_namespace_flag(objects: list[Doc], namespace: str) -> list[Doc]:
    """What `kubectl apply -k DIR -n NAMESPACE` creates: an object that names no namespace
    goes to NAMESPACE (kubectl refuses one that names another: see the cluster-wide test)."""
    assert all(o["metadata"].get("namespace") in (None, namespace) for o in objects)
    return [{**o, "metadata": {**o["metadata"], "namespace": namespace}} for o in objects]


needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (built-in kustomize) missing")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_every_overlay_into_one_namespace(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert kinds & WORKLOADS
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "ClusterRole",
                                                          "ClusterRoleBinding")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"hybridlb"}
    by_kind = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for o in objects:
        if o["kind"] in WORKLOADS:
            spec = pod_spec(o)
            if "serviceAccountName" in spec:
                assert ("ServiceAccount", spec["serviceAccountName"]) in by_kind
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in by_kind
        if o["kind"] == "RoleBinding":
            assert bound_accounts(o) == {("hybridlb", "hybridlb")}


@needs_kubectl
@pytest.mark.parametrize("namespace", ["ml", "hybridlb"])
def test_namespaced_rbac_binds_the_account_of_the_namespace_it_is_applied_in(
    namespace: str,
) -> None:
    """`kubectl apply -k deploy/rbac -n ml` binds ml's hybridlb account, the one it creates,
    not an account of some namespace written in the file."""
    objects = applied_with_namespace_flag(rendered("rbac"), namespace)
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects
                if o["kind"] == "ServiceAccount"}
    assert bound_accounts(binding) == accounts == {(namespace, "hybridlb")}


@needs_kubectl
def test_rbac_for_pods_elsewhere_binds_the_control_planes_account() -> None:
    """examples/rbac-elsewhere: the Role and binding in the pods' namespace, the subject the
    account deploy/base creates in the control plane's."""
    objects = rendered("examples/rbac-elsewhere")
    assert {(o["kind"], o["metadata"]["namespace"]) for o in objects} == {
        ("Role", "ml"), ("RoleBinding", "ml")}
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    (account,) = [o for o in rendered("base") if o["kind"] == "ServiceAccount"]
    assert bound_accounts(binding) == {
        (account["metadata"]["namespace"], account["metadata"]["name"])}


@needs_kubectl
def test_cluster_wide_rbac_binds_the_account_it_creates_wherever_kustomize_puts_it(
    tmp_path: Path,
) -> None:
    """A ClusterRoleBinding must name its subject's namespace. The kustomization sets it (to
    the control plane's), so `kubectl apply -k ... -n other` is refused on the mismatch
    rather than binding an account nothing runs as; a kustomization's `namespace:` moves the
    subject along with the account."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "ml",
        "resources": [str(Path(os.path.relpath(DEPLOY / "rbac/cluster-wide", tmp_path)))]}))
    for objects, namespace in ((rendered("rbac/cluster-wide"), "hybridlb"),
                               (rendered(tmp_path), "ml")):
        (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
        (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
        assert account["metadata"]["namespace"] == namespace
        assert bound_accounts(binding) == {(namespace, "hybridlb")}


@needs_kubectl
def test_full_overlay_ships_dashboards_for_grafanas_sidecar() -> None:
    (config_map,) = [o for o in rendered("overlays/full")
                     if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "hybridlb-dashboards"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == {"hybridlb-fleet.json", "hybridlb-control-plane.json"}


@needs_kubectl
def test_each_vllm_node_deployment_gets_its_own_first_rank_and_node() -> None:
    deployments = [o for o in rendered("examples/vllm") if o["kind"] == "Deployment"]
    seen = []
    for d in deployments:
        template = d["spec"]["template"]
        assert d["spec"]["selector"]["matchLabels"].items() <= template["metadata"][
            "labels"].items()
        found = pod_to_replica(as_running_pod(template, node="n"), default_pool="qwen3")
        assert found.problems == () and found.replica is not None
        env = env_of(pod_spec(d)["containers"][0])
        assert found.replica.dp_rank == int(env["DP_START_RANK"]["value"])
        seen.append((found.replica.dp_rank, pod_spec(d)["nodeSelector"]["kubernetes.io/hostname"]))
    assert sorted(seen) == [(0, "gpu-node-0"), (8, "gpu-node-1")]
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in deployments]
    assert len(set(selectors)) == len(selectors), "two Deployments would fight over pods"


# --- dashboards -----------------------------------------------------------------------------


def load_generator() -> ModuleType:
    path = DEPLOY / "monitoring/dashboards/generate.py"
    spec = importlib.util.spec_from_file_location("hybridlb_dashboards", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    generator = load_generator()
    for name, text in generator.render().items():
        assert (DEPLOY / "monitoring/dashboards" / name).read_text() == text, (
            f"{name} is stale: run python deploy/monitoring/dashboards/generate.py")


def test_every_dashboard_panel_uses_the_datasource_variable() -> None:
    generator = load_generator()
    for build in generator.DASHBOARDS.values():
        dashboard = build()
        names = [v["name"] for v in dashboard["templating"]["list"]]
        assert names == ["datasource", "pool", "node"]
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels
        for panel in panels:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
