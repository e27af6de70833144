"""The ``embedgate`` command: ``serve`` (needs the server installed), ``embed``,
``rerank``, ``models`` and ``health`` for people at a terminal."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from embedgate.client._errors import EmbedgateError
from embedgate.client._inputs import image_bytes, image_uri, text, video
from embedgate.client._sync import Client
from embedgate.client._types import OutputType, embed_result
from embedgate.v1 import embedding_service_pb2 as pb

TARGET_ENV = "EMBEDGATE_TARGET"
TOKEN_ENV = "EMBEDGATE_TOKEN"  # noqa: S105 - the variable's name, not a token
OUTPUT_TYPES: tuple[OutputType, ...] = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SERVER_MISSING = (
    "embedgate: the server is not installed here, only the client. From a clone of the "
    "embedgate repository: pip install '.[local]' (the embedded model; install torch from "
    "PyTorch's CPU index first, as the README shows), or pip install . for vendor models only"
)


def version() -> str:
    """Which distribution gives this command: the server's (with the client) or the
    client's alone."""
    for distribution, what in (("embedgate", "server and client"), ("embedgate-client", "client")):
        try:
            return f"embedgate {metadata.version(distribution)} ({what})"
        except metadata.PackageNotFoundError:
            continue
    return "embedgate (not installed: running from a source tree)"


def _pick_model(client: Client, given: str | None, job: str) -> str:
    """``given``, or the server's only model that does ``job`` (embed or rerank)."""
    if given:
        return given
    models = client.list_models()
    able = [m.name for m in models if (m.embeds if job == "embed" else m.reranks)]
    if len(able) == 1:
        return able[0]
    if not able:
        raise SystemExit(f"embedgate {job}: the server has no model that can {job}")
    raise SystemExit(
        f"embedgate {job}: the server has {len(able)} models that can {job}; "
        f"choose one with --model: {', '.join(able)}"
    )


def _describe_input(item: pb.Input) -> str:
    which = item.WhichOneof("content")
    if which == "text":
        shown = item.text if len(item.text) <= 40 else item.text[:37] + "..."
        return f"text {json.dumps(shown, ensure_ascii=False)}"
    if which == "image":
        return "image " + (item.image.uri or f"({len(item.image.data)} bytes)")
    if which == "video":
        return f"video ({len(item.video.frames)} frames)"
    return "text+image"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"embedgate: cannot read {path}: {exc.strerror}") from None


def _inputs(args: argparse.Namespace) -> list[pb.Input]:
    inputs = [text(t) for t in args.text]
    inputs += [image_uri(u) for u in args.image_uri]
    inputs += [image_bytes(_read(f)) for f in args.image_file]
    if args.video_frame:
        inputs.append(
            video(
                f if f.startswith(("http://", "https://")) else _read(f) for f in args.video_frame
            )
        )
    if not inputs:
        raise SystemExit(
            "embedgate embed: give at least one --text, --image-uri, --image-file or --video-frame"
        )
    return inputs


def _print_error(error: EmbedgateError) -> int:
    print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
    if error.reason:
        print(f"  reason: {error.reason}", file=sys.stderr)
    for violation in error.field_violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    return 1


def _embed(args: argparse.Namespace, client: Client) -> int:
    inputs = _inputs(args)
    request = pb.EmbedRequest(
        model=_pick_model(client, args.model, "embed"),
        inputs=inputs,
        instruction=args.instruction or "",
        output_type="OUTPUT_TYPE_" + args.output_type.upper(),
    )
    if args.dimensions is not None:
        request.dimensions = args.dimensions
    if args.normalize is not None:
        request.normalize = args.normalize
    response = client.embed_message(request)
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
        return 0
    result = embed_result(response, request.output_type)
    print(f"model {result.model}, request {result.request_id}")
    for item, vector in zip(inputs, result.vectors, strict=True):
        print(f"  {_describe_input(item)}: {_describe_vector(vector, result.output_type)}")
    if result.usage is not None:
        print(f"usage: {result.usage.prompt_tokens} prompt tokens")
    return 0


def _describe_vector(vector: np.ndarray, output_type: str) -> str:
    head = vector[:4]
    if output_type == "float32":
        norm = float(np.linalg.norm(vector))
        values = ", ".join(f"{float(v):+.4f}" for v in head)
        return f"{len(vector)} dims, norm {norm:.4f}, [{values}, ...]"
    if output_type in ("binary", "ubinary"):  # packed sign bits, 8 values per byte
        values = " ".join(f"{int(v) & 0xFF:08b}" for v in head)
        return f"{len(vector)} bytes of {output_type} bits, [{values} ...]"
    values = ", ".join(f"{v}" for v in head.tolist())
    return f"{len(vector)} dims as {output_type}, [{values}, ...]"


def _rerank(args: argparse.Namespace, client: Client) -> int:
    result = client.rerank(
        args.query,
        args.document,
        model=_pick_model(client, args.model, "rerank"),
        top_n=args.top_n,
        return_documents=True,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(result), ensure_ascii=False, indent=2))
        return 0
    print(f"model {result.model} ({result.method})")
    for r in result.results:
        print(f"  {r.relevance_score:+.4f}  [{r.index}] {r.document}")
    return 0


