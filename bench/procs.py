"""Child processes pinned to a core, and what ``/proc`` says about them.

Every server under test runs in its own process on its own core, so the load
generator and the fake vendor (on the other core) never take its CPU, and its CPU
time and memory can be read from ``/proc/<pid>`` without counting theirs.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Children run from the repository's top, where ``python -m bench.<module>`` finds them.
REPO = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """A run that cannot be measured: the message says what went wrong."""


@dataclass(frozen=True, slots=True)
class Cores:
    """Which core runs what (None: not pinned, on a machine with one core)."""

    server: int | None
    load: int | None

    @classmethod
    def detect(cls) -> Cores:
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(usable[0], usable[1])

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (fewer than two cores)"
        return (
            f"server under test on CPU {self.server}; "
            f"h2load, the fake vendor and the harness on CPU {self.load}"
        )


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """``command`` run through ``taskset``: every thread it starts stays on ``core``."""
    if core is None:
        return list(command)
    return ["taskset", "-c", str(core), *command]


def pin_self(core: int | None) -> None:
    """Keep the harness itself off the server's core."""
    if core is not None:
        os.sched_setaffinity(0, {core})


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: the fields start after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def memory_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory line in KiB: ``VmRSS`` now, ``VmHWM`` its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


class Child:
    """A child process whose stderr goes to a log file, shown when it fails.

    Its stdout is a pipe the harness reads (``read_port``), or with ``stdout_to_log``
    goes to the same file, for a program that prints as it serves (nobody would read
    the pipe, and a full pipe stops the writer). ``env`` adds to the environment; with
    ``stdin`` the harness can write to it (``send_line``)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        stdout_to_log: bool = False,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._unread = b""
        self._log = self.log_path.open("wb")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Loopback only: no proxy from the environment may carry a request elsewhere.
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            environment.pop(key, None)
        environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost"
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._log if stdout_to_log else subprocess.PIPE,
            stderr=self._log,
            env=environment,
            cwd=REPO,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{self.name}: {what}\n{self.log_tail()}".rstrip())

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise self.fail(f"exited with status {code}")

    def read_line(self, timeout_s: float) -> str:
        """The next line the child prints, waiting at most ``timeout_s``."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        # Read the pipe itself, keeping what follows the line: a buffered reader could
        # hold a second line where the selector cannot see it.
        while b"\n" not in self._unread:
            if not _readable(stdout, deadline - time.monotonic()):
                self.check_alive()
                raise self.fail(f"printed nothing within {timeout_s:g} s")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                self.check_alive()
                raise self.fail("closed its output")
            self._unread += chunk
        line, _, self._unread = self._unread.partition(b"\n")
        return line.decode(errors="replace").strip()

    def send_line(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None, "started without stdin=True"
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except BrokenPipeError:
            self.check_alive()
            raise self.fail("closed its input") from None

    def read_port(self, timeout_s: float = 30.0) -> int:
        """The port from the ``port N`` line every benchmark server prints."""
        line = self.read_line(timeout_s)
        word, _, number = line.partition(" ")
        if word != "port" or not number.isdigit():
            raise self.fail(f"printed {line!r} instead of its port")
        return int(number)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the harness dies, however it dies
    (a test's timeout kills it with SIGKILL), so no server outlives its benchmark."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _readable(stream: IO[bytes], timeout_s: float) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        return bool(selector.select(timeout_s))


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``check()`` until it is true or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return bool(check())
