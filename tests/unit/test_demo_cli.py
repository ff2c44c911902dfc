"""`hybridlb demo`'s command line: the help renders, the default load follows the fleet's
size, a missing plotting library is said up front."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xds_server.cli import build_parser, main
from xds_server.demo.cli import estimated_capacity_rps
from xds_server.demo.fleet import FleetSettings
from xds_server.workload import LengthMix


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--duration SECONDS", "--out DIR", "--nodes N", "--replicas-per-node N",
                 "--envoys N", "--rate RPS", "--extproc"):
        assert flag in text
    assert "ext_proc endpoint picker" in text


def test_defaults_need_no_flag() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.duration, args.nodes, args.replicas_per_node, args.envoys) == (60.0, 3, 2, 1)
    assert args.rate is None and args.extproc
    assert not build_parser().parse_args(["demo", "--no-extproc"]).extproc


def test_capacity_grows_with_ranks_and_shrinks_with_time_scale() -> None:
    lengths = LengthMix()
    base = estimated_capacity_rps(FleetSettings(), lengths)
    assert estimated_capacity_rps(FleetSettings(nodes=6), lengths) == pytest.approx(2 * base)
    assert estimated_capacity_rps(FleetSettings(time_scale=20.0), lengths) == pytest.approx(
        base / 2)
    # 12 ranks of 8 slots, ~190 output tokens at ~2 ms a step, ten times slower: ~2 req/s each.
    assert 15 < base < 35


@pytest.mark.parametrize("flags", [["--duration", "0"], ["--rate", "-1"], ["--nodes", "0"]])
def test_bad_flags_are_refused_before_anything_starts(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *flags])
    assert "hybridlb demo" in str(exit_.value.code)


def test_without_matplotlib_the_demo_says_first_that_it_will_write_no_plot(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An install without the plot extra (None in sys.modules: the import system's "not
    there"); the run ends at once on a bad flag, after the notice."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="must be positive"):
        main(["demo", "--duration", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "no plot (demo.png): matplotlib is not installed" in out
    assert "pip install 'vllm-hybrid-lb[plot]'" in out
