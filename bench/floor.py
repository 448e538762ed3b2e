"""The floor under the hot path: a bare Python proxy with none of the gateway's work.

``python -m bench.floor asgi|raw PORT UPSTREAM_PORT PATH [WORKERS]`` serves, on
``PORT``, every request with the page ``PATH`` fetched from the upstream through the gateway's own
upstream client (``gateway.upstream_client``): no session, policy, header filtering,
identity, log line or metrics.

* ``asgi``: an ASGI app under uvicorn as ``serve`` runs it (uvloop, httptools).
* ``raw``: an asyncio protocol on uvloop with httptools' parser, writing the upstream's
  head and body to the socket itself (no ASGI messages).

With ``WORKERS`` > 1 (default 1), that many forked processes accept on one listening
socket, as ``serve --workers`` does. ``bench.levers --lever floor`` loads both beside the
gateway and Apache with mod_auth_mellon; what the gateway costs
above ``asgi`` is its own work, what ``asgi`` costs above ``raw`` is the ASGI server's.
Not a server to run: it answers every request with the same page and no checks.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
from typing import Any

import httptools
import uvicorn
import uvloop

from gateway.upstream_client import Origin, Response, UpstreamClient

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
_DROP = frozenset({b"connection", b"keep-alive", b"date", b"server"})


class _Fetch:
    def __init__(self, upstream_port: int, path: str) -> None:
        self.origin = Origin.from_url(f"http://127.0.0.1:{upstream_port}")
        self.client = UpstreamClient(max_connections=64, keepalive_timeout=30)
        self.path = path

    async def __call__(self) -> Response:
        return await self.client.request(self.origin, "GET", self.path, [("Accept", "*/*")],
                                         None, length=None, connect_timeout=5, timeout=30)


def serve_asgi(sock: socket.socket, fetch: _Fetch) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        resp = await fetch()
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [(n.lower(), v) for n, v in resp.headers
                                if n.lower() not in _DROP]})
        while True:
            chunk = await resp.read()
            last = not chunk or resp.at_eof()
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                break
        resp.release()

    config = uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning",
                            access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


class _Raw(asyncio.Protocol):
    def __init__(self, fetch: _Fetch) -> None:
        self.fetch = fetch
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self.answer())

    async def answer(self) -> None:
        assert self.transport is not None
        resp = await self.fetch()
        head = [b"HTTP/1.1 %d OK\r\n" % resp.status]
        head += [n + b": " + v + b"\r\n" for n, v in resp.headers if n.lower() not in _DROP]
        head.append(b"\r\n")
        pending = b"".join(head)
        while True:
            chunk = await resp.read()
            if pending or chunk:
                self.transport.write(pending + chunk)
                pending = b""
            if not chunk or resp.at_eof():
                break
        resp.release()


def serve_raw(sock: socket.socket, fetch: _Fetch) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: _Raw(fetch), sock=sock)
        await server.serve_forever()

    uvloop.run(main())


def main(kind: str, port: int, upstream_port: int, path: str, workers: int) -> None:
    """Listen on ``port``, fork ``workers`` - 1 more processes, and serve in each."""
    sock = socket.create_server(("127.0.0.1", port), backlog=2048)
    for _ in range(workers - 1):
        if os.fork() == 0:  # a child serves on the same socket, and ends with its parent
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            break
    serve = serve_asgi if kind == "asgi" else serve_raw
    serve(sock, _Fetch(upstream_port, path))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
         int(sys.argv[5]) if len(sys.argv) > 5 else 1)
