"""`hybridlb serve` flags and config file → settings, with clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from xds_server.addresses import host_port
from xds_server.commands import serve
from xds_server.settings import ExtprocSettings, Settings, StaticSettings


def settings(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.settings_from_args(parser.parse_args(list(argv)))


def test_defaults_are_the_dataclass_defaults_with_the_picker_bind_derived() -> None:
    s = settings("--static", "pools.yaml")
    assert s == Settings(static=StaticSettings(path=Path("pools.yaml")),
                         extproc=ExtprocSettings(host="127.0.0.1"))


def test_the_picker_reckons_with_the_policy_room_and_room_threshold() -> None:
    s = settings("--static", "p.yaml", "--max-num-seqs", "12", "--room-threshold", "0.5")
    assert (s.extproc.pick.max_num_seqs, s.extproc.pick.room_threshold) == (12, 0.5)
    assert (s.policy.max_num_seqs, s.hybrid.room_threshold) == (12, 0.5)


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
        ("xds_port: many\n", "xds_port: 'many' is not an int"),
        ("lb-policy: random\n", "lb-policy: 'random' is not one of least_request, round_robin, "
                                 "orca_wrr"),
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


def test_servers_bind_loopback_unless_told_otherwise() -> None:
    s = settings("--static", "p.yaml")
    assert s.xds.host == s.admin.host == "127.0.0.1"


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-node-san", "spiffe://td/ns/x"], "--tls-node-san"),
    (["--xds-max-streams", "0"], "at least 1"),
    (["--xds-max-streams-per-peer", "0"], "at least 1"),
    (["--extproc-address", "picker"], "--extproc-address: address 'picker' is not HOST:PORT"),
    (["--extproc-address", "picker:99999"], "--extproc-address: port 99999"),
    (["--xds-port", "-1"], "--xds-port -1 is not a port"),
    (["--admin-port", "65536"], "--admin-port 65536 is not a port"),
    (["--listener-port", "70000"], "--listener-port 70000 is not a port"),
    (["--extproc-port", "9002", "--extproc-admin-port", "-1"], "--extproc-admin-port -1 is not"),
])
def test_guard_settings_that_cannot_work_end_serve_with_a_message(
    flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        settings("--static", "p.yaml", *flags)


@pytest.mark.parametrize(("host", "address"), [
    ("10.0.0.1", "10.0.0.1:18000"), ("fd00::1", "[fd00::1]:18000"),
    ("[fd00::1]", "[fd00::1]:18000"), ("localhost", "localhost:18000"),
])
def test_a_pod_ip_of_either_family_is_a_bind_address_grpc_takes(host: str, address: str) -> None:
    """The deploy binds `$(POD_IP)`: an IPv6 pod IP needs brackets before the port."""
    assert host_port(host, 18000) == address


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        (["--extproc-port", "9002"], "127.0.0.1"),
        (["--extproc-port", "9002", "--extproc-address", "10.1.2.3:9002"], "10.1.2.3"),
        (["--extproc-port", "9002", "--extproc-address", "[fd00::7]:9002"], "fd00::7"),
        (["--extproc-port", "9002", "--extproc-address", "10.1.2.3:9002",
          "--extproc-host", "0.0.0.0"], "0.0.0.0"),
    ],
    ids=["default", "from-address", "ipv6", "explicit"],
)
def test_the_hosted_picker_binds_where_its_pushed_address_says(
    argv: list[str], host: str
) -> None:
    assert settings("--static", "pools.yaml", *argv).extproc.host == host


def test_the_picker_command_refuses_a_port_out_of_range() -> None:
    from xds_server import options
    from xds_server.commands import extproc
    from xds_server.settings import PickerSettings

    with pytest.raises(SystemExit, match="--admin-port 70000 is not a port"):
        options.build(PickerSettings, {"admin-port": 70000}, extproc.OPTIONS)
