"""What the serving replicas on this machine are doing, for training to yield to.

On one machine serving and training share the cores, and a lower CPU priority is not enough to
keep serving's latency: a training step at nice 19 still fills the second hyperthread of a core,
the memory bus and the caches that a request's prefill needs. So a training step is paused
outright while any replica on the machine has a request in flight (training/loop/supervise.py
stops and continues its process group), and goes on in the gaps.

Each replica engine keeps one small file in `<data dir>/activity/` (named by its pid): the number of
requests in flight and the monotonic time of the last change, written in place through a shared
mapping on every change (no system call, no Redis round trip on the request path), and the cores
its engine computes on. A reader looks at every file whose replica is still alive and whose
cores it shares: a step on cores of its own (serving and training pinned apart) has nothing to
yield.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import time
from collections.abc import Collection
from pathlib import Path

from instructloop.hardware import engine_cores
from instructloop.paths import data_dir
from instructloop.processes import pid_alive

_LAYOUT = struct.Struct("<qd")  # requests in flight, CLOCK_MONOTONIC seconds of the last change
_MAX_CPUS = 1024  # the cores bitmap after the counters, as Linux's default cpu_set_t
_SIZE = _LAYOUT.size + _MAX_CPUS // 8
_SUFFIX = ".serving"
_SERIAL = itertools.count()  # one process may run several engines (tests, shared engines)


def activity_dir() -> Path:
    """Where the replicas of this data directory report (the worker of `up` reads the same)."""
    return data_dir() / "activity"


def _cores_bitmap(cores: Collection[int]) -> bytes:
    bits = bytearray(_MAX_CPUS // 8)
    for c in cores:
        if 0 <= c < _MAX_CPUS:
            bits[c // 8] |= 1 << (c % 8)
    return bytes(bits)


class ServingActivity:
    """One replica's report: call `set(n)` whenever its number of requests in flight changes.
    `cores`: where its engine computes (default: every core this process may use)."""

    def __init__(self, directory: Path | None = None, cores: Collection[int] | None = None) -> None:
        self.cores = frozenset(cores) if cores is not None else engine_cores(None)
        self.directory = directory or activity_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{os.getpid()}-{next(_SERIAL)}{_SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SIZE)
            self._map: mmap.mmap | None = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._map[_LAYOUT.size :] = _cores_bitmap(self.cores)
        self.set(0)

    def set(self, in_flight: int) -> None:
        if self._map is not None:
            _LAYOUT.pack_into(self._map, 0, in_flight, time.monotonic())

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def serving_busy(
    directory: Path | None = None,
    holdoff_s: float = 0.0,
    cores: Collection[int] | None = None,
) -> bool:
    """True while a live replica has a request in flight, or had one less than `holdoff_s`
    ago (a client streaming requests back to back leaves gaps too short to train in).
    `cores`: count only the replicas computing on one of these (None: every replica)."""
    directory = directory or activity_dir()
    mine = _cores_bitmap(cores) if cores is not None else None
    try:
        entries = list(directory.iterdir())
    except OSError:
        return False
    now = time.monotonic()
    for path in entries:
        pid = path.stem.partition("-")[0]
        if path.suffix != _SUFFIX or not pid.isdigit() or not pid_alive(int(pid)):
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if len(raw) != _SIZE:
            continue
        theirs = raw[_LAYOUT.size :]
        if mine is not None and not any(a & b for a, b in zip(theirs, mine, strict=True)):
            continue
        in_flight, changed_at = _LAYOUT.unpack_from(raw)
        if in_flight > 0 or now - changed_at < holdoff_s:
            return True
    return False
