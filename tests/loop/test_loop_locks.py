"""The cycle lock (fencing tokens) and the beat lock, on a real Redis."""

from __future__ import annotations

import time

import pytest

from instructloop.training.loop.locks import BeatLock, CycleLock, Holder


@pytest.fixture
def lock(redis_client: object) -> CycleLock:
    return CycleLock(redis_client, "t:lock", "t:fence", ttl_s=30)  # type: ignore[arg-type]


def test_one_holder_and_tokens_only_grow(lock: CycleLock) -> None:
    t1 = lock.acquire("a")
    assert t1 == 1
    assert lock.acquire("b") is None  # held: refused
    assert lock.holder() == Holder("a", 1)
    assert lock.release(Holder("a", 1))
    t2 = lock.acquire("b")
    assert t2 == 2
    assert not lock.release(Holder("a", 1))  # a stale holder cannot release another's lock
    assert lock.holder() == Holder("b", 2)


def test_stale_token_cannot_write(lock: CycleLock, redis_client: object) -> None:
    r = redis_client
    t1 = lock.acquire("a")
    assert t1 is not None
    assert lock.fenced_hset(Holder("a", t1), {"t:out": {"x": "1"}, "t:ptr": {"p": "a"}})
    r.delete("t:lock")  # type: ignore[attr-defined]  # a's lock expired ...
    t2 = lock.acquire("b")  # ... and b took it
    assert t2 == t1 + 1
    assert not lock.renew(Holder("a", t1))
    assert not lock.fenced_hset(Holder("a", t1), {"t:out": {"x": "2"}, "t:ptr": {"p": "a2"}})
    assert r.hgetall("t:out") == {b"x": b"1"}  # type: ignore[attr-defined]
    assert r.hgetall("t:ptr") == {b"p": b"a"}  # type: ignore[attr-defined]
    assert lock.fenced_hset(Holder("b", t2), {"t:ptr": {"p": "b"}})
    assert r.hget("t:ptr", "p") == b"b"  # type: ignore[attr-defined]


def test_lapsed_lock_is_reclaimed_only_if_nobody_took_it(
    lock: CycleLock, redis_client: object
) -> None:
    t1 = lock.acquire("a")
    assert t1 is not None
    redis_client.delete("t:lock")  # type: ignore[attr-defined]  # TTL ran out
    assert lock.renew(Holder("a", t1))  # a's redelivered step carries on
    assert lock.holder() == Holder("a", t1)
    assert redis_client.pttl("t:lock") > 25_000  # type: ignore[attr-defined]
    assert not lock.renew(Holder("a", t1 + 5))  # a token that was never issued


def test_lock_expires(redis_client: object) -> None:
    short = CycleLock(redis_client, "t:lock", "t:fence", ttl_s=0.3)  # type: ignore[arg-type]
    assert short.acquire("a") == 1
    time.sleep(0.5)
    assert short.holder() is None
    assert short.acquire("b") == 2


def test_cycle_ids_with_colons_are_refused(lock: CycleLock) -> None:
    with pytest.raises(ValueError):
        lock.acquire("a:b")


def test_beat_lock_admits_one(redis_client: object) -> None:
    one = BeatLock(redis_client, "t:beat", ttl_s=30)  # type: ignore[arg-type]
    two = BeatLock(redis_client, "t:beat", ttl_s=30)  # type: ignore[arg-type]
    assert one.acquire()
    assert not two.acquire()
    assert not two.renew()  # not its lock
    assert not two.release()
    assert one.renew()
    assert one.holder() == one.owner
    assert one.release()
    assert two.acquire()
    assert not one.renew()  # lost to two
    assert two.acquire()  # already its own: kept, not refused


def test_beat_standby_takes_over_after_ttl(redis_client: object) -> None:
    one = BeatLock(redis_client, "t:beat", ttl_s=0.3)  # type: ignore[arg-type]
    two = BeatLock(redis_client, "t:beat", ttl_s=0.3)  # type: ignore[arg-type]
    assert one.acquire()
    assert not two.wait_acquire(poll_s=0.05, timeout_s=0.1)
    # one dies (stops renewing): two gets the lock once the TTL has passed
    assert two.wait_acquire(poll_s=0.05, timeout_s=5)
    assert two.holder() == two.owner
