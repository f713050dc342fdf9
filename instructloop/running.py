"""Where the loop that `instructloop up` started lives, so every other verb finds it.

`up` starts its private Redis on a free port, so no fixed default can reach it. While it runs it
keeps a record in the data directory (`<data dir>/up.json`): the Redis URL, the gRPC address,
the metrics URLs and its pid. `cycle`, `status`, `feedback export`, `model register|list`,
`worker` and `beat` read that record when they are given no Redis URL; the record of an `up`
that is no longer alive is ignored.

Resolution order for a Redis URL: the verb's `--redis-url`, then `$REDIS_URL`, then the running
`up`'s record, then `DEFAULT_REDIS_URL` (feedback/keys.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from instructloop.feedback.keys import DEFAULT_REDIS_URL
from instructloop.paths import data_dir
from instructloop.processes import pid_alive

RECORD_NAME = "up.json"


@dataclass(frozen=True)
class RunningLoop:
    """What a running `instructloop up` serves, and where."""

    pid: int
    started_at: float
    redis_url: str
    grpc: str
    """host:port of the gRPC API."""
    metrics_url: str | None
    worker_metrics_url: str | None
    key_prefix: str
    memory: dict[str, float]
    """The memory plan `up` started with (instructloop/memory.py), in GiB."""


def record_path(directory: Path | None = None) -> Path:
    return (directory or data_dir()) / RECORD_NAME


def write_running(loop: RunningLoop, directory: Path | None = None) -> Path:
    """Write the record atomically (a reader never sees half of it)."""
    path = record_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(loop), indent=1))
    os.replace(tmp, path)
    return path


def remove_running(pid: int, directory: Path | None = None) -> None:
    """Remove the record if it is this process's (a newer `up` may have replaced it)."""
    path = record_path(directory)
    current = read_running(directory, check_alive=False)
    if current is not None and current.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_running(directory: Path | None = None, *, check_alive: bool = True) -> RunningLoop | None:
    """The running `up`'s record, or None (no record, unreadable, or its process is gone)."""
    try:
        raw = json.loads(record_path(directory).read_text())
        loop = RunningLoop(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if check_alive and not pid_alive(loop.pid):
        return None
    return loop


def resolve_redis_url(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(Redis URL, where it came from): the flag, $REDIS_URL, the running `up`, or the default."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, "--redis-url"
    if env.get("REDIS_URL"):
        return env["REDIS_URL"], "$REDIS_URL"
    loop = read_running()
    if loop is not None:
        return loop.redis_url, f"instructloop up (pid {loop.pid})"
    return DEFAULT_REDIS_URL, "default"
