"""A tiny HTTP client for the self-test, on ``http.client``: raw paths and a cookie jar.

Why not httpx (a test dependency only) or urllib: both normalise what they send (dot
segments, ``//``), and the self-test must send ``/a/%2e%2e/x`` byte for byte. Each
``Browser`` keeps its own cookies per host (what a fresh browser profile would hold:
enough for the login binding cookie and the session cookie; no path or expiry rules
beyond ``Max-Age=0`` removing a cookie). One connection per request, no redirects
followed: every hop is looked at by the case that made it.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

TIMEOUT = 15.0
MAX_HEAD = 64 * 1024  # bytes of an answer's head that ``exchange`` reads


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def set_cookies(self) -> list[tuple[str, str]]:
        """``(name, value)`` of every ``Set-Cookie`` in the answer."""
        cookies = []
        for key, value in self.headers:
            if key.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                cookies.append((name.strip(), rest.split(";", 1)[0].strip()))
        return cookies

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class Target:
    """The gateway under test: its base URL and how to trust its certificate."""

    url: str
    ca_file: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {self.url!r}")

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    def context(self) -> ssl.SSLContext:
        """The TLS context for an https gateway, as ``--ca-file``/``--insecure`` say."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        if parts.scheme == "http":
            return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=TIMEOUT,
                                           context=self.context())

    def exchange(self, head: bytes) -> tuple[int | None, str]:
        """Send a raw request ``head`` (the whole of it, CRLFs included) and read only the
        answer's status line: ``(status, what happened)``, status ``None`` when no answer
        came. For requests a well-behaved client library will not send (oversized or
        duplicated headers, upgrades): the server may answer and close before all is
        sent, so a failed send still reads what arrived."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        raw = socket.create_connection((parts.hostname or "", port), timeout=TIMEOUT)
        conn: socket.socket = raw
        try:
            if parts.scheme == "https":
                conn = self.context().wrap_socket(raw, server_hostname=parts.hostname)
            sent_all = True
            try:
                view = memoryview(head)
                while view:
                    sent = conn.send(view[:65536])
                    view = view[sent:]
            except OSError:
                sent_all = False  # answered (or dropped) before the whole head was read
            received = b""
            try:
                while b"\r\n\r\n" not in received and len(received) < MAX_HEAD:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    received += chunk
            except OSError as exc:
                if not received:
                    how = "before it was all sent" if not sent_all else "after it was sent"
                    return None, f"connection dropped {how}, no answer ({exc})"
        finally:
            conn.close()
        line = received.split(b"\r\n", 1)[0].decode("latin-1")
        fields = line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            return None, f"no HTTP answer ({line[:60]!r})" if line else "closed without answer"
        return int(fields[1]), line


@dataclass
class Browser:
    """One visitor: a cookie jar for the gateway's host, fresh for every case."""

    target: Target
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, raw_target: str,
                headers: list[tuple[str, str]] | None = None,
                body: bytes | None = None, *, send_cookies: bool = True) -> Answer:
        """Send ``raw_target`` (path and query) exactly as given."""
        conn = self.target.connection()
        try:
            conn.putrequest(method, raw_target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.target.netloc)
            conn.putheader("User-Agent", "sso-gateway-selftest")
            if send_cookies and self.cookies:
                conn.putheader("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
            for name, value in headers or []:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            answer = Answer(response.status, response.getheaders(), response.read())
        finally:
            conn.close()
        for name, value in answer.set_cookies():
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return answer

    def get(self, raw_target: str, headers: list[tuple[str, str]] | None = None) -> Answer:
        return self.request("GET", raw_target, headers)

    def post_form(self, raw_target: str, fields: dict[str, str],
                  headers: list[tuple[str, str]] | None = None) -> Answer:
        body = urlencode(fields).encode("ascii")
        return self.request("POST", raw_target,
                            [("Content-Type", "application/x-www-form-urlencoded"),
                             *(headers or [])], body)
