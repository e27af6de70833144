"""The HTTP listener for the doors that are not gRPC (the OpenAI API, ...).

Hypercorn serves the ASGI app: one maintained asyncio server that speaks HTTP/1.1 and
h2c (and h2 over TLS) on one port. The socket is opened here, before the server starts,
so that a port in use fails the start with its address, as the gRPC listeners do, and
port 0 reports the port it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from embedgate.server.config import TlsConfig


class _SilentAfterDisconnect:
    """ASGI: once a request has told the app its caller is gone (``http.disconnect``),
    what the app still sends is dropped, as ASGI allows. Hypercorn 0.18 would queue it on
    the HTTP/2 stream the caller reset and wait forever for it to drain (a Connect
    stream's closing message, typically), holding the app's task until shutdown."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        gone = False

        async def watched() -> Any:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def unless_gone(message: Any) -> None:
            if not gone:
                await send(message)

        await self._app(scope, watched, unless_gone)


class HttpListenError(OSError):
    """The HTTP listener could not be opened (the message names the address)."""


class HttpServer:
    def __init__(
        self, app: Any, host: str, port: int, tls: TlsConfig | None, grace_s: float
    ) -> None:
        self._app = _SilentAfterDisconnect(app)
        self._grace_s = grace_s
        self._host = host
        self._port = port
        self._tls = tls
        self._stopping = asyncio.Event()
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    def _config(self, fd: int) -> Config:
        config = Config()
        config.bind = [f"fd://{fd}"]
        config.accesslog = None  # the doors write embedgate's own access lines
        config.errorlog = "-"  # hypercorn's own errors, through the logging module
        config.graceful_timeout = self._grace_s
        # Hypercorn closes a connection after 1,000 requests by default: an HTTP/2 client
        # (a sidecar's app, a browser) would reconnect every 1,000 calls. Connections stay.
        config.keep_alive_max_requests = 2**62
        if self._tls is not None:
            config.certfile = self._tls.cert_file
            config.keyfile = self._tls.key_file
            if self._tls.client_ca_file is not None:
                config.ca_certs = self._tls.client_ca_file
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    def bind(self) -> int:
        """Open the listening socket (nothing is served yet); the port it got."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            sock = socket.create_server((self._host, self._port), family=family)
        except OSError as error:
            raise HttpListenError(
                f"cannot listen for HTTP on {self._host}:{self._port}: {error.strerror or error}"
            ) from None
        port: int = sock.getsockname()[1]
        # Hypercorn takes the descriptor over (and closes it when it stops).
        self._fd = sock.detach()
        return port

    def start(self) -> None:
        """Serve on the socket ``bind`` opened."""
        if self._fd is None:
            raise RuntimeError("bind before start")
        self._task = asyncio.get_running_loop().create_task(
            serve(self._app, self._config(self._fd), shutdown_trigger=self._stopping.wait),
            name="http-listener",
        )

    async def stop(self, grace: float) -> None:
        """Stop taking connections and let calls in progress finish within ``grace``."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), grace + 1.0)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            self._task = None
        elif self._fd is not None:  # bound, never served
            socket.close(self._fd)
        self._fd = None
