"""One path, one meaning: canonicalise a request path once, or refuse it; safe ``next`` URLs.

Policy decides on the decoded path; the upstream receives the encoded form of
exactly that path. Anything that two parsers could read two ways is refused
rather than guessed at: encoded ``/`` ``\\`` ``;`` ``%`` and NUL, dot segments in any
spelling, empty segments (``//``), path parameters, invalid or overlong UTF-8,
and control characters. Needless percent-encoding of unreserved characters is
decoded, and every other escape is re-emitted in upper-case hex, so equivalent
spellings collapse to one.
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.errors import AmbiguousPath

_HEX = b"0123456789abcdefABCDEF"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What may appear unencoded in a path we accept (RFC 3986 pchar and "/", minus ";").
_ALLOWED_RAW = _UNRESERVED | frozenset(b"!$&'()*+,=:@/%")
# Encoded '%' too: an upstream that decodes twice would read "%252f" as "/".
_REFUSED_DECODED = frozenset(b"/\\;\x00%")
_SAFE_OUT = "/:@!$&'()*+,=-._~"
# Bytes that stand for themselves, unchanged by decoding and by re-encoding (no '%').
_PLAIN = bytes(sorted(_ALLOWED_RAW - {0x25}))
MAX_PATH_BYTES = 4096


def canonical_path(raw: bytes) -> tuple[str, str]:
    """Return ``(decoded, encoded)`` for a raw request path, or raise ``AmbiguousPath``."""
    if not raw.startswith(b"/"):
        raise AmbiguousPath("path does not start with '/'")
    if len(raw) > MAX_PATH_BYTES:
        raise AmbiguousPath("path is too long")
    if not raw.translate(None, _PLAIN):  # most paths: no escapes, nothing to re-encode
        text = raw.decode("ascii")
        _check_segments(text)
        return text, text
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte not in _ALLOWED_RAW:
            raise AmbiguousPath(f"path contains the byte {byte:#04x}")
        if byte != 0x25:  # '%'
            out.append(byte)
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise AmbiguousPath("path contains a malformed percent-escape")
        decoded = int(pair, 16)
        if decoded in _REFUSED_DECODED:
            raise AmbiguousPath(f"path contains an encoded {chr(decoded)!r}")
        out.append(decoded)
        i += 3
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("path is not valid UTF-8") from None
    if any(ch < " " or ch == "\x7f" for ch in text):
        raise AmbiguousPath("path contains a control character")
    _check_segments(text)
    return text, quote(text, safe=_SAFE_OUT)


def _check_segments(text: str) -> None:
    """Refuse dot segments and empty segments (``//``) in a decoded path."""
    if "/." not in text and "//" not in text:
        return
    segments = text.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in {".", ".."}:
            raise AmbiguousPath("path contains a dot segment")
        if segment == "" and index != len(segments) - 1:
            raise AmbiguousPath("path contains an empty segment ('//')")


def request_target(raw_path: bytes, query: bytes) -> tuple[str, str]:
    """A request's canonical path (decoded, for the rules) and the target the upstream
    gets (that path encoded, and the query as sent), or ``AmbiguousPath``."""
    path, encoded = canonical_path(raw_path)
    check_query(query)
    # check_query let only printable ASCII through: the decode cannot fail.
    return path, encoded + ("?" + query.decode("ascii") if query else "")


def safe_next(value: str | None) -> str:
    """A post-login destination: a local path on this origin, else ``/``.

    Refuses anything a browser could resolve to another origin: scheme-relative
    ``//host``, backslashes (``/\\host``), schemes (``https:``), whitespace and
    control characters (browsers strip tabs and newlines inside URLs).
    """
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    if any(ch in value for ch in "\\") or any(ch <= " " or ch == "\x7f" for ch in value):
        return "/"
    path, sep, query = value.partition("?")
    path = path.partition("#")[0]
    try:
        _, encoded = canonical_path(path.encode("utf-8"))
    except (AmbiguousPath, UnicodeEncodeError):
        return "/"
    if encoded.startswith("//"):
        return "/"
    return encoded + (sep + query.partition("#")[0] if query else "")


def with_next(page: str, target: str) -> str:
    """``page`` with ``?next=`` the URL-quoted ``target``: every sign-in and registration
    URL the gateway builds (the target's ``/``, ``?`` and ``&`` are quoted too, so the
    whole target survives as one parameter)."""
    return f"{page}?next={quote(target, safe='')}"


def check_query(raw: bytes) -> None:
    """A query string must be printable ASCII (RFC 3986: anything else is percent-encoded);
    raw bytes would be read differently by different parsers, so they are refused."""
    if raw and (min(raw) < 0x21 or max(raw) > 0x7E or b"#" in raw):
        raise AmbiguousPath("query string contains bytes that must be percent-encoded")
