"""A real redis-server on loopback for the tests, with nothing written to disk."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from gateways import free_port

NOTHING_ON_DISK = ("--save", "", "--appendonly", "no")


class RedisServer:
    """One redis-server process; ``stop`` kills it (as an outage would)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (the test set-up installs it)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", *NOTHING_ON_DISK],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            for _ in range(100):
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process.poll() is not None:
                        raise AssertionError("redis-server exited at start") from None
                    time.sleep(0.05)
            raise AssertionError("redis-server did not answer within 5 s")
        finally:
            client.close()

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, stopped after it."""
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
