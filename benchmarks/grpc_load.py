"""A lean gRPC client for load generation: unary calls over HTTP/2, spoken directly.

Why not grpc.aio's client: it spends more CPU per call than this one (benchmarks/HISTORY.md),
taken from the server it measures on the same cores. Load tools such as ghz or h2load exist for
that reason; neither can be installed where the benchmarks run (no network). This client does
what they do: request headers are HPACK-encoded once per connection and then sent as the
encoder's indexed form, every write of an event-loop turn goes out in one send, and a
response's header blocks are decoded once per distinct byte string.

It still checks what a gRPC client checks: every call ends with its trailers' `grpc-status`
(and `grpc-message`), a non-zero status raises `GrpcError`, and the response message is
returned as bytes for the caller to parse. HTTP/2 flow control, SETTINGS, PING and GOAWAY are
honoured. Server-streaming calls yield each message as it arrives (the serving benchmark's
streams: grpc.aio's client spends more CPU per streamed token than aiohttp spends on the other
server's SSE, CPU taken from the servers compared); a stream left early is cancelled with
RST_STREAM, as grpc.aio does. Not supported (not needed by a benchmark): TLS, compression,
client streaming.

    conn = await Connection.open("127.0.0.1", port)
    reply = await conn.unary("/pkg.Service/Method", request.SerializeToString(), metadata)
    async for message in conn.stream("/pkg.Service/Streams", request, metadata): ...
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import unquote

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, RST_STREAM, SETTINGS = 0x0, 0x1, 0x3, 0x4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
CANCEL = 0x8  # RST_STREAM error code (RFC 9113 section 7): what grpc sends for a cancelled call
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x1, 0x2, 0x4
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384
# Give the server its connection window back in steps of this many received bytes.
WINDOW_STEP = 1 << 20

# grpc status codes by number (grpc.StatusCode's values are (number, name) pairs).
_CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip


class GrpcError(Exception):
    """A call that ended with a non-OK status (from the server, or UNAVAILABLE/INTERNAL for a
    broken connection or a malformed response)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{_CODE_NAMES.get(code, code)}: {message}")
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return _CODE_NAMES.get(self.code, str(self.code))


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _all_indexed(block: bytes) -> bool:
    """True if the HPACK block is only one-byte indexed fields: decoding or sending it again
    leaves the dynamic table as it is, so its decoded (or encoded) form can be reused until a
    block that is not all-indexed changes the table."""
    return all(b & 0x80 for b in block)


