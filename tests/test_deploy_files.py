"""The deployment files, checked with the tools that run here (no container engine does):
compose's own config check for both profiles, promtool on the scrape config, amtool on the
Alertmanager config, and the dashboard's queries against the metrics the code exports. The
dashboard's queries are run against a real Prometheus in tests/loop/test_up_loop.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.prometheus import exported_metric_names, system_tool, unknown_metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _run(*argv: str, cwd: Path = DEPLOY) -> str:
    env = {"PATH": "/usr/bin:/bin", "INSTRUCTLOOP_API_KEYS": "u", "INSTRUCTLOOP_ADMIN_KEYS": "a"}
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_runs_the_whole_loop(profile: str) -> None:
    cfg = yaml.safe_load(
        _run(system_tool("docker-compose"), "-f", "compose.yaml", "--profile", profile, "config")
    )
    services = {  # docker-compose v1 lists every profile's services
        n: s for n, s in cfg["services"].items() if profile in s.get("profiles", [profile])
    }
    roles = {name: (s.get("command") or [""])[0] for name, s in services.items()}
    assert sorted(r for r in roles.values() if r == "serve") == ["serve", "serve"]  # 2 replicas
    assert {"worker", "beat"} <= set(roles.values())
    assert {"redis", "prometheus", "alertmanager", "grafana", "redis-exporter"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    for name, s in services.items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)  # pinned
        if roles[name] in ("serve", "worker", "beat"):
            assert any(v.startswith("data:") or v.get("source") == "data"
                       for v in map(_volume, s["volumes"])), name  # fmt: skip
            if profile == "gpu" and roles[name] != "beat":
                devices = s["deploy"]["resources"]["reservations"]["devices"]
                assert devices[0]["capabilities"] == ["gpu"]


def _volume(v: object) -> object:
    return v if isinstance(v, dict) else str(v)


def test_prometheus_scrapes_servers_worker_and_redis_and_alerts(tmp_path: Path) -> None:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    cfg = yaml.safe_load(text)
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert jobs == {"instructloop-serving", "instructloop-worker", "redis"}
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        text.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
    )
    _run(system_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))


def test_alertmanager_config_is_valid() -> None:
    _run(system_tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))


def test_dashboard_queries_name_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "instructloop.json").read_text())
    exported = exported_metric_names()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Serving", "Feedback", "The loop", "Redis"]
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "prometheus"
            assert not unknown_metrics(t["expr"], exported), p["title"]


def test_image_runs_as_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER instructloop$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "build-essential" not in runtime
    assert 'ENTRYPOINT ["instructloop"]' in runtime
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in runtime
