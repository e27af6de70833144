"""A real Prometheus (Debian's package) on loopback for the tests: it scrapes the given
targets every second, loads the given rule files, keeps its data in a temporary folder,
and answers PromQL over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from gateways import free_port


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is not installed (the test set-up installs it)"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "embedgate", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (workdir / "prometheus.log").open("w")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._logfile = workdir / "prometheus.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self._logfile.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:  # noqa: S310 - loopback
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("prometheus was not ready within 30 s")

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query's whole answer (``status``, ``data``, or ``error``)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - loopback
                answer: dict[str, Any] = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read())
        return answer

    def scrapes(self) -> int:
        """How many times the targets have been scraped so far."""
        answer = self.query("sum(count_over_time(up[10m]))")
        result = answer["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
