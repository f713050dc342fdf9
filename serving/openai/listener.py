"""uvicorn in the serving process's own event loop: `HttpListener` runs `uvicorn.Server.serve`
as a task of the running loop (no thread, no second process), beside grpc.aio, so both
transports share the engine, the Redis clients and the core they call.

The socket is bound here, before uvicorn starts, so a port in use fails `start()` with an
OSError (uvicorn would call sys.exit inside the task) and port 0 yields the bound port.
uvicorn's own signal handlers are left out: the process (instructloop/cli/serve.py) owns SIGINT
and SIGTERM and stops the server, this listener included, through InstructloopServer.stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

log = logging.getLogger("instructloop.serving.http")


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """An ASGI app served by uvicorn on `host:port` (0: a free one, `port` after `start`)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        access_log: bool = False,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls_cert is not None
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            ws="none",
            log_config=None,  # the process's logging stays as it was set up
            log_level="info" if access_log else "warning",
            access_log=access_log,
            proxy_headers=False,  # nothing here reads the client's address
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving in this loop; return the port."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = int(sock.getsockname()[1])
        server = _InLoopServer(self._config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="http-listener")
        while not server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace` seconds, then cancel
        what is left."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        self._server = self._task = None
        server.config.timeout_graceful_shutdown = max(grace, 0.0)
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), grace + 5.0)
        except TimeoutError:
            log.warning("HTTP server did not stop in time; cancelling it")
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        except Exception as e:
            log.warning("HTTP server stopped with an error: %s", e)
