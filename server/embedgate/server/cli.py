"""``embedgate serve``: run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pydantic import ValidationError

from embedgate.server.config import ConfigError, ServerConfig, load_config
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
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="json lines, or console text (auto: console on a terminal)",
    )


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(
        level=args.log_level,
        json={"auto": None, "json": True, "console": False}[args.log_format],
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"embedgate: bad configuration: {exc}", file=sys.stderr)
        return 2
    overrides = {
        key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None
    }
    if overrides:
        try:
            server = ServerConfig.model_validate({**config.server.model_dump(), **overrides})
        except ValidationError as exc:
            print(
                f"embedgate: bad option: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}",
                file=sys.stderr,
            )
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
