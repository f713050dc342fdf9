"""A real Prometheus (Debian's `prometheus` package) scraping the parts a test runs, and
redis_exporter (Debian's `prometheus-redis-exporter`) for Redis: the dashboard's queries are
checked against what a deployment would scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from instructloop.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "instructloop.json"


def system_tool(name: str) -> str:
    """The path of a Debian tool the tests drive; a failure, not a skip, where it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/install.sh (Debian's packages)")
    return path


def exported_metric_names() -> set[str]:
    """Every `instructloop_*` metric name the code defines (serving, the loop, the ground)."""
    code = "\n".join(
        p.read_text()
        for d in ("serving", "training", "instructloop")
        for p in (REPO / d).rglob("*.py")
    )
    return set(re.findall(r'"(instructloop_[a-z_]+)"', code))


def unknown_metrics(expr: str, exported: set[str]) -> list[str]:
    """The instructloop series `expr` names that the code does not export (counters' `_total`
    and histograms' `_bucket`, `_sum`, `_count` are the defined name's)."""
    return [
        m
        for m in re.findall(r"instructloop_[a-z_]+", expr)
        if m not in exported and re.sub(r"_(total|bucket|sum|count)$", "", m) not in exported
    ]


class Scraper:
    """Prometheus on a free port scraping `targets` ({job: ["host:port", ...]}) every second,
    plus a redis_exporter for `redis_url` when given (job "redis")."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], redis_url: str | None):
        self.workdir = workdir
        self.targets = dict(targets)
        self.redis_url = redis_url
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Scraper:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.redis_url is not None:
            rport = free_port()
            self.procs.append(self._start(
                [system_tool("prometheus-redis-exporter"), f"--redis.addr={self.redis_url}",
                 f"--web.listen-address=127.0.0.1:{rport}"], "redis_exporter.log",
            ))  # fmt: skip
            self.targets["redis"] = [f"127.0.0.1:{rport}"]
        jobs = [
            {"job_name": job, "static_configs": [{"targets": addrs}]}
            for job, addrs in self.targets.items()
        ]
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "scrape_configs": jobs}  # fmt: skip
        (self.workdir / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        self.procs.append(self._start(
            [system_tool("prometheus"), f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], "prometheus.log",
        ))  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return self
            except OSError as e:
                if time.monotonic() > deadline:
                    log = (self.workdir / "prometheus.log").read_text()[-2000:]
                    raise AssertionError(log) from e
                time.sleep(0.5)

    def _start(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (self.workdir / log).open("wb")
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def up(self) -> dict[str, float]:
        """job -> value of `up` (1: the last scrape worked)."""
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the shipped dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
