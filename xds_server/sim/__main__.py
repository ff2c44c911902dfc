"""`python -m xds_server.sim`: the same as `hybridlb sim`, without the other commands."""

from __future__ import annotations

import argparse
import logging
import sys

from xds_server.sim import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m xds_server.sim", description=cli.__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    cli.add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
