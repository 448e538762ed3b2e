"""WebSocket proxying: an upgrade the rules allow is relayed to its upstream.

An upgrade takes the steps of an HTTP request on the hot path (``WebSocketGate``): one
Host, one of this gateway's; the canonical path (the gateway's own paths take no
WebSocket: 501); the Origin, which must be ``public_url`` (Cross-Site WebSocket
Hijacking: a page on another site would ride on the member's cookie); the session, the
route (``Proxy.route``) and the policy's decision; an upgrade without Origin to a gated
path (no browser sends one; ``[websocket] require_origin``). The upstream then gets the
upgrade request with the same headers, identity headers and identity token as an HTTP
request, and the same spoofed headers stripped (``Proxy.open_websocket``).

A refusal before the handshake is an ordinary HTTP answer, sent through the server's
denial-response extension (``websocket.http.response``; a server without it answers
403): 401 without a session (never a redirect: a WebSocket cannot follow one), 403 (the
rules, another Origin, no Origin), 404 (no upstream), 400 (Host, path), 503 (the store,
``max_connections``), 502/504 (upstream unreachable or silent; its own 4xx is passed on).

Once both sides are open, text and binary messages are relayed as they come, each way
limited to ``max_message_bytes`` (a larger one closes with 1009). Close codes are relayed
each way. Both sides are pinged every ``ping_interval`` seconds (the server pings the
client; the upstream client pings the upstream), so a peer that vanished is noticed.

One watcher task per process runs every ``session_check_interval`` seconds over all
open connections: a connection with no message either way for ``idle_timeout``
closes with 1001, and the session of every connection opened with one is resolved again
through ``SessionManager.resolve`` (batched, one lookup per session, not per message); a
session that was revoked, signed out, ended by Single Logout or expired closes its
connections with 4401. While the store does not answer, connections stay open for
``STORE_GRACE`` seconds, then close with 1011.

Each connection writes one ``gateway.access`` line when it ends (or is refused): path,
status, upstream, session tag, duration, bytes each way, close code and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send

from gateway.answers import decision_answer, exception_answer
from gateway.config import Settings
from gateway.errors import (
    AmbiguousPath,
    GatewayError,
    StoreError,
    UpgradeRefused,
    UpstreamError,
)
from gateway.identity import UpstreamIdentity
from gateway.logs import current_request_id, session_hash
from gateway.paths import request_target
from gateway.policy import Policy
from gateway.proxy import WS_CLOSE_TIMEOUT, Proxy, Route, SocketClosed, UpstreamSocket
from gateway.proxy_headers import RequestHead
from gateway.sessions import SessionManager, SessionRecord
from gateway.telemetry import Telemetry
from gateway.web import Answer, error_answer, new_reference

log = logging.getLogger("gateway.websocket")
access_log = logging.getLogger("gateway.access")

#: Close codes the gateway itself sends to the client.
IDLE = 1001  # going away: no message either way for idle_timeout
TOO_LARGE = 1009  # a message over max_message_bytes, from either side
SESSION_ENDED = 4401  # the session was revoked, signed out, ended by SLO or expired
STORE_DOWN = 1011  # the session could not be checked for STORE_GRACE seconds
UPSTREAM_GONE = 1014  # bad gateway: the upstream's connection dropped without a close
RESTART = 1012  # service restart: the gateway stops, or a reload retired its configuration
#: Seconds a connection stays open while its session cannot be checked (store down).
STORE_GRACE = 30.0
#: Sessions resolved at once by the watcher.
CHECK_BATCH = 32


class _Open:
    """One proxied connection, as the watcher sees it."""

    __slots__ = ("checked", "cookie", "ended", "last_active")

    def __init__(self, cookie: str | None) -> None:
        now = time.monotonic()
        self.cookie = cookie  # the session cookie it was opened with, if it had a session
        self.last_active = now  # of the last message, either way
        self.checked = now  # when its session was last found live
        self.ended: asyncio.Future[tuple[int, str, str]] = (
            asyncio.get_running_loop().create_future())

    def end(self, code: int, why: str, reason: str = "") -> None:
        """Ask for the connection to close with ``code`` (the first ask wins)."""
        if not self.ended.done():
            self.ended.set_result((code, why, reason))


@dataclass(slots=True)
class _Admitted:
    """An upgrade the gateway lets through: where it goes, and as whom."""

    path: str
    target: str
    route: Route
    record: SessionRecord | None


class WebSocketGate:
    """WebSocket upgrades on proxied paths: the checks, the upstream, the relay.

    ``own`` tells the gateway's own paths (they take no WebSocket); ``sign_in_url`` names
    the sign-in page in a 401. The other arguments are the hot path's components.
    """

    def __init__(self, *, settings: Settings, sessions: SessionManager, policy: Policy,
                 proxy: Proxy, upstream_identity: UpstreamIdentity, telemetry: Telemetry,
                 session_value: Callable[[bytes], str | None], own: Callable[[str], bool],
                 sign_in_url: Callable[[str], str]) -> None:
        self._config = settings.websocket
        self._sessions = sessions
        self._policy = policy
        self._proxy = proxy
        self._identity = upstream_identity
        self._telemetry = telemetry
        self._metrics = telemetry.metrics
        self._own = own
        self._sign_in_url = sign_in_url
        self._reader = proxy.head_reader(session_value)
        self._hosts = frozenset(h.encode("latin-1") for h in settings.hosts)
        self._origin = settings.public_url.lower().encode("latin-1")
        self._open: set[_Open] = set()
        self._watcher: asyncio.Task[None] | None = None
        proxy.before_close(self.close_all)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left already
        started = time.monotonic()
        # The ASGI server may pass names as the client wrote them: one spelling for the
        # checks below and the header rules.
        headers = [(name.lower(), value) for name, value in scope["headers"]]
        scope = {**scope, "headers": headers}
        self._telemetry.begin(scope, send)  # the request ID of the log lines
        head = self._reader.read(headers)
        admitted = await self._admit(scope, head)
        if not isinstance(admitted, _Admitted):
            await _deny(scope, send, admitted)
            _access(scope, started, status=admitted[0])
            return
        if len(self._open) >= self._config.max_connections:
            log.warning("refused WebSocket path=%s: %d connections open in this process "
                        "([websocket] max_connections)", admitted.path, len(self._open))
            await _deny(scope, send, error_answer(
                503, "Too many connections", "Please try again in a moment.",
                accept=head.accept))
            _access(scope, started, status=503, path=admitted.path)
            return
        conn = _Open(head.session if admitted.record is not None else None)
        self._open.add(conn)  # counted while the upstream handshake runs, too
        try:
            await self._proxy_connection(scope, receive, send, head, admitted, conn, started)
        finally:
            self._open.discard(conn)

    async def close_all(self) -> None:
        """End every open connection with 1012 (service restart: this gateway stops, at
        shutdown or when a reload retires its configuration), and wait a little for them
        to close."""
        for conn in list(self._open):
            conn.end(RESTART, "shutdown", "gateway restarting")
        deadline = time.monotonic() + WS_CLOSE_TIMEOUT + 1.0
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- before the handshake -----------------------------------------------------------

    async def _admit(self, scope: Scope, head: RequestHead) -> _Admitted | Answer:
        """The upgrade's checks, in the hot path's order: the admitted upgrade, or the
        answer that refuses it (each refusal logs its reason)."""
        headers = scope["headers"]
        hosts = sum(1 for name, _ in headers if name == b"host")
        if hosts != 1 or head.host.lower() not in self._hosts:
            log.warning("refused WebSocket: Host %r (%d Host headers)", head.host, hosts)
            return error_answer(400, "Unknown site",
                                "This gateway does not serve that host name.",
                                accept=head.accept)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).partition(b"?")[0]
        try:
            path, target = request_target(raw_path, scope.get("query_string", b""))
        except AmbiguousPath as exc:
            ref = new_reference()
            log.warning("refused WebSocket path ref=%s reason=%s", ref, exc.reason)
            return exception_answer(exc, accept=head.accept, reference=ref)
        if self._own(path):
            log.warning("refused WebSocket upgrade path=%s: the gateway's own", path[:200])
            return _not_here(head.accept)
        if head.origin and head.origin.lower() != self._origin:
            # Cross-Site WebSocket Hijacking: a page elsewhere opening a socket with the
            # member's cookie. Refused on every path, before the store is asked.
            log.warning("refused cross-origin WebSocket path=%s origin=%r", path, head.origin)
            return error_answer(403, "Access denied", "This connection came from another site.",
                                accept=head.accept)
        try:
            record = await self._sessions.resolve(head.session)
        except StoreError as exc:
            ref = new_reference()
            log.error("StoreError ref=%s reason=%s (WebSocket upgrade)", ref, exc.reason)
            self._telemetry.failed(exc)
            return exception_answer(exc, accept=head.accept, reference=ref)
        route = self._proxy.route(path)
        decision = self._policy.decide(path, record.principal if record else None,
                                       upstream=route.name if route is not None else None)
        if decision.kind == "deny" and record is not None:
            self._telemetry.denied(record, decision, path)
        answer = decision_answer(decision, record, target=target, accept=head.accept,
                                 navigation=False, sign_in_url=self._sign_in_url)
        if answer is not None:
            if decision.kind != "deny":
                log.info("refused WebSocket path=%s: %s needed", path, decision.kind)
            return answer
        if decision.gated and not head.origin and self._config.require_origin:
            log.warning("refused WebSocket path=%s: no Origin on a gated path "
                        "([websocket] require_origin)", path)
            return error_answer(403, "Access denied", "This connection did not say where it "
                                "came from.", accept=head.accept)
        if route is None:
            return error_answer(404, "Not found", "There is nothing at this address.",
                                accept=head.accept)
        return _Admitted(path, target, route, record)

    # -- the connection -----------------------------------------------------------------

    async def _proxy_connection(self, scope: Scope, receive: Receive, send: Send,
                                head: RequestHead, admitted: _Admitted, conn: _Open,
                                started: float) -> None:
        route, record = admitted.route, admitted.record
        request_id = self._telemetry.proxying(route.name, record, admitted.path)
        extra = ([*self._identity.headers(record.key, record.principal, route.name),
                  request_id] if record is not None else [request_id])
        fields: dict[str, object] = {"path": admitted.path, "upstream": route.name}
        if record is not None:
            fields["session"] = session_hash(record.key)
        try:
            upstream = await self._proxy.open_websocket(
                scope, head, route=route, target=admitted.target, add_headers=extra,
                max_message_bytes=self._config.max_message_bytes,
                heartbeat=self._config.ping_interval or None)
        except GatewayError as exc:
            await _deny(scope, send, self._refusal(exc, route.name, head.accept))
            status = (exc.upstream_status if isinstance(exc, UpgradeRefused)
                      and 400 <= exc.upstream_status < 500 else exc.status)
            _access(scope, started, status=status, **fields)
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        except OSError:  # the client left during the upstream handshake
            await upstream.close(1001)
            return
        self._metrics.websockets_open.inc()
        conn.last_active = time.monotonic()  # the idle clock starts now, not at the upgrade
        self._watch(conn)
        counts = [0, 0]  # bytes from the client, bytes from the upstream
        why = "client"
        try:
            code, why, reason = await self._relay(conn, receive, send, upstream, counts)
        finally:
            self._metrics.websocket_closed(why)
        _access(scope, started, status=101, close_code=code, closed_by=why,
                close_reason=reason, bytes_in=counts[0], bytes_out=counts[1], **fields)

    def _refusal(self, exc: GatewayError, upstream: str, accept: str) -> Answer:
        ref = new_reference()
        passed_on = isinstance(exc, UpgradeRefused) and 400 <= exc.upstream_status < 500
        # The upstream's own 4xx is its answer, not a failure of the gateway.
        log.log(logging.WARNING if passed_on else logging.ERROR,
                "%s ref=%s reason=%s upstream=%s (WebSocket upgrade)", type(exc).__name__,
                ref, exc.reason, upstream)
        if isinstance(exc, UpgradeRefused) and passed_on:
            return error_answer(exc.upstream_status, exc.title, exc.public_message,
                                accept=accept, reference=ref)
        if isinstance(exc, UpstreamError):
            self._telemetry.failed(exc)
        return exception_answer(exc, accept=accept, reference=ref)

    async def _relay(self, conn: _Open, receive: Receive, send: Send,
                     upstream: UpstreamSocket, counts: list[int]) -> tuple[int, str, str]:
        """Relay messages both ways until one side ends or the gateway ends the
        connection; close the other side(s). Returns (close code, why, reason)."""
        tasks = (asyncio.create_task(self._from_client(conn, receive, upstream, counts)),
                 asyncio.create_task(self._from_upstream(conn, send, upstream, counts)))
        try:
            code, why, reason = await conn.ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if why == "client":
            # The client closed (or vanished: 1005/1006, or the server's 1012 at shutdown).
            if code in (1009, 1012):  # the server's own message limit, or its shutdown
                why = "too_large" if code == 1009 else "shutdown"
            # No status (1005) is a normal close; a vanished client (1006) went away.
            await upstream.close(code if _sendable(code) else 1000 if code == 1005 else 1001,
                                 reason)
            return code, why, reason
        if why == "upstream":
            client_code = code if _sendable(code) else UPSTREAM_GONE if code == 1006 else 1000
        else:  # the gateway ends it: idle, too large, session ended, store down
            client_code = code
        with contextlib.suppress(OSError):  # the client may be gone already
            await send({"type": "websocket.close", "code": client_code,
                        "reason": _reason(reason)})
        await upstream.close(1009 if why == "too_large" else 1001)
        return client_code, why, reason

    async def _from_client(self, conn: _Open, receive: Receive, upstream: UpstreamSocket,
                           counts: list[int]) -> None:
        limit = self._config.max_message_bytes
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                conn.end(message.get("code", 1005), "client", message.get("reason") or "")
                return
            if message["type"] != "websocket.receive":
                continue
            data: str | bytes | None = message.get("bytes")
            if data is None:
                data = message.get("text") or ""
            size = _size(data)
            if size > limit:
                log.warning("closed WebSocket: a client message over %d bytes", limit)
                conn.end(TOO_LARGE, "too_large", "message too large")
                return
            conn.last_active = time.monotonic()
            counts[0] += size
            try:
                await upstream.send(data)
            except ConnectionError:
                conn.end(1006, "upstream")
                return

    async def _from_upstream(self, conn: _Open, send: Send, upstream: UpstreamSocket,
                             counts: list[int]) -> None:
        while True:
            message = await upstream.receive()
            if isinstance(message, SocketClosed):
                if message.too_large:
                    log.warning("closed WebSocket: an upstream message over %d bytes",
                                self._config.max_message_bytes)
                    conn.end(TOO_LARGE, "too_large", "message too large")
                else:
                    conn.end(message.code, "upstream", message.reason)
                return
            conn.last_active = time.monotonic()
            counts[1] += _size(message)
            try:
                if isinstance(message, str):
                    await send({"type": "websocket.send", "text": message})
                else:
                    await send({"type": "websocket.send", "bytes": message})
            except OSError:
                conn.end(1006, "client")
                return

    # -- the watcher ----------------------------------------------------------------------

    def _watch(self, conn: _Open) -> None:
        """Make sure the watcher runs while ``conn`` is open."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_all())

    async def _watch_all(self) -> None:
        """Every ``session_check_interval`` seconds, while connections are open: close the
        idle ones, and those whose session ended. Runs once per process (per gateway)."""
        interval = self._config.session_check_interval
        try:
            while self._open:
                await asyncio.sleep(interval)
                try:
                    await self._check_all()
                except Exception:  # the next round may work; never stop watching
                    log.exception("WebSocket session check failed")
        finally:
            self._watcher = None

    async def _check_all(self) -> None:
        now = time.monotonic()
        idle = self._config.idle_timeout
        by_cookie: dict[str, list[_Open]] = {}
        for conn in list(self._open):
            if now - conn.last_active >= idle:
                conn.end(IDLE, "idle", "idle")
            elif conn.cookie is not None:
                by_cookie.setdefault(conn.cookie, []).append(conn)
        cookies = list(by_cookie)
        for start in range(0, len(cookies), CHECK_BATCH):
            batch = cookies[start:start + CHECK_BATCH]
            for cookie, live in zip(batch, await asyncio.gather(*map(self._live, batch)),
                                    strict=True):
                for conn in by_cookie[cookie]:
                    if live:
                        conn.checked = now
                    elif live is not None:
                        conn.end(SESSION_ENDED, "session_ended", "session ended")
                    elif now - conn.checked >= STORE_GRACE:
                        conn.end(STORE_DOWN, "store", "session could not be checked")

    async def _live(self, cookie: str) -> bool | None:
        """Whether the session of ``cookie`` is live; ``None`` if the store cannot say."""
        try:
            return await self._sessions.resolve(cookie) is not None
        except StoreError as exc:
            log.warning("WebSocket session check: store failed: %s", exc.reason)
            return None


