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


USAGE_METRICS = "http://127.0.0.1:9464/metrics"
# The per-caller series `embedgate usage` shows, by the column it shows them in.
_USAGE_COLUMNS = (
    ("calls", "embedgate_caller_rpcs"),
    ("inputs", "embedgate_caller_inputs"),
    ("cached", "embedgate_caller_cached_inputs"),
    ("tokens", "embedgate_caller_tokens"),
    ("vendor_requests", "embedgate_caller_vendor_requests"),
    ("cost", "embedgate_caller_cost"),
)


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics",
        metavar="URL",
        default=None,
        help=f"a gateway's /metrics: its counters per caller since it started (default: "
        f"{USAGE_METRICS}, unless only --config is given)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the gateway's configuration: each caller's limits, and what their windows "
        "hold now in the quotas' Redis (every replica together)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _caller_counters(url: str) -> list[dict[str, object]]:
    """Per caller and model, the counters of the gateway whose metrics are at ``url``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - the operator's URL
        text = reply.read().decode()
    rows: dict[tuple[str, str], dict[str, object]] = {}
    names = {f"{series}_total": column for column, series in _USAGE_COLUMNS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            column = names.get(sample.name)
            if column is None:
                continue
            key = (sample.labels["caller"], sample.labels["model"])
            row = rows.setdefault(key, {"caller": key[0], "model": key[1]})
            row[column] = sample.value
    return [rows[key] for key in sorted(rows)]


def _limit_windows(config_path: str) -> list[dict[str, object]]:
    """Each caller limit of the configuration, with what its window holds now in the
    quotas' Redis (as the gateway's own take counts it)."""
    import redis

    from embedgate.server.app import caller_limits, quotas_redis_url
    from embedgate.server.providers.registry import load_config
    from embedgate.server.quotas import live_total

    config = load_config(config_path)
    limits = caller_limits(config)
    url = quotas_redis_url(config)
    if not limits:
        return []
    if url is None:
        raise ConfigError(
            f"{config_path}: no Redis (quotas.redis_url or cache.redis_url): each replica "
            "counts its callers' limits in its own memory, which only its metrics show"
        )
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    rows: list[dict[str, object]] = []
    for name, limit in limits:
        held = client.hgetall(limit.key)
        buckets = {int(bucket): int(amount) for bucket, amount in held.items()}
        rows.append(
            {
                "caller": name,
                "limit": limit.setting,
                "rate": limit.rate.text,
                "used": live_total(buckets, limit.ask(0), now_ms),
                "allowed": limit.rate.count,
            }
        )
    return rows


def _table(rows: list[dict[str, object]], columns: list[str]) -> list[str]:
    def text(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    cells = [[text(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for line in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return lines


def run_usage(args: argparse.Namespace) -> int:
    """Print each caller's use: the counters of a gateway's metrics, and (with the
    configuration) what its limits' windows hold now in Redis."""
    import json

    metrics = args.metrics or (None if args.config else USAGE_METRICS)
    report: dict[str, list[dict[str, object]]] = {}
    try:
        if metrics is not None:
            report["counters"] = _caller_counters(metrics)
        if args.config is not None:
            report["limits"] = _limit_windows(args.config)
    except ConfigError as exc:
        print(f"embedgate: bad configuration: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an unreachable endpoint or Redis: said, not a traceback
        print(f"embedgate: cannot read usage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "counters" in report:
        print(f"since the gateway started ({metrics}):")
        columns = ["caller", "model", *(column for column, _ in _USAGE_COLUMNS)]
        for line in _table(report["counters"], columns):
            print(f"  {line}")
    if "limits" in report:
        print("limits, in the current window (every replica):")
        for line in _table(report["limits"], ["caller", "limit", "rate", "used", "allowed"]):
            print(f"  {line}")
    return 0