class _Stream:
    """A call's state. Unary: `future` gets the response. Server streaming: `messages` gets
    each response message as it completes, then None (OK) or the GrpcError that ended it."""

    __slots__ = ("data", "future", "headers", "messages")

    def __init__(
        self,
        future: asyncio.Future[bytes] | None = None,
        messages: asyncio.Queue[bytes | GrpcError | None] | None = None,
    ) -> None:
        self.future = future
        self.messages = messages
        self.data = bytearray()
        self.headers: dict[str, str] = {}

    def fail(self, error: GrpcError) -> None:
        if self.messages is not None:
            self.messages.put_nowait(error)
        elif self.future is not None and not self.future.done():
            self.future.set_exception(error)

    def take_messages(self) -> GrpcError | None:
        """Move every complete length-prefixed message in `data` to `messages`."""
        assert self.messages is not None
        data, pos = self.data, 0
        while len(data) - pos >= 5:
            if data[pos] != 0:
                return GrpcError(13, "compressed response message (not supported)")
            end = pos + 5 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if end > len(data):
                break
            self.messages.put_nowait(bytes(data[pos + 5 : end]))
            pos = end
        del data[:pos]
        return None


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying any number of concurrent unary calls."""

    def __init__(self, authority: str) -> None:
        self._authority = authority
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._closed: GrpcError | None = None
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._sent_blocks: dict[tuple, bytes] = {}  # header list -> its all-indexed encoding
        self._received_blocks: dict[bytes, list[tuple[str, str]]] = {}
        self._next_id = 1
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        self._in = bytearray()
        self._open_block: tuple[int, int, bytearray] | None = None  # CONTINUATION in progress
        self._send_window = DEFAULT_WINDOW
        self._stream_window = DEFAULT_WINDOW  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self._blocked: deque[tuple[int, bytes]] = deque()  # DATA waiting for window
        self._unacked = 0

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        async with asyncio.timeout(timeout):
            await conn._ready  # the server's SETTINGS
        return conn

    # -- calls --------------------------------------------------------------------------------

    async def unary(
        self, path: str, request: bytes, metadata: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        """Call `path` with a serialized request; the serialized response, or GrpcError.

        There is no client-side deadline: pass `("grpc-timeout", "10S")` in `metadata` and the
        server ends the call with DEADLINE_EXCEEDED."""
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._start(_Stream(future=future), path, request, metadata)
        return await future

    async def stream(
        self, path: str, request: bytes, metadata: tuple[tuple[str, str], ...] = ()
    ) -> AsyncIterator[bytes]:
        """Call a server-streaming `path`: each serialized response message as it arrives; a
        non-OK status (or a broken connection) raises GrpcError after the messages before it.
        Leaving the loop early cancels the call (RST_STREAM CANCEL), as grpc.aio does."""
        messages: asyncio.Queue[bytes | GrpcError | None] = asyncio.Queue()
        sid = self._start(_Stream(messages=messages), path, request, metadata)
        try:
            while (item := await messages.get()) is not None:
                if isinstance(item, GrpcError):
                    raise item
                yield item
        finally:
            # A call that ended (trailers, reset, lost connection) has left `_streams`; one
            # still there was left early by its reader.
            if self._streams.pop(sid, None) is not None:
                self._write(_frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))

    def _start(
        self, stream: _Stream, path: str, request: bytes, metadata: tuple[tuple[str, str], ...]
    ) -> int:
        """Send a call's headers and its one request message; its stream id."""
        if self._closed is not None:
            raise self._closed
        message = b"\x00" + len(request).to_bytes(4, "big") + request
        if len(message) > min(MAX_FRAME, self._stream_window):
            raise ValueError(f"request of {len(request)} bytes: this client sends one DATA frame")
        sid = self._next_id
        self._next_id += 2
        self._streams[sid] = stream
        self._write(_frame(HEADERS, END_HEADERS, sid, self._encode(path, metadata)))
        if self._blocked or len(message) > self._send_window:
            self._blocked.append((sid, message))
        else:
            self._send_window -= len(message)
            self._write(_frame(DATA, END_STREAM, sid, message))
        return sid

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _encode(self, path: str, metadata: tuple[tuple[str, str], ...]) -> bytes:
        key = (path, metadata)
        block = self._sent_blocks.get(key)
        if block is None:
            headers = [
                (":method", "POST"), (":scheme", "http"), (":path", path),
                (":authority", self._authority), ("content-type", "application/grpc"),
                ("te", "trailers"), *metadata,
            ]  # fmt: skip
            block = self._encoder.encode(headers)
            if _all_indexed(block):
                self._sent_blocks[key] = block
            else:  # the encoder's table changed: earlier indexed forms may be stale
                self._sent_blocks.clear()
        return block

    def _write(self, data: bytes) -> None:
        # One send per event-loop turn for everything written during it.
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    # -- protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = transport  # type: ignore[assignment]
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in ((SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW))
        )
        self._write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(GrpcError(14, f"connection lost: {exc or 'closed'}"))

    def _fail_all(self, error: GrpcError) -> None:
        self._closed = error
        if not self._ready.done():
            self._ready.set_exception(error)
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if end - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._on_frame(kind, flags, sid, payload)
        del buf[:pos]

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        """One branch per HTTP/2 frame type, kept in one function so that the protocol a
        received frame drives reads in one place (RFC 9113 section 6)."""
        if kind == DATA:
            self._unacked += len(payload)
            if self._unacked >= WINDOW_STEP:
                self._write(_frame(WINDOW_UPDATE, 0, 0, self._unacked.to_bytes(4, "big")))
                self._unacked = 0
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            stream = self._streams.get(sid)
            if stream is not None:
                stream.data += payload
                if stream.messages is not None:
                    error = stream.take_messages()
                    if error is not None:
                        del self._streams[sid]
                        self._write(_frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))
                        stream.fail(error)
                        return
                if flags & END_STREAM:
                    self._finish(sid, "stream ended without trailers")
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
                self._open_block = (sid, flags, bytearray(payload))
            elif self._open_block is not None:
                self._open_block[2].extend(payload)
            if flags & END_HEADERS and self._open_block is not None:
                sid, first_flags, block = self._open_block
                self._open_block = None
                self._on_headers(sid, first_flags, bytes(block))
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key = int.from_bytes(payload[i : i + 2], "big")
                value = int.from_bytes(payload[i + 2 : i + 6], "big")
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    self._stream_window = value
                elif key == SETTINGS_HEADER_TABLE_SIZE:
                    self._encoder.header_table_size = value
                    self._sent_blocks.clear()
            self._write(_frame(SETTINGS, ACK, 0))
            if not self._ready.done():
                self._ready.set_result(None)
        elif kind == PING and not flags & ACK:
            self._write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and sid == 0:
            self._send_window += int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            while self._blocked and len(self._blocked[0][1]) <= self._send_window:
                blocked_sid, message = self._blocked.popleft()
                self._send_window -= len(message)
                self._write(_frame(DATA, END_STREAM, blocked_sid, message))
        elif kind == RST_STREAM:
            stream = self._streams.pop(sid, None)
            if stream is not None:
                code = int.from_bytes(payload[:4], "big")
                stream.fail(GrpcError(13, f"stream reset (HTTP/2 error {code})"))
        elif kind == GOAWAY:
            # Every open call fails, even those a graceful server would still finish (ids up to
            # its last-stream-id): a benchmark counts them as errors rather than wait for them.
            code = int.from_bytes(payload[4:8], "big")
            self._fail_all(GrpcError(14, f"GOAWAY (HTTP/2 error {code}) {payload[8:]!r}"))

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        decoded = self._received_blocks.get(block)
        if decoded is None:
            # Every block goes through the decoder in order: it updates the dynamic table.
            decoded = self._decoder.decode(block)
            if _all_indexed(block):
                self._received_blocks[block] = decoded
            else:
                self._received_blocks.clear()
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.headers.update(decoded)
        if flags & END_STREAM:
            self._finish(sid, "no grpc-status in the trailers")

    def _finish(self, sid: int, missing: str) -> None:
        stream = self._streams.pop(sid)
        status = stream.headers.get("grpc-status")
        if status is None:
            stream.fail(GrpcError(13, f"{missing} (HTTP {stream.headers.get(':status')})"))
        elif status != "0":
            message = unquote(stream.headers.get("grpc-message", ""))
            stream.fail(GrpcError(int(status), message))
        elif stream.messages is not None:
            if stream.data:
                stream.fail(GrpcError(13, f"truncated response message ({len(stream.data)} bytes)"))
            else:
                stream.messages.put_nowait(None)
        else:
            assert stream.future is not None
            data = stream.data
            if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
                stream.future.set_exception(
                    GrpcError(13, f"malformed response message ({len(data)} bytes)")
                )
            else:
                stream.future.set_result(bytes(data[5:]))
