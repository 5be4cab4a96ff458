"""Object storage as it is in the cloud, on loopback: an HTTP/1.1 proxy in front of an S3 server
that adds first-byte latency, caps bandwidth, answers 503 SlowDown and resets connections.

    with fault_proxy(moto_url, Faults(latency_ms=25, jitter_ms=5, slowdown=0.01, reset=0.001)) as p:
        options = {"client_kwargs": {"endpoint_url": p.url}}   # real s3fs / botocore traffic
        ...
        p.stats()   # {"requests": ..., "slowdowns": ..., "resets": ..., "bytes": ..., "methods": {"GET": ...}}

The proxy runs in its own process (``python tests/s3_faults.py --upstream URL ...``, which prints
its URL as a JSON line), so its event loop never competes with the client for the GIL. Requests
and answers are relayed byte for byte (signatures stay valid); per request, drawn from a seeded
generator:

- latency: the request waits ``latency_ms`` +- ``jitter_ms`` (uniform) before it is forwarded;
- bandwidth: each answer body is paced to ``bandwidth_mb_s`` MB/s (0: no cap);
- slowdown: with probability ``slowdown`` the answer is S3's ``503 SlowDown``, with
  ``Retry-After: <retry_after>`` (seconds), and the request never reaches the server;
- reset: with probability ``reset`` the connection is reset (RST): half of the time before any
  answer, half of the time after the head and half of the body.

A request that was just failed (same method, path and Range) is never failed twice in a row, so
a client retrying with a few attempts always gets through and tests stay deterministic.
``GET /__faults__`` answers the counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import urllib.request
from dataclasses import asdict, dataclass

CHUNK = 256 * 2**10
STATS_PATH = "/__faults__"
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass(frozen=True)
class Faults:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mb_s: float = 0.0
    slowdown: float = 0.0
    retry_after: int = 1
    reset: float = 0.0
    seed: int = 0

    def args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]


class HttpStream:
    """Reads HTTP/1.1 messages from an asyncio stream and copies them to another, byte for byte."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader

    async def head(self) -> tuple[bytes, dict[str, str]] | None:
        """The raw head (start line and headers, with the blank line) and its headers, lower-cased;
        None at a clean end of the connection."""
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ConnectionError("connection closed inside an HTTP head") from exc
            return None
        headers = {}
        for line in raw.split(b"\r\n")[1:]:
            if b":" in line:
                name, value = line.split(b":", 1)
                headers[name.strip().lower().decode()] = value.strip().decode()
        return raw, headers

    async def body(self, headers: dict[str, str], until_eof: bool = False):
        """Yield the message body's raw bytes (framing included for chunked bodies)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                yield size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:  # trailers, then the blank line
                    while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        yield line
                    yield b"\r\n"
                    return
                yield await self.reader.readexactly(size + 2)
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                data = await self.reader.readexactly(min(left, CHUNK))
                left -= len(data)
                yield data
        elif until_eof:
            while data := await self.reader.read(CHUNK):
                yield data


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.faults = faults
        self.random = random.Random(faults.seed)
        self.just_failed: set[tuple] = set()
        self.counts = dict(requests=0, slowdowns=0, resets=0, resets_mid_body=0, bytes=0)
        self.methods: dict[str, int] = {}

    def draw(self, key: tuple) -> str | None:
        """The fault for this request: "slowdown", "reset", "reset_mid_body" or None."""
        u = self.random.random()
        if key in self.just_failed:
            self.just_failed.discard(key)
            return None
        f = self.faults
        fault = None
        if u < f.slowdown:
            fault = "slowdown"
        elif u < f.slowdown + f.reset:
            fault = "reset" if self.random.random() < 0.5 else "reset_mid_body"
        if fault:
            self.just_failed.add(key)
        return fault

    async def serve(self, client_reader, client_writer) -> None:
        client = HttpStream(client_reader)
        upstream = None
        try:
            while (request := await client.head()) is not None:
                raw, headers = request
                method, target = raw.split(b" ", 2)[:2]
                if target.decode().startswith(STATS_PATH):
                    await self.answer_stats(client_writer)
                    continue
                self.counts["requests"] += 1
                self.methods[method.decode()] = self.methods.get(method.decode(), 0) + 1
                fault = self.draw((method, target, headers.get("range")))
                if headers.get("expect", "").lower() == "100-continue":
                    # answered here; the server is not asked (its interim answer would come first)
                    client_writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    raw = b"".join(
                        line
                        for line in raw.splitlines(keepends=True)
                        if not line.lower().startswith(b"expect:")
                    )
                body = [part async for part in client.body(headers)]
                await self.wait_latency()
                if fault == "reset":
                    self.counts["resets"] += 1
                    return reset(client_writer)
                if fault == "slowdown":
                    self.counts["slowdowns"] += 1
                    await self.answer_slowdown(client_writer, method)
                    continue
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream)
                upstream[1].write(raw + b"".join(body))
                keep = await self.relay_answer(
                    HttpStream(upstream[0]), client_writer, method, fault == "reset_mid_body"
                )
                if keep is None:  # reset mid-body
                    self.counts["resets_mid_body"] += 1
                    return reset(client_writer)
                if not keep:
                    upstream[1].close()
                    upstream = None
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if upstream is not None:
                upstream[1].close()
            with contextlib.suppress(Exception):
                client_writer.close()

    async def wait_latency(self) -> None:
        f = self.faults
        if f.latency_ms or f.jitter_ms:
            jitter = self.random.uniform(-f.jitter_ms, f.jitter_ms)
            await asyncio.sleep(max(0.0, f.latency_ms + jitter) / 1000)

    async def relay_answer(self, answer: HttpStream, client, method: bytes, cut: bool):
        """Copy one answer to the client; whether the upstream connection stays usable, or None
        when the answer was cut (``cut``: half of the body sent, then the caller resets)."""
        while True:  # interim (1xx) answers are not relayed
            got = await answer.head()
            if got is None:
                raise ConnectionError("the S3 server closed the connection")
            raw, headers = got
            status = int(raw.split(b" ", 2)[1])
            if status >= 200:
                break
        client.write(raw)
        no_body = method == b"HEAD" or status in (204, 304)
        length = int(headers.get("content-length", 0))
        sent, started = 0, asyncio.get_running_loop().time()
        if not no_body:
            async for data in answer.body(headers, until_eof=True):
                if cut and sent + len(data) >= length // 2:
                    client.write(data[: max(0, length // 2 - sent)])
                    await client.drain()
                    return None
                client.write(data)
                sent += len(data)
                self.counts["bytes"] += len(data)
                await self.pace(sent, started)
                await client.drain()
        await client.drain()
        if cut:  # nothing to cut in half (a HEAD or an empty body): reset after the head
            return None
        return headers.get("connection", "").lower() != "close"

    async def pace(self, sent: int, started: float) -> None:
        if self.faults.bandwidth_mb_s > 0:
            due = started + sent / (self.faults.bandwidth_mb_s * 1e6)
            delay = due - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def answer_slowdown(self, client, method: bytes) -> None:
        body = b"" if method == b"HEAD" else SLOWDOWN_BODY
        client.write(
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            + f"Retry-After: {self.faults.retry_after}\r\n".encode()
            + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode()
            + body
        )
        await client.drain()

    async def answer_stats(self, client) -> None:
        body = json.dumps({**self.counts, "methods": self.methods}).encode()
        client.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await client.drain()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a load balancer dropping a connection does."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class RunningProxy:
    url: str

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + STATS_PATH, timeout=10) as answer:
            return json.loads(answer.read())


@contextlib.contextmanager
def fault_proxy(upstream: str, faults: Faults = Faults()):
    """Run the proxy in front of ``upstream`` (an http://host:port S3 endpoint) in a subprocess."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--upstream", upstream, *faults.args()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fault proxy exited with {proc.wait()} before it listened")
        yield RunningProxy(json.loads(line)["url"])
    finally:
        proc.terminate()
        proc.wait(10)


async def _main(args: argparse.Namespace) -> None:
    names = Faults.__dataclass_fields__
    proxy = FaultProxy(args.upstream, Faults(**{k: getattr(args, k) for k in names}))
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", args.port, limit=2**20)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
    asyncio.get_running_loop().create_task(_exit_with_parent(os.getppid()))
    async with server:
        await server.serve_forever()


async def _exit_with_parent(parent: int) -> None:
    """A proxy whose test process died (killed by a timeout, say) must not outlive it."""
    while os.getppid() == parent:
        await asyncio.sleep(1)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the S3 server, http://host:port")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    for name, field in Faults.__dataclass_fields__.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
