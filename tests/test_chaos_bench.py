"""The chaos benchmark's Redis kill (benchmarks/chaos.py), engine-free: writers on FeedbackStore
while a private redis-server is SIGKILLed and restarted. The benchmark's own counting is what is
checked here: every acknowledged record read back and replayed, the outage's failures seen, and
the recovery timed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.chaos import RedisKillConfig, main, markdown, redis_kill_via_store


def test_redis_kill_through_the_store_loses_no_acknowledged_record(tmp_path: Path) -> None:
    cfg = RedisKillConfig(writers=8, before_s=1.5, outage_s=1.0, after_s=1.5)
    res = asyncio.run(redis_kill_via_store(tmp_path / "redis", cfg))
    assert res["acked_before_kill"] > 0 and res["acked"] > res["acked_before_kill"], res
    assert res["lost"] == res["lost_from_log"] == res["lost_on_replay"] == 0, res
    assert res["replay_failed"] == 0 and res["replayed"] == res["acked"], res
    assert res["stored_twice"] == 0 and res["stored_not_acked"] == 0, res
    assert res["failed_attempts_during_outage"] > 0, res  # the kill was felt
    assert set(res["failure_codes"]) == {"StoreUnavailable"}, res
    assert not res["unexpected_errors"], res
    assert res["restart_to_first_ack_s"] is not None and res["restart_to_first_ack_s"] < 10, res
    assert res["target_met"] is True
    md = markdown({"redis_kill": res}, {"date": "d", "cpu": "c", "cores": 2, "loadavg_1m": 0.0})
    assert "**0 lost**" in md and "**met**" in md


def test_unknown_scenarios_are_refused() -> None:
    with pytest.raises(SystemExit) as e:
        main(["--scenarios", "redis_kill,nope"])
    assert e.value.code == 2
