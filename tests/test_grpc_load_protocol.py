"""benchmarks/grpc_load.py's HTTP/2 handling, frame by frame, with the server's side played by
the test: what the real gRPC server never makes it do (its windows are 4 MiB, it does not
PING unasked) is checked here. tests/serving/test_grpc_load.py checks it against the server."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import hpack
import pytest

from benchmarks.grpc_load import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    GrpcError,
    _frame,
)


class Transport:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((kind, flags, sid, bytes(data[pos + 9 : pos + 9 + n])))
        pos += 9 + n
    return out


class Server:
    """The server's half: reads what the client sent, answers with frames."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.conn = Connection("test:1")
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.read = 0

    async def sent(self) -> list[tuple[int, int, int, bytes]]:
        for _ in range(3):  # a new call's task starts, writes, and the flush runs a turn later
            await asyncio.sleep(0)
        data = bytes(self.transport.sent[self.read :])
        self.read = len(self.transport.sent)
        if data.startswith(b"PRI"):
            data = data[24:]
        return parse(data)

    def feed(self, *frames: bytes) -> None:
        self.conn.data_received(b"".join(frames))

    def headers(self, sid: int, headers: list[tuple[str, str]], flags: int = 0) -> bytes:
        return _frame(HEADERS, END_HEADERS | flags, sid, self.encoder.encode(headers))

    def reply(self, sid: int, message: bytes) -> bytes:
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        return (
            self.headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            + _frame(DATA, 0, sid, body)
            + self.headers(sid, [("grpc-status", "0")], END_STREAM)
        )


async def started() -> Server:
    s = Server()
    s.feed(_frame(SETTINGS, 0, 0))
    await s.conn._ready
    return s


def call(s: Server, request: bytes, metadata: Any = ()) -> asyncio.Task[bytes]:
    return asyncio.ensure_future(s.conn.unary("/p.S/M", request, metadata))


