"""The store's write path: script calls on one dedicated Redis connection, batched and pipelined.

Every feedback and completion write is one EVALSHA. Under load the gRPC server's one thread is
the limit, and grpc.aio hands requests over about one per loop turn, so batches are small and
redis-py's per-pipeline machinery (a Pipeline object, a pool checkout, per-reply parsing
coroutines) would be paid on nearly every call. This channel does the same work with hiredis in C
(`pack_command` to encode, `Reader` to parse) on a plain asyncio connection, at about half the
CPU per batch (benchmarks/HISTORY.md, `feedback` with the write channel). Reads and everything
else go through redis-py.

The channel opens its connection itself, from the settings of the store's redis-py pool: TCP,
unix sockets and TLS (rediss://, with the SSL context redis-py builds for the same URL). A pool
it cannot copy (a connection class of the caller's own, a credential provider whose tokens
change) gets `PipelineChannel`: the same batches and semantics, sent as redis-py pipelines.

Semantics (those of a redis-py pipeline):
- calls that arrive while `in_flight` batches are outstanding form the next batch (group
  commit: one socket write, one read, and one fsync under `appendfsync always`);
- each call is its own script, run atomically by Redis; replies come back in order;
- a lost connection or a reply that does not come within `timeout_s` fails the batch; the batch
  is resent on a new connection up to `retries` times (safe: the scripts recognise their own
  earlier write), and then every caller gets the error: nobody was acknowledged;
- scripts Redis does not know (NOSCRIPT, after a restart) are loaded and their calls resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis.backoff import AbstractBackoff, ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = tuple[Any, ...]
"""A command as sent: ("EVALSHA", sha, numkeys, *keys_and_args), ("AUTH", ...), ..."""


class Unsupported(Exception):
    """The script channel cannot open this pool's connections itself; use PipelineChannel."""


