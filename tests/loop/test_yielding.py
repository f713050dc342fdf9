"""Serving first: replicas report their requests in flight, and a heavy step's process group is
stopped while they have any (instructloop/activity.py, training/loop/yielding.py).

Real processes and signals; the end-to-end case (a cycle under `up` with clients streaming) is
tests/loop/test_up_loop.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructloop.activity import ServingActivity, serving_busy
from instructloop.hardware import engine_cores
from instructloop.serving.admission import Admission
from instructloop.training.loop.config import LoopConfig
from instructloop.training.loop.yielding import ServingFirst, paused_dir, reap_orphans

MARK = "instructloop-yield-test-step"


def _state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


@pytest.fixture
def step() -> subprocess.Popen[bytes]:
    """A stand-in for a heavy step: a group leader that spins, with a child in its group."""
    code = (
        f"# {MARK}\nimport subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.01)'])\n"
        "while True: time.sleep(0.01)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(0.3)
    yield proc
    subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], check=False)
    proc.wait()


def _group(pgid: int) -> list[int]:
    """The group's live members (a killed child not yet reaped by init is a zombie: gone)."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    alive = []
    for p in out.split():
        try:
            if _state(int(p)) != "Z":
                alive.append(int(p))
        except OSError:
            pass
    return alive


def test_a_replica_reports_its_requests_in_flight(tmp_path: Path) -> None:
    activity = ServingActivity(tmp_path)
    assert not serving_busy(tmp_path)
    activity.set(2)
    assert serving_busy(tmp_path)
    activity.set(0)
    assert serving_busy(tmp_path, holdoff_s=5.0)  # quiet for less than the hold-off
    assert not serving_busy(tmp_path, holdoff_s=0.0)
    activity.set(1)
    activity.close()  # a replica that stops takes its report with it
    assert not serving_busy(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_only_replicas_on_the_steps_cores_count(tmp_path: Path) -> None:
    """Serving and training pinned to different cores do not compete: nothing to yield."""
    activity = ServingActivity(tmp_path, cores={1})
    activity.set(1)
    assert serving_busy(tmp_path)  # any replica, for a reader that names no cores
    assert serving_busy(tmp_path, cores={0, 1})
    assert not serving_busy(tmp_path, cores={0})
    assert not serving_busy(tmp_path, cores={2, 1000})
    far = ServingActivity(tmp_path, cores={1000})
    far.set(1)
    assert serving_busy(tmp_path, cores={1000})
    activity.close()
    far.close()


def test_engine_cores_read_the_omp_binding() -> None:
    mine = frozenset(os.sched_getaffinity(0))
    assert engine_cores("0-3") == {0, 1, 2, 3}
    assert engine_cores("1,5") == {1, 5}
    assert engine_cores("0-1|4-5") == {0, 1, 4, 5}
    for vllms_choice in (None, "", "auto", "all", "nobind", "3-"):
        assert engine_cores(vllms_choice) == mine


def test_a_dead_replicas_report_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = ServingActivity(tmp_path)
    other.set(3)
    stale = tmp_path / f"{dead.pid}-0.serving"
    stale.write_bytes(other.path.read_bytes())
    other.close()
    assert not serving_busy(tmp_path)


def test_admission_reports_every_change() -> None:
    seen: list[int] = []
    gate = Admission(on_change=seen.append)
    gate.enter("a", 16)
    gate.enter("b", 16)
    gate.leave("a")
    gate.leave("b")
    assert seen == [1, 2, 1, 0]


def test_the_step_stops_while_serving_is_busy_and_goes_on_after(
    step: subprocess.Popen[bytes],
) -> None:
    busy = [False]
    yielder = ServingFirst(step.pid, busy=lambda: busy[0])
    yielder.tick()
    assert not yielder.paused and _state(step.pid) != "T"
    busy[0] = True
    yielder.tick()
    time.sleep(0.1)
    members = _group(step.pid)
    assert len(members) == 2 and all(_state(p) == "T" for p in members)  # the whole group
    busy[0] = False
    yielder.tick()
    time.sleep(0.1)
    assert not yielder.paused and all(_state(p) != "T" for p in members)
    assert yielder.pauses == 1 and yielder.paused_s > 0.05


def test_serving_that_never_rests_does_not_starve_the_step(
    step: subprocess.Popen[bytes],
) -> None:
    yielder = ServingFirst(step.pid, busy=lambda: True, max_pause_s=0.2, min_run_s=0.3)
    t0 = time.monotonic()
    yielder.tick(t0)
    assert yielder.paused
    yielder.tick(t0 + 0.1)
    assert yielder.paused  # still within the longest pause
    yielder.tick(t0 + 0.25)
    assert not yielder.paused  # the bound: it runs now, serving busy or not
    yielder.tick(t0 + 0.4)
    assert not yielder.paused  # for min_run_s
    yielder.tick(t0 + 0.6)
    assert yielder.paused
    yielder.release()
    assert not yielder.paused and _state(step.pid) != "T"


def test_a_paused_step_whose_supervisor_died_is_killed_by_the_next(
    step: subprocess.Popen[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSTRUCTLOOP_DATA_DIR", str(tmp_path))
    members = _group(step.pid)
    yielder = ServingFirst(step.pid, busy=lambda: True)
    yielder.tick()
    record = paused_dir() / str(step.pid)
    assert record.read_text() == str(os.getpid())
    assert reap_orphans(MARK) == []  # its supervisor (this process) is alive
    dead = subprocess.Popen(["true"])
    dead.wait()
    record.write_text(str(dead.pid))  # as if the supervisor had been killed
    assert reap_orphans("some-other-module") == []  # not a step: left alone
    assert _group(step.pid) == members
    record.write_text(str(dead.pid))
    assert reap_orphans(MARK) == [step.pid]
    step.wait(timeout=5)
    time.sleep(0.2)
    assert _group(step.pid) == [] and not record.exists()


def test_the_loop_setting_reads_from_the_environment() -> None:
    assert LoopConfig().yield_to_serving is True
    assert LoopConfig.from_env({"INSTRUCTLOOP_YIELD_TO_SERVING": "false"}).yield_to_serving is False
    assert LoopConfig.from_env({"INSTRUCTLOOP_YIELD_TO_SERVING": "1"}).yield_to_serving is True
    with pytest.raises(ValueError, match="true or false"):
        LoopConfig.from_env({"INSTRUCTLOOP_YIELD_TO_SERVING": "maybe"})
