"""Path canonicalisation, safe redirects and the ``next`` parameter."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from gateway.errors import AmbiguousPath
from gateway.paths import canonical_path, check_query, request_target, safe_next, with_next


@pytest.mark.parametrize(("raw", "decoded", "encoded"), [
    (b"/", "/", "/"),
    (b"/issues/2023-03/pages/14", "/issues/2023-03/pages/14", "/issues/2023-03/pages/14"),
    (b"/issues/%32%30%32%33-03", "/issues/2023-03", "/issues/2023-03"),  # needless escapes
    (b"/a%20b/", "/a b/", "/a%20b/"),
    (b"/caf%c3%a9", "/caf\u00e9", "/caf%C3%A9"),
    (b"/x%3fy", "/x?y", "/x%3Fy"),
    (b"/x%23y", "/x#y", "/x%23y"),
    (b"/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
])
def test_canonical_forms(raw: bytes, decoded: str, encoded: str) -> None:
    assert canonical_path(raw) == (decoded, encoded)
    # The encoded form is a fixed point: sending it again means the same thing.
    assert canonical_path(encoded.encode()) == (decoded, encoded)


@pytest.mark.parametrize("raw", [
    b"/a/../b", b"/a/./b", b"/a/%2e%2e/b", b"/a/%2E./b", b"/a/.%2e", b"/..",
    b"/a%2fb", b"/a%2Fb", b"/a%5cb", b"/a\\b", b"/a;b", b"/a%3bb", b"/a%00", b"/a\x00",
    b"//a", b"/a//b", b"/%c0%ae%c0%ae/", b"/%ff", b"/a%zz", b"/a%2", b"/a b", b"/a\tb",
    b"/a%0d%0aSet-Cookie:x", b"/a%7f", b"a/b", b"", b"/" + b"a" * 5000,
    b"/a%252e%252e/b", b"/a%252fb", b"/100%25",
])
def test_ambiguous_paths_are_refused(raw: bytes) -> None:
    with pytest.raises(AmbiguousPath):
        canonical_path(raw)


@pytest.mark.parametrize(("value", "expected"), [
    ("/issues/2023-03/pages/14", "/issues/2023-03/pages/14"),
    ("/search?q=rivers&page=2", "/search?q=rivers&page=2"),
    ("/a#frag", "/a"),
    (None, "/"), ("", "/"),
    ("https://evil.example/", "/"), ("//evil.example", "/"), ("/\\evil.example", "/"),
    ("\\\\evil.example", "/"), ("https:evil.example", "/"), ("/\t/evil.example", "/"),
    ("/%2f/evil.example", "/"), ("/%5cevil.example", "/"), (" /x", "/"),
    ("javascript:alert(1)", "/"), ("/a/../../b", "/"), ("/x\r\nSet-Cookie: a=b", "/"),
])
def test_safe_next(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


@pytest.mark.parametrize("raw", [b"", b"q=rivers&page=2", b"next=%2F%2Fevil", b"a=%C3%A9"])
def test_query_strings_accepted(raw: bytes) -> None:
    check_query(raw)


@pytest.mark.parametrize("raw", [b"q=\x80", b"q=caf\xc3\xa9", b"a b", b"a\tb", b"a#b", b"\x7f"])
def test_query_strings_with_raw_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(AmbiguousPath):
        check_query(raw)


@pytest.mark.parametrize(("target", "expected"), [
    ("/", "/login?next=%2F"),
    ("/issues/caf%C3%A9?page=2&q=a/b",
     "/login?next=%2Fissues%2Fcaf%25C3%25A9%3Fpage%3D2%26q%3Da%2Fb"),
    ("/a b#c", "/login?next=%2Fa%20b%23c"),
])
def test_with_next_quotes_the_whole_target(target: str, expected: str) -> None:
    url = with_next("/login", target)
    assert url == expected
    # The sign-in gets the target back whole, and it is still a safe local destination.
    [(name, value)] = parse_qsl(url.partition("?")[2])
    assert name == "next" and value == target


def test_request_target_is_the_canonical_path_and_the_query_as_sent() -> None:
    assert request_target(b"/issues/%7e%C3%A9/p", b"a=1&b=%2F") == (
        "/issues/~\u00e9/p", "/issues/~%C3%A9/p?a=1&b=%2F")
    assert request_target(b"/plain", b"") == ("/plain", "/plain")
    with pytest.raises(AmbiguousPath):
        request_target(b"/a/%2e%2e/b", b"")
    with pytest.raises(AmbiguousPath):
        request_target(b"/a", b"q=\xff")
