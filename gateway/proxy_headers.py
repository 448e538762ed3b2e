"""Header rules of the proxy, compiled once and applied per request.

Request side: ``HeadReader.read`` goes over a request's headers once and gives a
``RequestHead``: what the hot path decides on (Host, Accept, the session cookie,
``Sec-Fetch-*``, Origin, Content-Type) and what the proxy sends upstream. Hop-by-hop
headers, those named in ``Connection``, and every header that could carry a spoofed
identity or forwarding chain are dropped (names compared after lower-casing and
``_`` → ``-``, because many upstream frameworks read ``X_Member_Id`` as ``X-Member-Id``);
the gateway's own cookies are cut out of ``Cookie``; the body's framing
(Content-Length / Transfer-Encoding) is checked.

Response side: hop-by-hop headers go, and gated responses are made private to the
member (``Cache-Control``, ``Vary: Cookie``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.errors import BadRequest, BodyTooLarge, ClientError

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Upstream response headers not relayed besides the hop-by-hop ones: the ASGI server
# (uvicorn) writes its own Date and Server, and both are single-valued (nginx hides the
# upstream's too).
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
PRIVATE_NO_STORE = (b"cache-control", b"private, no-store")
VARY_COOKIE = (b"vary", b"Cookie")
# Client headers never forwarded besides the hop-by-hop ones: the upstream gets its own
# Host from the URL; forwarding chains are rebuilt by the gateway (uvicorn applies
# trusted_proxies to the client address); Expect was answered on the client's hop.
ALWAYS_DROP = HOP_BY_HOP | {b"host", b"forwarded", b"x-real-ip", b"expect"}
DROP_PREFIXES = (b"x-member-", b"x-gateway-", b"x-forwarded-")

Headers = Iterable[tuple[bytes, bytes]]
_NAMES_KEPT = 512
# The request headers the hot path decides on (read before the drop rules apply).
_DECIDE = frozenset({b"cookie", b"host", b"accept", b"sec-fetch-mode", b"sec-fetch-site",
                     b"origin", b"content-type"})


@dataclass(slots=True)
class RequestHead:
    """One request's headers, read in one pass by ``HeadReader.read``; treat as read-only.

    ``upstream`` holds the client's headers the proxy may forward, already as ``str``
    pairs for the upstream client (see ``header_text``). ``refused`` is the framing
    problem that forbids forwarding the request (raised by ``Proxy.forward``, so the
    policy's answer, e.g. a sign-in redirect, still comes first).
    """

    host: bytes
    accept: str
    session: str | None  # the session cookie's value (the first one), if sent
    fetch_mode: bytes
    fetch_site: bytes
    origin: bytes
    content_type: bytes
    upstream: list[tuple[str, str]]
    has_body: bool
    refused: ClientError | None


class HeadReader:
    """The request-header rules of one gateway, compiled once.

    ``strip_headers`` names the headers only the gateway may set upstream (identity
    headers, the token, ``X-Request-Id``) besides the families always dropped;
    ``strip_cookies`` / ``strip_cookie_prefixes`` the gateway's own cookies, which
    upstreams never see; ``session_value`` reads the session cookie from one ``Cookie``
    header (``Cookies.session_value``).
    """

    __slots__ = ("_cookie_prefixes", "_cookies", "_drop", "_max_body", "_names", "_not_hop",
                 "_session_value")

    def __init__(self, *, strip_headers: Iterable[str], max_body_bytes: int,
                 strip_cookies: Iterable[str] = (), strip_cookie_prefixes: Iterable[str] = (),
                 session_value: Callable[[bytes], str | None] | None = None) -> None:
        self._drop = ALWAYS_DROP | {norm(n.encode("latin-1")) for n in strip_headers}
        # Names a client's ``Connection`` header cannot make hop-by-hop: those dropped
        # anyway, and Content-Length, which frames the body we stream (ours to keep).
        self._not_hop = self._drop | {b"close", b"content-length", b""}
        # Header name → the name forwarded upstream, or "" (dropped): the same few dozen
        # names come with every request, so each is judged once (bounded: clients choose).
        self._names: dict[bytes, str] = {}
        self._cookies = tuple(n.encode("latin-1") for n in strip_cookies)
        self._cookie_prefixes = tuple(n.encode("latin-1") for n in strip_cookie_prefixes)
        self._max_body = max_body_bytes
        self._session_value = session_value

    def read(self, headers: Headers) -> RequestHead:
        """Everything the hot path and the proxy need from ``headers``, in one pass."""
        names, cookies, prefixes = self._names, self._cookies, self._cookie_prefixes
        session_value = self._session_value
        host = accept = fetch_mode = fetch_site = origin = content_type = b""
        session: str | None = None
        out: list[tuple[str, str]] = []
        connection: list[bytes] = []
        length: bytes | None = None
        chunked: bytes | None = None
        refused: ClientError | None = None
        for name, value in headers:
            if name in _DECIDE:  # one lookup for the many headers that are not these
                if name == b"cookie":
                    if session is None and session_value is not None:
                        session = session_value(value)
                    if cookies or prefixes:
                        value = strip_cookies(value, cookies, prefixes)
                        if not value:
                            continue
                elif name == b"host":
                    if not host:  # the first one, if a client sends two
                        host = value
                    continue  # the upstream gets its own
                elif name == b"accept":
                    accept = value
                elif name == b"sec-fetch-mode":
                    fetch_mode = value
                elif name == b"sec-fetch-site":
                    fetch_site = value
                elif name == b"origin":
                    origin = value
                else:
                    content_type = value
            forward = names.get(name)
            if forward is None:
                forward = self._judge(name)
            if not forward:
                if name == b"connection":
                    connection.append(value)
                elif name == b"transfer-encoding":
                    if chunked is not None and refused is None:
                        refused = BadRequest("more than one Transfer-Encoding header")
                    chunked = value
                continue
            if name == b"content-length":
                if length is not None:
                    if value != length and refused is None:
                        refused = BadRequest("conflicting Content-Length headers")
                    continue
                length = value
            out.append((forward, header_text(value)))
        if connection:
            named = {t.strip().lower() for v in connection for t in v.split(b",")}
            named -= self._not_hop
            if named:
                hop = {n.decode("latin-1") for n in named}
                out = [h for h in out if h[0] not in hop]
        has_body, problem = self._framing(length, chunked)
        return RequestHead(host, accept.decode("latin-1"), session, fetch_mode, fetch_site,
                           origin, content_type, out, has_body, refused or problem)

    def _judge(self, name: bytes) -> str:
        """The name to forward a header under, or "" when it is dropped (names compared
        after ``_`` → ``-``: ASGI servers hand them over lower-cased)."""
        key = name.replace(b"_", b"-")
        forward = "" if key in self._drop or key.startswith(DROP_PREFIXES) else name.decode(
            "latin-1")
        if len(self._names) < _NAMES_KEPT and len(name) <= 64:
            self._names[name] = forward
        return forward

    def _framing(self, length: bytes | None, chunked: bytes | None,
                 ) -> tuple[bool, ClientError | None]:
        """Whether the request has a body, and why it must be refused, if it must."""
        if chunked is not None:
            if length is not None:
                return True, BadRequest("both Content-Length and Transfer-Encoding")
            if chunked.strip().lower() != b"chunked":
                return True, BadRequest(f"unsupported Transfer-Encoding {chunked!r}")
            return True, None
        if length is None:
            return False, None
        if not length.isdigit():
            return False, BadRequest(f"invalid Content-Length {length!r}")
        size = int(length)
        if size > self._max_body:
            return True, BodyTooLarge(f"Content-Length {size} over {self._max_body} bytes")
        return size > 0, None


def header_text(value: bytes) -> str:
    """A header value as the upstream client (aiohttp) wants it: the one conversion.

    aiohttp accepts only ``str`` names and values (its header serialiser raises
    ``TypeError`` for bytes) and writes them UTF-8-encoded, so UTF-8 round-trips byte
    for byte; anything else (rare obs-text) falls back to Latin-1.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def response_headers(raw: Sequence[tuple[bytes, bytes]], gated: bool
                      ) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """Upstream headers to relay (lower-cased for ASGI), and the body length if known."""
    out: list[tuple[bytes, bytes]] = []
    connection: list[bytes] = []
    cache: list[bytes] = []
    vary: list[bytes] = []
    length: int | None = None
    for raw_name, value in raw:
        name = raw_name.lower()
        if name in RESPONSE_DROP:
            if name == b"connection":
                connection.append(value)
            continue
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif gated:
            if name == b"cache-control":
                cache.append(value)
                continue
            if name == b"vary":
                vary.append(value)
                continue
        out.append((name, value))
    if connection:
        named = {t.strip().lower() for v in connection for t in v.split(b",")}
        named -= HOP_BY_HOP | {b"close", b""}
        if named:
            out = [h for h in out if h[0] not in named]
    if gated:
        out.append((b"cache-control", _private_cache_control(cache))
                   if cache else PRIVATE_NO_STORE)
        out.append((b"vary", _vary_with_cookie(vary)) if vary else VARY_COOKIE)
    return out, length


def _private_cache_control(values: list[bytes]) -> bytes:
    """``private, no-store`` unless the upstream already said ``no-store``.

    Then the upstream's directives stay (its ``max-age=0``, ``must-revalidate``…), except
    that ``public`` goes and a bare ``private`` is ensured.
    """
    directives = _split_directives(b", ".join(values))
    names = [d.split(b"=", 1)[0].strip().lower() for d in directives]
    if b"no-store" not in names:
        return PRIVATE_NO_STORE[1]
    kept = [d for d, n in zip(directives, names, strict=True) if n not in (b"public", b"private")]
    kept.append(b"private")
    return b", ".join(kept)


def _split_directives(value: bytes) -> list[bytes]:
    """Split a Cache-Control value on commas that are not inside a quoted string."""
    if b'"' not in value:
        parts = value.split(b",")
    else:
        parts, start, quoted, i = [], 0, False, 0
        while i < len(value):
            c = value[i]
            if c == 0x5C and quoted:  # backslash escape inside quotes
                i += 1
            elif c == 0x22:
                quoted = not quoted
            elif c == 0x2C and not quoted:
                parts.append(value[start:i])
                start = i + 1
            i += 1
        parts.append(value[start:])
    return [p.strip() for p in parts if p.strip()]


def _vary_with_cookie(values: list[bytes]) -> bytes:
    tokens = [t.strip() for v in values for t in v.split(b",") if t.strip()]
    lowered = {t.lower() for t in tokens}
    if b"*" in lowered:
        return b"*"
    if b"cookie" not in lowered:
        tokens.append(b"Cookie")
    return b", ".join(tokens)


def strip_cookies(value: bytes, names: tuple[bytes, ...],
                  prefixes: tuple[bytes, ...] = ()) -> bytes:
    """``value`` without the named cookies (and those whose name starts with one of
    ``prefixes``); the others kept byte for byte."""
    for name in (*names, *prefixes):
        if name in value:
            break
    else:
        return value  # the common case: no gateway cookie in this header
    kept = []
    for part in value.split(b";"):
        name = part.split(b"=", 1)[0].strip()
        if name not in names and not name.startswith(prefixes):
            kept.append(part)
    return b";".join(kept).strip()


def norm(name: bytes) -> bytes:
    """A header name as the drop rules compare it: lower-case, ``_`` read as ``-``."""
    return name.lower().replace(b"_", b"-")
