"""A trace collector for the tracing case: OTLP/HTTP on loopback that takes every
export, counts the spans in it, and answers as a collector does. ``GET /stats`` says
how many spans came, so the run can show that tracing was really on.

    python -m bench.otlp_sink      # prints "port N" once it listens
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

REPLY = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


def make_app() -> web.Application:
    counted = {"requests": 0, "spans": 0}

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        counted["requests"] += 1
        counted["spans"] += sum(
            len(scope.spans)
            for resource in message.resource_spans
            for scope in resource.scope_spans
        )
        return web.Response(body=REPLY, content_type="application/x-protobuf")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(counted)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    return app


async def serve() -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"port {runner.addresses[0][1]}", flush=True)  # the parent waits for this line
    await asyncio.Event().wait()


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
