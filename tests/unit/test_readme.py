"""The README's configuration reference lists every `serve` flag with its current default."""

from __future__ import annotations

from pathlib import Path

from xds_server.commands import serve

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_serve_flag_is_in_the_reference() -> None:
    missing = [flag for flag in serve._FLAGS if f"| `--{flag}` |" not in README]
    assert missing == []


def test_reference_defaults_are_current() -> None:
    for flag, (_kind, default, _help) in serve._FLAGS.items():
        if default is None or len(str(default)) > 45:
            continue
        shown = str(default) or "-"
        assert f"| `--{flag}` | {shown} |" in README, flag
