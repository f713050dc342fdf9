"""The memory plan (instructloop/memory.py) and the running loop's record (instructloop/running.py):
pure rules, checked by hand against their documented order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructloop.feedback.keys import DEFAULT_REDIS_URL
from instructloop.memory import (
    KV_CACHE_ENV,
    MemoryPlanError,
    available_gib,
    plan_cpu_serving,
    serving_kv_cache_gib,
    total_gib,
)
from instructloop.running import (
    RunningLoop,
    read_running,
    record_path,
    remove_running,
    resolve_redis_url,
    write_running,
)


def test_serving_kv_cache_is_planned_from_ram_not_vllms_ninety_percent() -> None:
    # A twelfth of RAM, whole GiB, between 1 and 16.
    assert serving_kv_cache_gib(None, {}, total=23.5) == (2, "planned: 1/12 of 23.5 GiB RAM")
    assert serving_kv_cache_gib(None, {}, total=8.0)[0] == 1
    assert serving_kv_cache_gib(None, {}, total=4.0)[0] == 1  # never below one GiB
    assert serving_kv_cache_gib(None, {}, total=128.0)[0] == 11
    assert serving_kv_cache_gib(None, {}, total=1024.0)[0] == 16  # capped
    # On this machine the plan leaves most of the memory to training.
    kv, _ = serving_kv_cache_gib(None, {})
    assert kv <= max(1, total_gib() / 6)


def test_serving_kv_cache_flag_then_env_var() -> None:
    assert serving_kv_cache_gib(3, {KV_CACHE_ENV: "5"}, total=24) == (3, "--kv-cache-space-gib")
    assert serving_kv_cache_gib(None, {KV_CACHE_ENV: "5"}, total=24) == (5, f"${KV_CACHE_ENV}")
    both = {KV_CACHE_ENV: "5", "VLLM_CPU_KVCACHE_SPACE": "3"}
    assert serving_kv_cache_gib(None, both, total=24)[0] == 5
    vllm = {"VLLM_CPU_KVCACHE_SPACE": "3"}  # vLLM's own variable, set by an operator
    assert serving_kv_cache_gib(None, vllm, total=24) == (3, "$VLLM_CPU_KVCACHE_SPACE")


@pytest.mark.parametrize(
    ("configured", "env", "needle"),
    [
        (0, {}, "must be positive"),
        (-1, {}, "must be positive"),
        (1.5, {}, "whole GiB"),  # vLLM reads the variable as an integer
        (None, {KV_CACHE_ENV: "lots"}, "is not a number"),
        (None, {KV_CACHE_ENV: "24"}, "does not fit"),
        (30, {}, "does not fit"),
    ],
)
def test_bad_kv_cache_settings_are_refused(
    configured: float | None, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(MemoryPlanError, match=needle):
        serving_kv_cache_gib(configured, env, total=24.0)


def test_the_plan_says_what_it_gives_and_what_is_left() -> None:
    plan = plan_cpu_serving(2, {})
    text = plan.describe()
    assert "serving KV cache 2 GiB (--kv-cache-space-gib" in text
    assert f"{plan.total_gib - 2:.1f} of {plan.total_gib:.1f} GiB left" in text
    assert 0 < available_gib() <= plan.total_gib


def test_the_server_config_refuses_what_the_plan_refuses() -> None:
    from instructloop.serving.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match=r"cpu_kvcache_space_gib: .*whole GiB"):
        ServerConfig(cpu_kvcache_space_gib=0.5).validate()
    ServerConfig(cpu_kvcache_space_gib=1).validate()


def _loop(pid: int, url: str = "redis://127.0.0.1:7777/0") -> RunningLoop:
    return RunningLoop(
        pid=pid,
        started_at=time.time(),
        redis_url=url,
        grpc="127.0.0.1:50051",
        metrics_url=None,
        worker_metrics_url=None,
        key_prefix="il:",
        memory={"serving_kv_cache_gib": 2},
    )


def test_running_record_round_trip_and_dead_process(tmp_path: Path) -> None:
    assert read_running(tmp_path) is None
    write_running(_loop(os.getpid()), tmp_path)
    got = read_running(tmp_path)
    assert got is not None and got.redis_url == "redis://127.0.0.1:7777/0"
    # A record whose process is gone is no loop to talk to.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_running(_loop(dead.pid), tmp_path)
    assert read_running(tmp_path) is None
    assert read_running(tmp_path, check_alive=False) is not None
    # Only its own process removes it.
    remove_running(os.getpid(), tmp_path)
    assert record_path(tmp_path).exists()
    remove_running(dead.pid, tmp_path)
    assert not record_path(tmp_path).exists()
    record_path(tmp_path).write_text("{not json")
    assert read_running(tmp_path) is None


def test_redis_url_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTLOOP_DATA_DIR", str(tmp_path))
    assert resolve_redis_url(None, {}) == (DEFAULT_REDIS_URL, "default")
    write_running(_loop(os.getpid()))
    url, source = resolve_redis_url(None, {})
    assert url == "redis://127.0.0.1:7777/0" and source.startswith("instructloop up")
    assert resolve_redis_url(None, {"REDIS_URL": "redis://e:1/0"}) == (
        "redis://e:1/0",
        "$REDIS_URL",
    )
    assert resolve_redis_url("redis://f:2/0", {"REDIS_URL": "redis://e:1/0"})[0] == "redis://f:2/0"