def _models(args: argparse.Namespace, client: Client) -> int:
    models = client.list_models()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    for m in models:
        sizes = (
            ", ".join(map(str, m.allowed_dimensions))
            if m.allowed_dimensions
            else f"{m.min_dimensions}-{m.max_dimensions}"
        )
        jobs = "/".join(j for j, on in (("embed", m.embeds), ("rerank", m.reranks)) if on)
        print(
            f"{m.name}  provider={m.provider}  inputs={','.join(m.modalities)}  "
            f"dims={m.default_dimensions} (allowed {sizes})  max_inputs={m.max_inputs_per_call}  "
            f"{jobs}"
        )
    return 0


def _health(args: argparse.Namespace, client: Client) -> int:
    """Exit 0 when the server reports SERVING (for Docker health checks and scripts)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            print(f"embedgate: health check failed: {code.name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls-ca (and --tls-cert/--tls-key); None: plaintext."""
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise SystemExit("embedgate: --tls-cert and --tls-key need --tls-ca")
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("embedgate: give --tls-cert and --tls-key together")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes(),
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
    except OSError as error:
        raise SystemExit(f"embedgate: cannot read {error.filename}: {error.strerror}") from None


def _channel(args: argparse.Namespace) -> grpc.Channel:
    credentials = _credentials(args)
    if credentials is None:
        return grpc.insecure_channel(args.target)
    return grpc.secure_channel(args.target, credentials)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedgate", description="The embedgate gRPC embedding gateway."
    )
    parser.add_argument(
        "--version", action="version", version=version(), help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway server")
    try:
        from embedgate.server.cli import add_serve_arguments
    except ImportError:
        serve.set_defaults(server_missing=True)
    else:
        add_serve_arguments(serve)

    check = commands.add_parser(
        "check",
        help="validate a configuration, read its keys, load its models and verify the "
        "vector space of deployments with space_check, without serving (exit 0 or 2)",
    )
    try:
        from embedgate.server.cli import add_check_arguments
    except ImportError:
        check.set_defaults(server_missing=True)
    else:
        add_check_arguments(check)

    usage = commands.add_parser(
        "usage",
        help="print each caller's use: a gateway's counters per caller (its /metrics), "
        "and what its callers' limits hold now in the quotas' Redis (with --config)",
    )
    try:
        from embedgate.server.cli import add_usage_arguments
    except ImportError:
        usage.set_defaults(server_missing=True)
    else:
        add_usage_arguments(usage)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--target",
            default=os.environ.get(TARGET_ENV, "localhost:50051"),
            help=f"server address HOST:PORT (default: ${TARGET_ENV} or localhost:50051)",
        )
        sub.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
        sub.add_argument("--json", action="store_true", help="print the whole response as JSON")
        sub.add_argument(
            "--token",
            default=os.environ.get(TOKEN_ENV) or None,
            help=f"bearer token for a server with auth (default: ${TOKEN_ENV})",
        )
        sub.add_argument(
            "--tls-ca", metavar="FILE", help="use TLS, trusting the server's certificate to this CA"
        )
        sub.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
        sub.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
        return sub

    embed = client_command("embed", "embed inputs and print a summary of each vector")
    embed.add_argument(
        "--model",
        help="the model to use (default: the server's model, when it serves only one)",
    )
    embed.add_argument("--text", action="append", default=[], help="a text input (repeatable)")
    embed.add_argument(
        "--image-uri", action="append", default=[], help="an http(s) image URL (repeatable)"
    )
    embed.add_argument(
        "--image-file", action="append", default=[], help="an image file to send (repeatable)"
    )
    embed.add_argument(
        "--video-frame",
        action="append",
        default=[],
        help="a frame (file or URL) of one video input, in order (repeat for each frame)",
    )
    embed.add_argument("--dimensions", type=int, help="the vector size (default: the model's)")
    embed.add_argument("--instruction", help="a task instruction, for models that take one")
    embed.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unit vectors or not (default: the model's setting)",
    )
    embed.add_argument(
        "--output-type",
        choices=OUTPUT_TYPES,
        default="float32",
        help="how the vectors come back (default: float32)",
    )

    rerank = client_command("rerank", "rank documents against a query")
    rerank.add_argument(
        "--model",
        help="the model to use (default: the server's model that reranks, when there is one)",
    )
    rerank.add_argument("--query", required=True, help="the text to rank the documents against")
    rerank.add_argument(
        "--document", action="append", required=True, help="a document to rank (repeatable)"
    )
    rerank.add_argument("--top-n", type=int, help="print only the best N documents")

    client_command("models", "list the models the server serves")

    health = client_command("health", "ask the server's health service; exit 0 when SERVING")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    return parser


# The commands the server package runs (absent from a client-only install).
SERVER_COMMANDS = {"serve": "run_serve", "check": "run_check", "usage": "run_usage"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:
        if getattr(args, "server_missing", False):
            print(SERVER_MISSING, file=sys.stderr)
            return 2
        from embedgate.server import cli as server

        run: Callable[[argparse.Namespace], int] = getattr(server, SERVER_COMMANDS[args.command])
        return run(args)
    handlers = {"embed": _embed, "rerank": _rerank, "models": _models, "health": _health}
    with Client(
        args.target, timeout=args.timeout, token=args.token, credentials=_credentials(args)
    ) as client:
        try:
            return handlers[args.command](args, client)
        except EmbedgateError as error:
            return _print_error(error)


if __name__ == "__main__":
    sys.exit(main())
