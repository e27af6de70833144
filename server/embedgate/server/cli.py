"""``embedgate serve``: run the gateway; ``embedgate check``: verify a configuration."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pydantic import ValidationError

from embedgate.server.config import ConfigError, ServerConfig
from embedgate.server.errors import EmbedgateError
from embedgate.server.logs import configure_logging

CONFIG_ENV = "EMBEDGATE_CONFIG"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"YAML configuration file (default: ${CONFIG_ENV}; none: the embedded local model)",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default 50051)")
    parser.add_argument(
        "--uds", default=None, metavar="PATH", help="also listen on this Unix domain socket"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="a plaintext port serving only grpc.health.v1 (for probes when TLS is on)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve the HTTP doors (the OpenAI embeddings API) on this port",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written (default: info, one line per RPC)",
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="json lines, or console text (auto: console on a terminal)",
    )


# server.* keys the command line can set → their options' names.
_SERVER_OPTIONS = {
    "host": "host",
    "port": "port",
    "uds_path": "uds",
    "health_port": "health_port",
    "metrics_port": "metrics_port",
    "http_port": "http_port",
}


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(
        level=args.log_level,
        json={"auto": None, "json": True, "console": False}[args.log_format],
    )
    # The providers (and their HTTP stack) load only when serving: --help stays quick.
    from embedgate.server.providers.registry import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"embedgate: bad configuration: {exc}", file=sys.stderr)
        return 2
    overrides = {
        key: getattr(args, option)
        for key, option in _SERVER_OPTIONS.items()
        if getattr(args, option) is not None
    }
    if overrides:
        try:
            server = ServerConfig.model_validate({**config.server.model_dump(), **overrides})
        except ValidationError as exc:
            problem = exc.errors()[0]
            flag = "--" + _SERVER_OPTIONS[str(problem["loc"][0])].replace("_", "-")
            print(f"embedgate: bad option: {flag}: {problem['msg']}", file=sys.stderr)
            return 2
        config = config.model_copy(update={"server": server})

    from embedgate.server.app import serve

    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # found while building the models (e.g. a key that is missing)
        print(f"embedgate: bad configuration: {exc}", file=sys.stderr)
        return 2
    except EmbedgateError as exc:
        print(f"embedgate: cannot start: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:  # grpc reports a port it cannot bind as RuntimeError
        print(f"embedgate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"YAML configuration file to check (default: ${CONFIG_ENV})",
    )


def run_check(args: argparse.Namespace) -> int:
    """Validate the configuration, read its keys, load its models and verify the vector
    space of models with ``space_check``, without serving: exit 0 when it would serve,
    2 (with the problem) when it would not."""
    configure_logging(level="warning", json=None)
    from embedgate.server.app import check
    from embedgate.server.providers.registry import load_config

    try:
        lines = asyncio.run(check(load_config(args.config)))
    except ConfigError as exc:
        print(f"embedgate: bad configuration: {exc}", file=sys.stderr)
        return 2
    print(f"configuration OK: {len(lines)} model(s)")
    for line in lines:
        print(f"  {line}")
    return 0
