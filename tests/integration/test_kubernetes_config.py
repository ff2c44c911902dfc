"""`hybridlb serve --kubernetes ...` and `kubernetes_pools:` in the config file → settings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from xds_server.cli import build_parser
from xds_server.commands.serve import settings_from_args
from xds_server.settings import KubernetesPool, KubernetesSettings
from xds_server.sources.kubernetes import backoff_delay


def settings(*argv: str) -> KubernetesSettings:
    return settings_from_args(build_parser().parse_args(["serve", *argv])).kubernetes


def test_flags_make_one_pool_in_the_given_namespaces() -> None:
    k = settings("--kubernetes", "--kubeconfig", "/k", "--namespace", "a", "--namespace", "b",
                 "--selector", "app=vllm")
    assert k.enabled and k.kubeconfig == Path("/k")
    assert k.pools == (KubernetesPool(selector="app=vllm", namespaces=("a", "b")),)


def test_config_pools_with_their_own_namespaces_and_the_flag_default(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "kubernetes: true\nnamespace: [ml]\nkubernetes_pools:\n"
        "  - {name: qwen3, selector: app=qwen, namespaces: [a]}\n"
        "  - {name: llama, selector: 'app in (llama, llama2)'}\n")
    k = settings("--config", str(config))
    assert k.pools == (KubernetesPool(name="qwen3", selector="app=qwen", namespaces=("a",)),
                       KubernetesPool(name="llama", selector="app in (llama, llama2)",
                                      namespaces=("ml",)))
    assert k.kubeconfig is None  # in-cluster


def test_inference_pools_from_the_flag_and_named_in_the_config(tmp_path: Path) -> None:
    k = settings("--kubernetes", "--inference-pools", "--namespace", "ml")
    assert k.inference_pools and k.namespaces == ("ml",) and k.pools == ()
    config = tmp_path / "c.yaml"
    config.write_text("kubernetes: true\nnamespace: [ml]\nkubernetes_pools:\n"
                      "  - {inference_pool: qwen3}\n"
                      "  - {inference_pool: llama, namespaces: [team]}\n")
    k = settings("--config", str(config))
    assert not k.inference_pools
    assert k.pools == (KubernetesPool(inference_pool="qwen3", namespaces=("ml",)),
                       KubernetesPool(inference_pool="llama", namespaces=("team",)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kubernetes: true\nkubernetes_pools: {name: a}", "expected a list"),
        ("kubernetes: true\nkubernetes_pools: [{name: a}]", "kubernetes_pools[0].selector"),
        ("kubernetes: true\nkubernetes_pools: [{selector: a=b, namespace: x}]",
         "unknown key(s) namespace"),
        ("kubernetes: true\nkubernetes_pools: [{name: 'a b', selector: a=b}]",
         "kubernetes_pools[0].name"),
        ("kubernetes: true\nkubernetes_pools: [{name: a, selector: x=1}, {name: a, selector: y=2}]",
         "appears twice"),
        ("kubernetes: true\nkubernetes_pools: [{selector: a=b, namespaces: [1]}]",
         "namespaces: expected a list"),
        ("kubernetes: yes please", "kubernetes"),
        ("kubernetes_pools: [{selector: a=b}]", "need --kubernetes"),
        ("kubernetes: true", "--kubernetes needs --selector or --inference-pools"),
        ("inference_pools: true", "need --kubernetes"),
        ("kubernetes: true\nkubernetes_pools: [{inference_pool: a, selector: x=1}]",
         "give no name or selector with it"),
        ("kubernetes: true\nkubernetes_pools: [{inference_pool: 'a b'}]",
         "kubernetes_pools[0].inference_pool"),
    ],
)
def test_config_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exc:
        settings("--config", str(config))
    assert message in str(exc.value)


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, initial_s=0.5, max_s=4.0, rng=rng) for n in range(1, 9)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays[3:])) > 1  # jittered, not in step