async def refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse a WebSocket upgrade with a plain 501 (``[websocket] enabled = false``).

    The server's denial-response extension (``websocket.http.response``, offered by
    uvicorn's WebSocket implementations) sends the 501 as an ordinary HTTP answer; a
    server without it gets ``websocket.close`` before the handshake, which it answers with
    a 403. Either way the handshake is finished on purpose, never left half done."""
    accept = next((v.decode("latin-1") for n, v in scope["headers"]
                   if n.lower() == b"accept"), "")
    log.warning("refused WebSocket upgrade path=%s: WebSockets are off",
                scope.get("path", "")[:200])
    if (await receive())["type"] != "websocket.connect":  # the client left already
        return
    await _deny(scope, send, _not_here(accept))


def _not_here(accept: str) -> Answer:
    return error_answer(501, "Not implemented",
                        "This address does not accept WebSocket connections.", accept=accept)


async def _deny(scope: Scope, send: Send, answer: Answer) -> None:
    """Send ``answer`` instead of the handshake (the denial-response extension), or
    ``websocket.close`` (the server answers 403) where the server does not offer it."""
    status, headers, body = answer
    request_id = current_request_id()
    extra = [(b"x-request-id", request_id.encode("ascii"))] if request_id else []
    with contextlib.suppress(OSError):  # the client left
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [*headers, *extra,
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})


def _access(scope: Scope, started: float, *, status: int, **fields: object) -> None:
    """The connection's ``gateway.access`` line."""
    line: dict[str, object] = {"method": "GET", "websocket": True,
                               "path": fields.pop("path", scope["path"][:512]),
                               "status": status,
                               "duration_ms": round((time.monotonic() - started) * 1000, 2)}
    line.update(fields)
    access_log.info("websocket", extra={"fields": line, "request_id": current_request_id()})


def _size(data: str | bytes) -> int:
    """Bytes of a message on the wire (text as UTF-8)."""
    return len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))


def _sendable(code: int) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455 section 7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _reason(reason: str) -> str:
    """A close reason that fits a close frame: at most 123 bytes of UTF-8."""
    return reason.encode()[:123].decode("utf-8", "ignore")
