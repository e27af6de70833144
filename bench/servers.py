"""The reference servers embedgate is compared with, each a ``grpc.aio`` server of the
embedgate ``Embed`` RPC:

- ``echo``: returns one precomputed ``EmbedResponse``; no vendor at all. What a
  Python gRPC server costs per call (the floor no Python gateway can beat).
- ``naive-httpx``: one shared ``httpx.AsyncClient`` POST to the vendor per RPC, float
  JSON parsed with the ``json`` module, ``values=list_of_floats``. What a gateway
  written the obvious way costs.
- ``naive-aiohttp``: the same over aiohttp, with base64 vectors decoded by numpy.

Only ``Embed`` is served (through a generic handler, so the reference servers do not
depend on the rest of the contract). Run as ``python -m bench.servers KIND --port 0
[--vendor-url URL]``; each prints ``port N`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import httpx
import numpy as np

from embedgate.v1 import embedding_service_pb2 as pb

SERVICE = "embedgate.v1.EmbeddingService"
KINDS = ("echo", "naive-httpx", "naive-aiohttp")
VENDOR_MODEL = "fake-embedding"
# Enough connections that the pool never makes an RPC wait at the concurrencies measured.
MAX_CONNECTIONS = 256

EmbedHandler = Callable[[pb.EmbedRequest, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def fixed_response(dims: int) -> pb.EmbedResponse:
    """What the echo server answers: one embedding of ``dims`` values."""
    response = pb.EmbedResponse(model="echo", request_id="echo")
    response.embeddings.add(index=0, values=[1.0 / dims**0.5] * dims)
    return response


def make_echo(dims: int) -> EmbedHandler:
    response = fixed_response(dims)

    async def embed(
        request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        return response

    return embed


def vendor_body(request: pb.EmbedRequest, encoding: str) -> dict[str, Any]:
    return {
        "model": VENDOR_MODEL,
        "input": [item.text for item in request.inputs],
        "encoding_format": encoding,
    }


def make_naive_httpx(url: str) -> EmbedHandler:
    # trust_env=False: a proxy from the environment must never sit between the
    # gateway and the loopback vendor.
    client = httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
        ),
        trust_env=False,
    )

    async def embed(
        request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        reply = await client.post(url, json=vendor_body(request, "float"))
        reply.raise_for_status()
        payload = reply.json()
        return pb.EmbedResponse(
            model=request.model,
            embeddings=[
                pb.Embedding(index=item["index"], values=item["embedding"])
                for item in payload["data"]
            ],
        )

    return embed


def make_naive_aiohttp(url: str) -> EmbedHandler:
    session: aiohttp.ClientSession | None = None

    async def embed(
        request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EmbedResponse:
        nonlocal session
        if session is None:  # made on the server's loop, on first use
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            session = aiohttp.ClientSession(connector=connector)
        async with session.post(url, data=json.dumps(vendor_body(request, "base64"))) as reply:
            reply.raise_for_status()
            payload = await reply.json(content_type=None)
        embeddings = []
        for item in payload["data"]:
            vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
            embeddings.append(pb.Embedding(index=item["index"], values=vector.tolist()))
        return pb.EmbedResponse(model=request.model, embeddings=embeddings)

    return embed


def make_handler(kind: str, vendor_url: str | None, dims: int) -> EmbedHandler:
    if kind == "echo":
        return make_echo(dims)
    if vendor_url is None:
        raise SystemExit(f"{kind} needs --vendor-url")
    url = vendor_url.rstrip("/") + "/embeddings"
    return make_naive_httpx(url) if kind == "naive-httpx" else make_naive_aiohttp(url)


async def serve(handler: EmbedHandler, host: str, port: int) -> None:
    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=pb.EmbedRequest.FromString,
        response_serializer=pb.EmbedResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Embed": method}),)
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"port {bound}", flush=True)  # the parent waits for this line
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A reference gRPC server for the benchmark.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--vendor-url", help="the fake vendor's base URL, ending in /v1")
    parser.add_argument("--dims", type=int, default=1024, help="the echo's vector size")
    args = parser.parse_args(argv)
    # The stock asyncio loop, as embedgate itself runs on: the comparison is like for like.
    asyncio.run(serve(make_handler(args.kind, args.vendor_url, args.dims), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
