"""`hybridlb serve` flags and config file → settings, with clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from xds_server.commands import serve


def settings(*argv: str) -> serve.Settings:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.settings_from_args(parser.parse_args(list(argv)))


def test_defaults_are_the_dataclass_defaults() -> None:
    s = settings("--static", "pools.yaml")
    assert s == serve.Settings(static=serve.StaticSettings(path=Path("pools.yaml")))


def test_flags_win_over_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("xds_port: 19000\nlb-policy: round_robin\nlocal_first: no\n"
                      "max-num-seqs: 64\n")
    s = settings("--config", str(config), "--xds-port", "19001")
    assert s.xds.port == 19001
    assert s.envoy.lb_policy == "round_robin"
    assert s.hybrid.local_first is False
    assert s.policy.max_num_seqs == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("xds_prot: 1\n", "unknown key 'xds_prot'"),
        ("xds_port: many\n", "xds_port: 'many' is not a int"),
        ("lb-policy: random\n", "is not one of least_request, round_robin, orca_wrr"),
        ("metrics: magic\n", "is not one of auto, prometheus, scrape, none"),
        ("room-threshold: 1.5\n", "room_threshold must be in"),
        ("metrics: prometheus\n", "needs --prometheus-url"),
    ],
)
def test_bad_config_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit, match=message):
        settings("--config", str(config))
