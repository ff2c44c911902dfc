"""The README's configuration reference is the table the `serve` settings generate."""

from __future__ import annotations

from pathlib import Path

from xds_server import options
from xds_server.commands import serve

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    table = options.markdown_table(serve.OPTIONS)
    assert table in README, (
        "README's configuration reference differs from the settings; paste this table:\n"
        + table)
