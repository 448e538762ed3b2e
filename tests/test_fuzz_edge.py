"""Random requests at the whole ASGI app: whatever the bytes, never a 500.

The app is the real one (``create_app`` on the demo's config), started through its
ASGI lifespan and called in-process with raw ASGI messages, so hypothesis can send what
no HTTP client would: odd bytes in header values, any method, any path. The upstream is
a bound socket that never answers, so allowed requests end in the 502 page — an
answer, not a crash.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message

from gateway.app import create_app
from gateway.demo.stack import prepare
from tests.conftest import bound_socket, port_of, seed_demo_keys

HEADER_BYTES = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\x00"))  # what an HTTP parser lets through
PATHS = st.one_of(
    st.sampled_from([b"/", b"/issues/2023-03/pages/14", b"/public/about", b"/saml/login",
                     b"/saml/acs", b"/auth/check", b"/_gateway/admin", b"/_gateway/register",
                     b"/members/M1001/notes", b"/.well-known/jwks.json", b"/healthz",
                     b"/_gateway/replay/x", b"/saml/sls", b"/saml/logout"]),
    st.binary(min_size=1, max_size=60).map(lambda b: b"/" + b.replace(b"?", b"")),
)
HEADER_NAMES = st.sampled_from([b"accept", b"cookie", b"origin", b"sec-fetch-mode",
                                b"sec-fetch-site", b"content-type", b"x-original-uri",
                                b"x-forwarded-method", b"x-member-id", b"connection",
                                b"x-request-id", b"content-length", b"user-agent"])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("fuzz")
    dead = bound_socket()
    seed_demo_keys(workdir)
    demo = prepare(workdir, gateway_url="http://127.0.0.1:8000",
                   idp_url="http://127.0.0.1:8001",
                   reader_url=f"http://127.0.0.1:{port_of(dead)}",
                   extra_config="\n[limits]\nlogins = 1000000\nregistrations = 1000000\n")
    loop = asyncio.new_event_loop()
    app = create_app(demo.settings)
    lifespan = Lifespan(app)
    loop.run_until_complete(lifespan.start())
    yield app, loop
    loop.run_until_complete(lifespan.stop())
    loop.close()
    dead.close()


class Lifespan:
    """Runs an ASGI app's lifespan as a server does: startup before the first request,
    shutdown after the last."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        answer = await self._outbox.get()
        assert answer["type"] == "lifespan.startup.complete", answer

    async def stop(self) -> None:
        await self._inbox.put({"type": "lifespan.shutdown"})
        answer = await self._outbox.get()
        assert answer["type"] == "lifespan.shutdown.complete", answer
        assert self._task is not None
        await self._task


async def _call(app: ASGIApp, method: str, path: bytes, query: bytes,
                headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path.decode("latin-1"),
             "raw_path": path, "query_string": query, "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"), *headers],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return int(starts[0]["status"])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]),
       path=PATHS, query=st.binary(max_size=30).map(lambda b: b.replace(b"#", b"")),
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_BYTES), max_size=6),
       body=st.binary(max_size=200))
def test_no_request_gets_a_500(gateway: Any, method: str, path: bytes, query: bytes,
                               headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    app, loop = gateway
    status = loop.run_until_complete(_call(app, method, path, query, headers, body))
    assert 200 <= status < 600 and status != 500, (method, path, headers)

