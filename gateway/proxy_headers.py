"""Header rules of the proxy, compiled once and applied per request.

Request side: ``HeadReader.read`` goes over a request's headers once and gives a
``RequestHead``: what the hot path decides on (Host, Accept, the session cookie,
``Sec-Fetch-*``, Origin, Content-Type) and what the proxy sends upstream. Hop-by-hop
headers, those named in ``Connection``, and every header that could carry a spoofed
identity, client address, path or forwarding chain are dropped: the gateway's own
identity headers, the authentication headers other auth proxies set (``AUTH_HEADERS``,
``AUTH_PREFIXES``) and those the configuration adds. Names are compared after ``norm``
(lower case, every character but a letter or digit read as ``-``), because upstream
frameworks read ``X_Remote_User`` (and CGI-style servers ``X.Remote.User``) as
``X-Remote-User``. The gateway's own cookies are cut out of ``Cookie``; the body's
framing (Content-Length / Transfer-Encoding) is checked.

Response side (``ResponseRules``, one per upstream): hop-by-hop headers go; a
``Set-Cookie`` for one of the gateway's own cookie names is dropped; an absolute
``Location`` or ``Refresh`` URL on the upstream's own origin is rewritten to the public
URL (as nginx's ``proxy_redirect default``); gated responses are made private to the
member (``Cache-Control``, ``Vary: Cookie``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.errors import BadRequest, BodyTooLarge, ClientError

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Upstream response headers not relayed besides the hop-by-hop ones: the ASGI server
# writes its own Date (single-valued), and a Server header only tells an attacker what
# runs behind the gateway (the gateway's own server sends none either).
# X-Accel-*: orders to an nginx in front (an internal redirect, caching, a rate). Only the
# gateway speaks to a proxy in front; an upstream's would steer it past the gateway.
# (X-Accel-Buffering stays: it only lets an answer stream, e.g. server-sent events.)
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"x-accel-redirect", b"x-accel-expires",
                              b"x-accel-limit-rate", b"x-accel-charset"}
PRIVATE_NO_STORE = (b"cache-control", b"private, no-store")
VARY_COOKIE = (b"vary", b"Cookie")
# Client headers never forwarded besides the hop-by-hop ones: the upstream gets its own
# Host from the URL; forwarding chains are rebuilt by the gateway (uvicorn applies
# trusted_proxies to the client address); Expect was answered on the client's hop.
ALWAYS_DROP = HOP_BY_HOP | {b"host", b"forwarded", b"x-real-ip", b"expect"}
DROP_PREFIXES = (b"x-member-", b"x-gateway-", b"x-forwarded-")
# Headers an upstream may believe because an auth proxy, load balancer or TLS terminator
# in front of it would set them: who the user is (oauth2-proxy, Authelia, Authentik,
# Pomerium, Vouch, Kong, Shibboleth, mod_auth_mellon, mod_auth_openidc, Grafana/Gitea
# auth-proxy mode, Azure App Service, Google IAP, AWS ALB, Cloudflare Access), the
# client's certificate or address, or the "real" path and host (IIS, Symfony). Behind the
# gateway only the gateway speaks for the user: a client's copy never passes. In
# ``norm`` form; ``[proxy] strip_headers`` / ``strip_prefixes`` add to them.
AUTH_HEADERS = frozenset({
    b"auth-user", b"x-auth-user", b"x-auth-username", b"x-auth-userid", b"x-auth-email",
    b"x-auth-name", b"x-auth-groups", b"x-auth-roles", b"x-auth-subject",
    b"x-user", b"x-user-id", b"x-userid", b"x-username", b"x-user-name", b"x-user-email",
    b"x-user-groups", b"x-user-roles", b"x-email",
    b"oidc-access-token", b"oidc-id-token",
    b"x-client-cert", b"x-client-verify", b"x-client-dn", b"x-arr-clientcert",
    b"x-client-ip", b"true-client-ip", b"cf-connecting-ip", b"x-cluster-client-ip",
    b"fastly-client-ip", b"x-originating-ip",
    b"x-original-url", b"x-original-uri", b"x-rewrite-url", b"x-original-host", b"x-host",
})
AUTH_PREFIXES = (
    b"remote-", b"x-remote-", b"x-auth-request-", b"x-authenticated-", b"x-webauth-",
    b"x-authentik-", b"x-pomerium-", b"x-vouch-", b"x-consumer-", b"x-credential-",
    b"shib-", b"mellon-", b"oidc-claim-", b"x-ms-client-principal",
    b"x-goog-authenticated-user-", b"x-goog-iap-", b"x-amzn-oidc-", b"cf-access-",
    b"x-ssl-client-", b"ssl-client-",
)

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
    headers, the token, ``X-Request-Id``) and those the configuration adds, and
    ``strip_prefixes`` more name prefixes, besides the families always dropped;
    ``strip_cookies`` / ``strip_cookie_prefixes`` the gateway's own cookies, which
    upstreams never see; ``session_value`` reads the session cookie from one ``Cookie``
    header (``Cookies.session_value``).
    """

    __slots__ = ("_cookie_prefixes", "_cookies", "_drop", "_max_body", "_names", "_not_hop",
                 "_prefixes", "_session_value")

    def __init__(self, *, strip_headers: Iterable[str], max_body_bytes: int,
                 strip_prefixes: Iterable[str] = (),
                 strip_cookies: Iterable[str] = (), strip_cookie_prefixes: Iterable[str] = (),
                 session_value: Callable[[bytes], str | None] | None = None) -> None:
        self._drop = ALWAYS_DROP | AUTH_HEADERS | {norm(n.encode("latin-1"))
                                                   for n in strip_headers}
        self._prefixes = (*DROP_PREFIXES, *AUTH_PREFIXES,
                          *(norm(p.encode("latin-1")) for p in strip_prefixes))
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
        in ``norm`` form)."""
        key = norm(name)
        forward = "" if key in self._drop or key.startswith(self._prefixes) else name.decode(
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


class ResponseRules:
    """The response-header rules for one upstream, compiled once.

    ``own_cookies`` / ``own_cookie_prefixes`` are the gateway's cookie names (as set:
    ``__Host-``/``__Secure-`` prefixes included or not): a ``Set-Cookie`` whose name is
    one of them, compared in lower case with those prefixes removed (and a nameless
    ``=name=value`` read as ``name``), is dropped, so an upstream can neither overwrite
    nor shadow them. An absolute URL in ``Location`` or ``Refresh`` that starts with the
    upstream's URL (any case in scheme and host, the default port written or not) is
    rewritten to ``public_url``, path and query kept.
    """

    __slots__ = ("_bases", "_cookie_prefixes", "_cookies", "_name", "_public")

    def __init__(self, *, name: str, upstream_url: str, public_url: str,
                 own_cookies: Iterable[str] = (), own_cookie_prefixes: Iterable[str] = ()
                 ) -> None:
        self._name = name
        self._cookies = frozenset(_bare_cookie_name(n.encode("latin-1")) for n in own_cookies)
        self._cookie_prefixes = tuple(_bare_cookie_name(n.encode("latin-1"))
                                      for n in own_cookie_prefixes)
        self._public = public_url.rstrip("/").encode("latin-1")
        self._bases = _upstream_bases(upstream_url)

    def apply(self, raw: Sequence[tuple[bytes, bytes]], gated: bool,
              public_cache: bytes = b""
              ) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """Upstream headers to relay (lower-cased for ASGI), and the body length if known.
        ``public_cache``: the Cache-Control of a public rule, added to an answer that is not
        gated when the upstream set none."""
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
            if name in _REWRITTEN:
                if name == b"set-cookie":
                    own = self._own_cookie(value)
                    if own is not None:
                        log.warning("upstream %s tried to set a cookie of the gateway's own "
                                    "(%r): dropped", self._name, own[:64])
                        continue
                elif name == b"location":
                    value = self._rewrite(value)
                else:  # refresh: "5; url=…"
                    at = value.lower().find(b"url=")
                    if at >= 0:
                        value = value[:at + 4] + self._rewrite(value[at + 4:])
            elif name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif gated:
                if name == b"cache-control":
                    cache.append(value)
                    continue
                if name == b"vary":
                    vary.append(value)
                    continue
            elif name == b"cache-control":
                public_cache = b""  # the upstream's own wins
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
        elif public_cache:
            out.append((b"cache-control", public_cache))
        return out, length

    def _own_cookie(self, value: bytes) -> bytes | None:
        """The cookie name a ``Set-Cookie`` value sets, if it is one of the gateway's."""
        pair = value.split(b";", 1)[0].lstrip(b" \t=")
        name = _bare_cookie_name(pair.split(b"=", 1)[0])
        if name in self._cookies or (self._cookie_prefixes
                                     and name.startswith(self._cookie_prefixes)):
            return name
        return None

    def _rewrite(self, url: bytes) -> bytes:
        """``url`` on the public origin if it points at the upstream's own URL."""
        if not url.startswith((b"h", b"H")):
            return url  # relative: the browser resolves it against the public origin
        for origin, path in self._bases:
            end = len(origin) + len(path)
            if (url[:len(origin)].lower() == origin and url[len(origin):end] == path
                    and url[end:end + 1] in _URL_BOUNDARY):
                rest = url[end:]
                return self._public + (rest if rest.startswith(b"/") else b"/" + rest)
        return url


_REWRITTEN = frozenset({b"set-cookie", b"location", b"refresh"})
_URL_BOUNDARY = frozenset({b"", b"/", b"?", b"#"})


def _bare_cookie_name(name: bytes) -> bytes:
    """A cookie name in lower case without its ``__Host-`` / ``__Secure-`` prefixes."""
    name = name.strip().lower()
    while name.startswith((b"__host-", b"__secure-")):
        name = name.split(b"-", 1)[1]
    return name


def _upstream_bases(url: str) -> tuple[tuple[bytes, bytes], ...]:
    """(lower-case origin, path) pairs an absolute URL into ``url`` starts with: the
    origin with and without its default port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    hosts = [f"{host}:{port}"] + ([host] if port == default else [])
    path = parts.path.rstrip("/").encode("latin-1")
    return tuple((f"{scheme}://{h}".encode("latin-1"), path) for h in hosts)


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


_NORM = bytes(c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 45
              for c in range(256))


def norm(name: bytes) -> bytes:
    """A header name as the drop rules compare it: lower case, and every character other
    than a letter or digit read as ``-`` (``X_Remote.User`` is ``x-remote-user``)."""
    return name.translate(_NORM)
