"""Settings declared once (xds_server/options.py): flags, config keys and checks from a field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from xds_server import options
from xds_server.options import group, option, same_as


@dataclass(frozen=True)
class Inner:
    rate_s: float = option(1.5, "how often", flag="rate-s")
    mode: Literal["fast", "slow"] = option("fast", "speed", flag="mode")
    not_a_flag: int = 7

    def __post_init__(self) -> None:
        if self.rate_s <= 0:
            raise ValueError("rate_s must be > 0")


@dataclass(frozen=True)
class Root:
    port: int = option(80, "port", flag="port")
    path: Path | None = option(None, "a file", flag="file")
    on: bool = option(False, "switch", flag="on")
    names: tuple[str, ...] = option((), "repeatable", flag="name")
    inner: Inner = group(Inner)


OPTS = options.options(Root)


def parse(*argv: str, config: dict[str, object] | None = None) -> Root:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, OPTS)
    values = options.from_config(config or {}, OPTS, source="c.yaml")
    values.update(options.from_args(parser.parse_args(list(argv)), OPTS))
    return options.build(Root, values, OPTS)


def test_every_declared_field_is_a_flag_and_undeclared_ones_are_not() -> None:
    assert [o.flag for o in OPTS] == ["port", "file", "on", "name", "rate-s", "mode"]
    assert [o.paths for o in OPTS][-1] == (("inner", "mode"),)


def test_nothing_given_builds_the_dataclass_defaults() -> None:
    assert parse() == Root()


def test_flags_convert_by_the_field_type_and_nest_into_groups() -> None:
    s = parse("--port", "8080", "--file", "x.yaml", "--on", "--name", "a", "--name", "b",
              "--rate-s", "0.5", "--mode", "slow")
    assert s == Root(port=8080, path=Path("x.yaml"), on=True, names=("a", "b"),
                     inner=Inner(rate_s=0.5, mode="slow"))


def test_a_switch_also_takes_an_explicit_value() -> None:
    assert parse("--on", "false").on is False
    assert parse("--on", "yes").on is True


def test_the_command_line_wins_over_the_config_file_with_either_key_spelling() -> None:
    s = parse("--port", "2", config={"port": 1, "rate_s": 3, "on": True})
    assert (s.port, s.inner.rate_s, s.on) == (2, 3.0, True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"prot": 1}, "c.yaml: unknown key 'prot'; known: file, mode, name, on, port, rate-s"),
        ({"port": "many"}, "c.yaml: port: 'many' is not an int"),
        ({"port": True}, "c.yaml: port: True is not an int"),
        ({"mode": "warp"}, "c.yaml: mode: 'warp' is not one of fast, slow"),
        ({"on": "maybe"}, "c.yaml: on: 'maybe' is not true or false"),
        ({"name": [1]}, "c.yaml: name: \\[1\\] is not a list of names"),
        ({"rate-s": 0}, "inner: rate_s must be > 0"),
    ],
)
def test_bad_config_values_end_the_command_naming_the_key(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        parse(config=config)


def test_bad_flag_values_are_argparse_errors_naming_what_was_expected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse("--mode", "warp")
    assert "'warp' is not one of fast, slow" in capsys.readouterr().err


def test_the_table_lists_every_flag_with_its_default() -> None:
    table = options.markdown_table(OPTS).splitlines()
    assert table[2:] == [
        "| `--port` | 80 | port |",
        "| `--file` | - | a file |",
        "| `--on` | False | switch |",
        "| `--name` | - | repeatable |",
        "| `--rate-s` | 1.5 | how often |",
        "| `--mode` | fast | speed |",
    ]


@dataclass(frozen=True)
class Reader:
    mode: Literal["fast", "slow"] = same_as(Inner, "mode")
    own: int = option(1, "own", flag="own")


@dataclass(frozen=True)
class Both:
    inner: Inner = group(Inner)
    reader: Reader = group(Reader, prefix="reader-")


def test_a_shared_setting_is_one_flag_that_sets_every_field_declared_with_it() -> None:
    opts = options.options(Both)
    assert [o.flag for o in opts] == ["rate-s", "mode", "reader-own"]
    built = options.build(Both, {"mode": "slow", "reader-own": 3}, opts)
    assert (built.inner.mode, built.reader.mode, built.reader.own) == ("slow", "slow", 3)


def test_one_flag_declared_twice_is_refused() -> None:
    @dataclass(frozen=True)
    class Clash:
        a: int = option(1, "a", flag="x")
        b: int = option(1, "a", flag="x")

    with pytest.raises(TypeError, match="--x declared twice"):
        options.options(Clash)
