"""The alert rules: valid for Prometheus, each one unit-tested firing and staying quiet, and
every instructloop metric they name is one the code exports (promtool from Debian's
`prometheus` package; scripts/install.sh installs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support.prometheus import exported_metric_names, system_tool, unknown_metrics

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"


def _promtool() -> str:
    return system_tool("promtool")


def _alerts() -> dict[str, dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_rules_are_valid() -> None:
    out = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=PROM,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_fires_and_stays_quiet_in_promtools_unit_tests() -> None:
    out = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    fired: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]:
        for t in group.get("alert_rule_test", []):
            (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    assert set(_alerts()) <= fired, set(_alerts()) - fired
    assert set(_alerts()) <= quiet, set(_alerts()) - quiet


def test_alerts_name_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    for name, rule in _alerts().items():
        assert not unknown_metrics(rule["expr"], exported), name
