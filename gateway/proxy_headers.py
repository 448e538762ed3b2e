"""Header rules of the proxy, compiled once and applied per request as bytes.

Request side: hop-by-hop headers and those named in ``Connection`` are dropped, names
compared after lower-casing and ``_`` → ``-``; the gateway's cookie is cut out of
``Cookie``. Response side: hop-by-hop headers go, and gated responses are made private
to the member (``Cache-Control``, ``Vary: Cookie``).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def strip_cookies(value: bytes, names: tuple[bytes, ...]) -> bytes:
    """``value`` without the named cookies; the others kept byte for byte."""
    for name in names:
        if name in value:
            break
    else:
        return value  # the common case: no gateway cookie in this header
    kept = [part for part in value.split(b";")
            if part.split(b"=", 1)[0].strip() not in names]
    return b";".join(kept).strip()


def norm(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")
