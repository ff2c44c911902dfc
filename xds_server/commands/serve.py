"""Run the xDS control plane: discover vLLM replicas, publish them to Envoy over ADS.

Flags may also come from a YAML config file (--config): its keys are the flag names without
dashes' prefix, e.g. `xds-port: 18000` or `xds_port: 18000`. Flags given on the command line
win over the file, the file over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from xds_server.settings import (
    AdminSettings,
    EnvoySettings,
    Settings,
    StaticSettings,
    XdsSettings,
)

log = logging.getLogger(__name__)

# flag -> (type, default, help); the defaults are the settings dataclasses' own.
_FLAGS: dict[str, tuple[Any, Any, str]] = {
    "static": (Path, None, "YAML file of pools to serve (watched for changes)"),
    "static-poll-interval-s": (float, StaticSettings.poll_interval_s,
                               "how often the pool file is checked"),
    "xds-host": (str, XdsSettings.host, "address the ADS gRPC server binds"),
    "xds-port": (int, XdsSettings.port, "port of the ADS gRPC server (0: any free port)"),
    "admin-host": (str, AdminSettings.host, "address the admin HTTP server binds"),
    "admin-port": (int, AdminSettings.port,
                   "port of the admin server: /healthz /readyz /metrics /debug/state"),
    "listener-port": (int, EnvoySettings.listener_port,
                      "port of the Envoy listener for OpenAI-style traffic (an Envoy's "
                      "bootstrap may override it)"),
    "listener-host": (str, EnvoySettings.listener_host, "address the Envoy listener binds"),
    "connect-timeout-s": (float, EnvoySettings.connect_timeout_s,
                          "Envoy's upstream connect timeout"),
    "route-timeout-s": (float, EnvoySettings.route_timeout_s,
                        "Envoy's whole-request timeout (generation can be long)"),
    "model-header": (str, EnvoySettings.model_header, "request header that names the pool"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with any of the flags below")
    for flag, (kind, default, help_text) in _FLAGS.items():
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{flag}", type=kind, default=None, help=help_text + shown)


def load_config(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SystemExit(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SystemExit(f"config {path} is not valid YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SystemExit(f"config {path}: expected a mapping of flag names to values")
    values: dict[str, Any] = {}
    for key, value in doc.items():
        flag = str(key).replace("_", "-")
        if flag not in _FLAGS:
            raise SystemExit(
                f"config {path}: unknown key {key!r}; known: {', '.join(sorted(_FLAGS))}"
            )
        kind = _FLAGS[flag][0]
        try:
            values[flag] = kind(value)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"config {path}: {key}: {value!r} is not a {kind.__name__}") from exc
    return values


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = load_config(args.config) if args.config else {}
    for flag in _FLAGS:
        given = getattr(args, flag.replace("-", "_"))
        if given is not None:
            values[flag] = given

    def get(flag: str) -> Any:
        return values.get(flag, _FLAGS[flag][1])

    return Settings(
        xds=XdsSettings(host=get("xds-host"), port=get("xds-port")),
        envoy=EnvoySettings(
            listener_port=get("listener-port"),
            listener_host=get("listener-host"),
            connect_timeout_s=get("connect-timeout-s"),
            route_timeout_s=get("route-timeout-s"),
            model_header=get("model-header"),
        ),
        admin=AdminSettings(host=get("admin-host"), port=get("admin-port")),
        static=StaticSettings(path=get("static"), poll_interval_s=get("static-poll-interval-s")),
    )


def run(args: argparse.Namespace) -> int:
    from xds_server.app import App
    from xds_server.sources.static_file import PoolFileError

    settings = settings_from_args(args)
    if settings.static.path is None:
        raise SystemExit("hybridlb serve: give a pool source, e.g. --static pools.yaml")

    async def main() -> None:
        try:
            app = App(settings)
        except PoolFileError as exc:
            raise SystemExit(f"pool file {settings.static.path}: {exc}") from exc
        await app.run()

    asyncio.run(main())
    return 0