async def test_a_call_is_headers_then_data_and_returns_the_message() -> None:
    s = await started()
    first = await s.sent()
    assert [f[0] for f in first] == [SETTINGS, WINDOW_UPDATE, SETTINGS]  # ours, our ACK
    task = call(s, b"req", (("authorization", "Bearer k"),))
    (h, d) = await s.sent()
    assert h[0] == HEADERS and h[2] == 1 and h[1] & END_HEADERS
    sent_headers = dict(s.decoder.decode(h[3]))
    assert sent_headers[":path"] == "/p.S/M" and sent_headers["te"] == "trailers"
    assert sent_headers["authorization"] == "Bearer k"
    assert d == (DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x03req")
    s.feed(s.reply(1, b"resp"))
    assert await task == b"resp"
    # The second call's header block is the indexed form of the first: 1 byte per field.
    task = call(s, b"req2", (("authorization", "Bearer k"),))
    (h, _) = await s.sent()
    assert h[2] == 3 and len(h[3]) == 7 and all(b & 0x80 for b in h[3])
    assert dict(s.decoder.decode(h[3])) == sent_headers
    s.feed(s.reply(3, b"r2"))
    assert await task == b"r2"


async def test_status_and_message_of_a_failed_call() -> None:
    s = await started()
    await s.sent()
    task = call(s, b"x")
    await s.sent()
    trailers = [
        (":status", "200"),
        ("grpc-status", "3"),
        ("grpc-message", "bad%20ranking%3A%20dup"),
    ]
    s.feed(s.headers(1, trailers, END_STREAM))  # trailers-only
    with pytest.raises(GrpcError) as e:
        await task
    assert (e.value.code, e.value.code_name, e.value.message) == (
        3,
        "INVALID_ARGUMENT",
        "bad ranking: dup",
    )


async def test_data_waits_for_the_connection_window() -> None:
    s = await started()
    await s.sent()
    request = bytes(10_000)
    tasks = [call(s, request) for _ in range(8)]  # 80 kB > the 65,535-byte initial window
    frames = await s.sent()
    data = [f for f in frames if f[0] == DATA]
    assert len(data) == 6 and len([f for f in frames if f[0] == HEADERS]) == 8
    s.feed(_frame(WINDOW_UPDATE, 0, 0, (20_010).to_bytes(4, "big")))
    data = [f for f in await s.sent() if f[0] == DATA]
    assert [f[2] for f in data] == [13, 15]
    for i in range(8):
        s.feed(s.reply(1 + 2 * i, b"ok"))
    assert await asyncio.gather(*tasks) == [b"ok"] * 8


async def test_ping_settings_and_received_data_are_answered() -> None:
    s = await started()
    await s.sent()
    s.feed(_frame(PING, 0, 0, b"12345678"), _frame(SETTINGS, 0, 0))
    assert await s.sent() == [(PING, 1, 0, b"12345678"), (SETTINGS, 1, 0, b"")]
    # 1 MiB of response data gives the server its connection window back.
    task = call(s, b"x")
    await s.sent()
    big = bytes(1 << 20)
    body = b"\x00" + len(big).to_bytes(4, "big") + big
    chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
    s.feed(
        s.headers(1, [(":status", "200")]),
        *(_frame(DATA, 0, 1, c) for c in chunks),
        s.headers(1, [("grpc-status", "0")], END_STREAM),
    )
    assert await task == big
    (update,) = await s.sent()
    assert update[0] == WINDOW_UPDATE and int.from_bytes(update[3], "big") >= 1 << 20


async def test_broken_streams_and_connections_fail_their_calls() -> None:
    s = await started()
    await s.sent()
    no_trailers, reset, open_ = call(s, b"a"), call(s, b"b"), call(s, b"c")
    await s.sent()
    s.feed(
        s.headers(1, [(":status", "200")]),
        _frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"),
        _frame(RST_STREAM, 0, 3, (2).to_bytes(4, "big")),
    )
    for task, code in ((no_trailers, "INTERNAL"), (reset, "INTERNAL")):
        with pytest.raises(GrpcError) as e:
            await task
        assert e.value.code_name == code
    s.feed(_frame(GOAWAY, 0, 0, (3).to_bytes(4, "big") + (0).to_bytes(4, "big")))
    with pytest.raises(GrpcError) as e:
        await open_
    assert e.value.code_name == "UNAVAILABLE"
    with pytest.raises(GrpcError):
        await s.conn.unary("/p.S/M", b"")


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


async def _collect(s: Server, out: list[bytes]) -> None:
    async for m in s.conn.stream("/p.S/Stream", b"req"):
        out.append(m)


async def test_a_stream_yields_messages_however_the_frames_cut_them() -> None:
    s = await started()
    await s.sent()
    got: list[bytes] = []
    task = asyncio.ensure_future(_collect(s, got))
    (h, d) = await s.sent()
    assert h[0] == HEADERS and dict(s.decoder.decode(h[3]))[":path"] == "/p.S/Stream"
    assert d == (DATA, END_STREAM, 1, _message(b"req"))
    wire = _message(b"one") + _message(b"") + _message(b"three" * 1000)
    s.feed(s.headers(1, [(":status", "200"), ("content-type", "application/grpc")]))
    # Cut mid-prefix and mid-body; the first frame holds one whole message and a part.
    for a, b in itertools.pairwise([0, 9, 11, 2000]):
        s.feed(_frame(DATA, 0, 1, wire[a:b]))
    for _ in range(3):
        await asyncio.sleep(0)
    assert got == [b"one", b""]
    s.feed(_frame(DATA, 0, 1, wire[2000:]), s.headers(1, [("grpc-status", "0")], END_STREAM))
    await task
    assert got == [b"one", b"", b"three" * 1000]


async def test_a_stream_raises_the_status_after_its_messages() -> None:
    s = await started()
    await s.sent()
    got: list[bytes] = []
    task = asyncio.ensure_future(_collect(s, got))
    await s.sent()
    s.feed(
        s.headers(1, [(":status", "200")]),
        _frame(DATA, 0, 1, _message(b"partial answer")),
        s.headers(1, [("grpc-status", "14"), ("grpc-message", "engine%20restarting")], END_STREAM),
    )
    with pytest.raises(GrpcError) as e:
        await task
    assert got == [b"partial answer"]
    assert (e.value.code_name, e.value.message) == ("UNAVAILABLE", "engine restarting")


async def test_a_truncated_or_compressed_stream_is_an_error() -> None:
    s = await started()
    await s.sent()
    truncated = asyncio.ensure_future(_collect(s, []))
    compressed = asyncio.ensure_future(_collect(s, []))
    await s.sent()
    s.feed(
        s.headers(1, [(":status", "200")]),
        _frame(DATA, 0, 1, _message(b"abcdef")[:7]),
        s.headers(1, [("grpc-status", "0")], END_STREAM),
        s.headers(3, [(":status", "200")]),
        _frame(DATA, 0, 3, b"\x01" + _message(b"zz")[1:]),
    )
    for task, words in ((truncated, "truncated"), (compressed, "compressed")):
        with pytest.raises(GrpcError) as e:
            await task
        assert e.value.code_name == "INTERNAL" and words in e.value.message
    # The compressed one was reset on the wire: the server stops sending it.
    assert (RST_STREAM, 0, 3, (8).to_bytes(4, "big")) in await s.sent()


async def test_leaving_a_stream_cancels_it() -> None:
    s = await started()
    await s.sent()
    stream = s.conn.stream("/p.S/Stream", b"req")
    first = asyncio.ensure_future(anext(stream))  # the call starts on the first read
    await s.sent()
    s.feed(s.headers(1, [(":status", "200")]), _frame(DATA, 0, 1, _message(b"first")))
    assert await first == b"first"
    await stream.aclose()
    frames = await s.sent()
    assert frames[-1] == (RST_STREAM, 0, 1, (8).to_bytes(4, "big"))
    # Frames still in flight for it are dropped; the connection carries on.
    s.feed(_frame(DATA, 0, 1, _message(b"late")))
    task = call(s, b"x")
    await s.sent()
    s.feed(s.reply(3, b"ok"))
    assert await task == b"ok"