# Connection classes whose settings the channel can reproduce on a socket of its own.
_PLAIN = (
    redis.Connection,
    redis.UnixDomainSocketConnection,
    aioredis.Connection,
    aioredis.UnixDomainSocketConnection,
)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: taken from a redis-py connection pool, so one URL configures
    both the redis-py client (reads) and this channel."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """A unix socket path (unix:// URLs); host and port are then unused."""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    """TLS (rediss:// URLs): the context redis-py builds from the URL's ssl_* settings, so both
    paths check the server alike (CA, hostname, client certificate)."""

    @classmethod
    def from_pool(cls, pool: Any) -> Endpoint:
        """The pool's endpoint. Raises Unsupported for a pool this channel cannot copy, and
        ValueError for TLS settings that do not work (a missing CA file, a bad ssl_cert_reqs),
        so a bad URL fails when the store is made rather than on its first write."""
        kw = pool.connection_kwargs
        kind = pool.connection_class
        if kw.get("credential_provider") is not None:
            raise Unsupported("a credential provider (its AUTH tokens change over time)")
        tls: ssl.SSLContext | None = None
        if kind is aioredis.SSLConnection:
            try:
                tls = kind(**kw).ssl_context.get()
            except (RedisError, OSError, ValueError) as e:
                raise ValueError(f"the TLS settings of this Redis URL do not work: {e}") from e
        elif kind not in _PLAIN:
            raise Unsupported(f"connections of class {kind.__module__}.{kind.__qualname__}")
        return cls(
            host=kw.get("host", "127.0.0.1"),
            port=int(kw.get("port", 6379)),
            path=kw.get("path"),
            db=int(kw.get("db") or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            tls=tls,
        )

    def handshake(self) -> list[Command]:
        cmds: list[Command] = []
        if self.password is not None:
            user = (self.username,) if self.username else ()
            cmds.append(("AUTH", *user, self.password))
        if self.db:
            cmds.append(("SELECT", self.db))
        return cmds


class _Batch:
    """The replies of one sent batch, filled in order by the protocol."""

    __slots__ = ("done", "expected", "replies")

    def __init__(self, expected: int, done: asyncio.Future[list[Any]]) -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.done = done


class _Resp(asyncio.Protocol):
    """One RESP2 connection: writes packed commands, matches replies to batches in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.batches: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                batch = self.batches[0]
                batch.replies.append(reply)
                if len(batch.replies) == batch.expected:
                    self.batches.popleft()
                    if not batch.done.done():
                        batch.done.set_result(batch.replies)
        except (hiredis.ProtocolError, IndexError) as e:  # garbage, or a reply nobody asked for
            self.close(RedisConnectionError(f"bad reply from Redis: {e!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def close(self, err: Exception) -> None:
        if self.lost is None:
            self.lost = err
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        while self.batches:
            done = self.batches.popleft().done
            if not done.done():
                done.set_exception(self.lost)

    def send(self, cmds: Sequence[Command]) -> asyncio.Future[list[Any]]:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.transport.write(b"".join([hiredis.pack_command(c) for c in cmds]))
        self.batches.append(_Batch(len(cmds), done))
        return done


class _BatchedCalls:
    """Group commit of script calls (the module docstring's semantics); subclasses send."""

    def __init__(
        self,
        *,
        max_batch: int,
        in_flight: int,
        retries: int,
        backoff: AbstractBackoff,
    ) -> None:
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.retries = retries
        self.backoff = backoff
        self._pending: list[tuple[Command, asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts: dict[str, str] = {}
        """sha -> script, to load the scripts Redis does not know (NOSCRIPT)."""
        self.batches_sent = 0

    async def _send(self, wire: list[Command]) -> list[Any]:
        """Send one batch; its replies in order, error replies as exception objects."""
        raise NotImplementedError

    def _reset(self, *, close: bool) -> None:
        """Forget the connection (closing it on close(); on a new event loop, tests run one per
        test, it belongs to the old loop and is only dropped)."""

    # -- callers ------------------------------------------------------------------------------

    def call(self, sha: str, script: str, *args: Any) -> asyncio.Future[Any]:
        """Queue one script call; the future holds its reply (or the error)."""
        loop = asyncio.get_running_loop()
        if not self._tasks or self._tasks[0].get_loop() is not loop or self._tasks[0].done():
            self._start(loop)
        assert self._wake is not None
        fut: asyncio.Future[Any] = loop.create_future()
        self._scripts[sha] = script
        self._pending.append((("EVALSHA", sha, *args), fut))
        self._wake.set()
        return fut

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await t
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RedisConnectionError("the write channel was closed"))
        self._pending.clear()
        self._reset(close=True)

    # -- the writers --------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reset(close=False)
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._writer()) for _ in range(self.in_flight)]

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                results = await self._execute([cmd for cmd, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(RedisConnectionError("the write channel was closed"))
                raise
            except Exception as e:  # every caller of the batch gets the failure
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():  # the caller gave up (cancelled); the write may still stand
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def _execute(self, cmds: list[Command]) -> list[Any]:
        results = await self._send_retrying(cmds)
        # Redis forgets scripts on restart: load them and run the calls that missed again.
        missing = [i for i, r in enumerate(results) if _is_noscript(r)]
        if missing:
            shas = {cmds[i][1] for i in missing}
            loaded = await self._send_retrying([("SCRIPT", "LOAD", self._scripts[h]) for h in shas])
            for r in loaded:
                if isinstance(r, Exception):
                    raise r
            again = await self._send_retrying([cmds[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        return results

    async def _send_retrying(self, cmds: list[Command]) -> list[Any]:
        failures = 0
        while True:
            try:
                return await self._send(cmds)
            except (RedisConnectionError, RedisTimeoutError):
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(self.backoff.compute(failures))


class ScriptChannel(_BatchedCalls):
    """Batched EVALSHA calls on one connection of its own, hiredis in C (the fast path)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_batch: int,
        in_flight: int,
        timeout_s: float,
        connect_timeout_s: float,
        retries: int,
        backoff: ExponentialBackoff,
    ) -> None:
        super().__init__(max_batch=max_batch, in_flight=in_flight, retries=retries, backoff=backoff)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._conn: _Resp | None = None
        self._connecting: asyncio.Lock | None = None

    def _reset(self, *, close: bool) -> None:
        if close and self._conn is not None:
            self._conn.close(RedisConnectionError("the write channel was closed"))
        self._conn = None
        self._connecting = asyncio.Lock()

    async def _send(self, wire: list[Command]) -> list[Any]:
        conn = await self._connection()
        done = conn.send(wire)
        self.batches_sent += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                return await done
        except TimeoutError:
            # The replies may still come, out of step with what we would expect next: start over
            # on a new connection (the batch is retried; the scripts recognise their own writes).
            err = RedisTimeoutError(f"no reply from Redis within {self.timeout_s:g} s")
            conn.close(err)
            raise err from None

    async def _connection(self) -> _Resp:
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        assert self._connecting is not None
        async with self._connecting:
            if self._conn is not None and self._conn.lost is None:
                return self._conn
            self._conn = await self._open()
            return self._conn

    async def _open(self) -> _Resp:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if ep.path is not None:
                    _, conn = await loop.create_unix_connection(_Resp, ep.path)
                else:
                    # With TLS the host name is also the one the certificate is checked against.
                    _, conn = await loop.create_connection(_Resp, ep.host, ep.port, ssl=ep.tls)
        except (OSError, TimeoutError) as e:  # ssl.SSLError (a refused certificate) included
            where = ep.path or f"{ep.host}:{ep.port}"
            raise RedisConnectionError(f"cannot connect to Redis at {where}: {e!r}") from None
        hello = ep.handshake()
        if hello:
            try:
                async with asyncio.timeout(self.timeout_s):
                    replies = await conn.send(hello)
            except TimeoutError:
                conn.close(RedisTimeoutError("no reply to AUTH/SELECT"))
                raise RedisTimeoutError("no reply from Redis to AUTH/SELECT") from None
            for r in replies:
                if isinstance(r, Exception):
                    conn.close(RedisConnectionError(str(r)))
                    raise RedisConnectionError(f"Redis refused the connection: {r}")
        return conn


class PipelineChannel(_BatchedCalls):
    """The same batches through redis-py's pipeline, for pools the script channel cannot copy
    (Endpoint.from_pool): slower per batch, the same group commit and reply matching.

    Resending is redis-py's: the pool's Retry (the store's retries and backoff) sends a batch
    again on a new connection after a connection error or timeout, which is as safe as the
    script channel's resend. This layer therefore does not retry on top of it."""

    def __init__(self, client: aioredis.Redis, *, max_batch: int, in_flight: int) -> None:
        super().__init__(max_batch=max_batch, in_flight=in_flight, retries=0, backoff=NoBackoff())
        self.client = client

    async def _send(self, wire: list[Command]) -> list[Any]:
        self.batches_sent += 1
        pipe = self.client.pipeline(transaction=False)
        for cmd in wire:
            pipe.execute_command(*cmd)
        return list(await pipe.execute(raise_on_error=False))


def _is_noscript(reply: Any) -> bool:
    # hiredis keeps the error code in the message; redis-py's parser turns it into a class.
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
    )
