"""Property-based attacks (hypothesis), without HTTP.

1. Random mutations of one valid signed Response — bytes flipped, inserted or deleted
   inside the signed Assertion, characters changed in its text, the whole message
   re-encoded — thrown at ``ServiceProvider.finish_login`` with a fixed pending request
   ID: the only outcomes are ``LoginFailed`` (never another exception: that would be a
   500) or a login whose signed content is exactly the original's (a mutation c14n
   cannot see, such as whitespace inside a tag) with the original identity.
2. Random spellings of paths into other members' areas, through ``canonical_path`` and
   ``Policy``: a spelling is refused, or what policy decides on is its one meaning —
   never a path that reads as ``/members/M1004/…`` to some other parser while policy
   saw ``M1001``'s area; and every case and suffix spelling of another member's area (or
   of the issues) is refused for an upstream that reads paths case-insensitively and strips
   format suffixes.
"""

from __future__ import annotations

import base64
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.config import Rule, Upstream
from gateway.demo.stack import prepare
from gateway.errors import AmbiguousPath, LoginFailed
from gateway.paths import canonical_path
from gateway.policy import Policy
from gateway.principal import Principal
from gateway.saml import IdP, IdPRegistry, LoginResult, ServiceProvider
from tests.conftest import seed_demo_keys
from tests.forge import NS, forge_for_demo, parse, unsign

REQUEST_ID = "_pending-request-for-hypothesis"
MEMBER = "urn:mace:example.org:entitlement:member"


@dataclass(repr=False)
class Target:
    sp: ServiceProvider
    idp: IdP
    xml: bytes  # the valid Response
    span: tuple[int, int]  # where its signed Assertion sits in ``xml``
    signed_c14n: bytes
    result: LoginResult


def signed_content(xml: bytes) -> bytes | None:
    """Exclusive c14n of the Assertion without its Signature: what the signature covers."""
    try:
        assertion = parse(xml).find("saml:Assertion", NS)
    except etree.XMLSyntaxError:
        return None
    if assertion is None:
        return None
    return etree.tostring(unsign(assertion), method="c14n", exclusive=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir: Path = tmp_path_factory.mktemp("property")
    seed_demo_keys(workdir)
    demo = prepare(workdir, gateway_url="https://127.0.0.1:9443",
                   idp_url="http://127.0.0.1:9001", reader_url="http://127.0.0.1:9002")
    registry = IdPRegistry.load_dir(demo.settings.idp.metadata_dir)
    sp = ServiceProvider(demo.settings, registry)
    idp = registry.get(demo.idp.entity_id)
    forge = forge_for_demo(demo)
    xml = forge.xml(REQUEST_ID, lifetime=600).encode()
    start = xml.index(b"<saml:Assertion")
    end = xml.index(b"</saml:Assertion>") + len(b"</saml:Assertion>")
    result = sp.finish_login(base64.b64encode(xml).decode(), request_id=REQUEST_ID, idp=idp)
    yield Target(sp, idp, xml, (start, end), signed_content(xml) or b"", result)


@st.composite
def mutations(draw: st.DrawFn, length: int, span: tuple[int, int]) -> tuple[str, int, bytes]:
    op = draw(st.sampled_from(["flip", "replace", "insert", "delete", "text"]))
    where = draw(st.integers(min_value=span[0], max_value=span[1] - 1))
    if op == "flip":
        return op, where, bytes([1 << draw(st.integers(0, 7))])
    if op in {"replace", "insert"}:
        return op, where, draw(st.binary(min_size=1, max_size=3))
    if op == "delete":
        return op, where, bytes([draw(st.integers(1, 4))])
    return op, where, draw(st.text(min_size=1, max_size=3)).encode("utf-8")


def mutate(xml: bytes, op: str, where: int, arg: bytes) -> bytes:
    if op == "flip":
        return xml[:where] + bytes([xml[where] ^ arg[0]]) + xml[where + 1:]
    if op == "replace":
        return xml[:where] + arg + xml[where + len(arg):]
    if op == "insert":
        return xml[:where] + arg + xml[where:]
    if op == "delete":
        return xml[:where] + xml[where + arg[0]:]
    # "text": put characters into a text node (after the next '>' that is followed by text)
    match = re.compile(rb">[^<\s]").search(xml, where)
    at = match.start() + 1 if match else where
    return xml[:at] + arg + xml[at:]


def reencode(xml: bytes, how: str) -> tuple[bytes, str]:
    """The bytes as sent and their base64 form."""
    if how == "utf-16":
        text = xml.decode("utf-8", "replace")
        xml = ('<?xml version="1.0" encoding="UTF-16"?>' + text).encode("utf-16")
    elif how == "latin-1-declared":
        xml = b'<?xml version="1.0" encoding="ISO-8859-1"?>' + xml
    encoded = base64.b64encode(xml).decode()
    if how == "wrapped":
        encoded = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    return xml, encoded


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), how=st.sampled_from(["plain", "wrapped", "utf-16", "latin-1-declared"]))
def test_mutated_response_is_never_accepted_with_changed_content(target: Target, data: Any,
                                                                 how: str) -> None:
    op, where, arg = data.draw(mutations(len(target.xml), target.span))
    sent, encoded = reencode(mutate(target.xml, op, where, arg), how)
    try:
        result = target.sp.finish_login(encoded, request_id=REQUEST_ID, idp=target.idp)
    except LoginFailed as exc:
        event(f"refused: {exc.kind}")  # shown by --hypothesis-show-statistics
        return  # refused: fine. Any other exception fails the test (it would be a 500).
    event("accepted (signed content unchanged)")
    assert signed_content(sent) == target.signed_c14n, (op, where, arg, how)
    assert result.signed_in == target.result.signed_in
    assert result.assertion_id == target.result.assertion_id


# -- Paths ------------------------------------------------------------------------------------

RULES = [
    Rule(path="/public/**", access="public"),
    Rule(path="/issues/**", access="member"),
    Rule(path="/members/{member_id}/**", access="owner"),
]
POLICY = Policy(RULES)
ALICE = Principal(subject="M1001", idp="https://idp.example/",
                  attributes={"status": ("active",), "entitlements": (MEMBER,)})
TOKENS = ["%2e", "%2E", "%2f", "%2F", "%5c", "%5C", ".", "..", "/", ";", ";x=1", "%00",
          "%c0%ae", "%25", "%4d", "M1004", "M1001", "M", "1004", "notes", "members", "\\",
          "%2e%2e", "%252e", "%3b", "?", "#"]


def other_readings(raw: bytes) -> set[str]:
    """How other parsers might read ``raw``: percent-decoded once, backslash as slash,
    ``;params`` dropped, dot segments resolved, overlong UTF-8 taken leniently."""
    readings = set()
    once = unquote_to_bytes(raw)
    lenient = once.replace(b"\xc0\xae", b".").replace(b"\xc0\xaf", b"/")
    for text in (once.decode("utf-8", "replace"), lenient.decode("utf-8", "replace")):
        for variant in (text, text.replace("\\", "/"),
                        re.sub(r";[^/]*", "", text.replace("\\", "/"))):
            variant = variant.split("?")[0].split("#")[0]
            readings.add(posixpath.normpath("/" + variant.lstrip("/")) + "/")
    return readings


def under_victim(path: str) -> bool:
    return path.startswith("/members/M1004/")


@settings(max_examples=600, deadline=None)
@given(prefix=st.sampled_from(["/members/M1001/", "/members/M1001/notes/", "/members/",
                               "/public/", "/issues/x/", "/"]),
       tokens=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=10))
def test_no_spelling_reaches_another_members_area(prefix: str, tokens: list[str]) -> None:
    raw = (prefix + "".join(tokens)).encode("latin-1")
    try:
        decoded, encoded = canonical_path(raw)
    except AmbiguousPath:
        return  # refused: 400, nothing decided, nothing forwarded
    # One path, one meaning: what is forwarded re-reads (once) as exactly what was decided.
    assert canonical_path(encoded.encode("ascii")) == (decoded, encoded)
    assert unquote(encoded) == decoded
    decision = POLICY.decide(decoded, ALICE)
    if under_victim(decoded + "/"):
        assert decision.kind == "deny", raw
    if decision.kind == "allow":
        # Allowed: no reading of the raw bytes by another (single-decoding) parser may
        # land in the victim's area.
        readings = other_readings(raw)
        assert not any(under_victim(r) for r in readings), (raw, decoded, readings)


@pytest.mark.parametrize("raw", [
    b"/members/M1001/..%2fM1004/notes", b"/members/M1001/%2e%2e/M1004/notes",
    b"/members/M1001%2f..%2fM1004/x", b"/members/M1001/notes/%c0%ae%c0%ae/x",
    b"/members/M1001;/../M1004/notes", b"/members/M1001/%5c..%5cM1004",
    b"/members//M1004/notes", b"/members/M1001/notes/%00",
])
def test_known_bypass_spellings_are_refused(raw: bytes) -> None:
    with pytest.raises(AmbiguousPath):
        canonical_path(raw)


# Upstreams that read paths loosely (issue 14, item 7c): any case, and a format suffix.
LOOSE = Policy(RULES, upstreams=[
    Upstream(name="iis", url="http://127.0.0.1:1", case_insensitive=True,
             strip_suffixes=[".json", ".xml"]),
    Upstream(name="spring", url="http://127.0.0.1:2", case_insensitive=True,
             strip_suffixes=[".*"]),
])
# How a letter may be spelled to a case-insensitive server: both cases, and the letters
# Java's equalsIgnoreCase or .NET read as that letter (dotless i, dotted I, long s, Kelvin).
SPELLINGS = {"i": ["i", "I", "\u0131", "\u0130"], "s": ["s", "S", "\u017f"],
             "k": ["k", "K", "\u212a"]}


@st.composite
def spelled(draw: st.DrawFn, word: str) -> str:
    return "".join(draw(st.sampled_from(SPELLINGS.get(c, [c, c.upper()]))) for c in word)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), area=st.sampled_from(["members", "issues"]),
       upstream=st.sampled_from(["iis", "spring"]),
       suffix=st.sampled_from(["", ".json", ".JSON", ".xml", ".Json", ".html", ".x.json"]))
def test_no_spelling_reaches_a_protected_area_of_a_loose_upstream(
        data: Any, area: str, upstream: str, suffix: str) -> None:
    """Every spelling a case-insensitive, suffix-stripping upstream reads as
    ``/members/M1004/…`` (or ``/issues/…``) is decided as that area: alice is refused
    M1004's, an anonymous visitor must sign in for the issues."""
    first = data.draw(spelled(area))
    deeper = ["notes", "7", "edit"] if area == "members" else ["2023-03", "pages", "14"]
    rest = data.draw(st.lists(st.sampled_from(deeper), max_size=3))
    segs = [first, "M1004", *rest] if area == "members" else [first, *rest]
    raw = quote("/" + "/".join(segs) + suffix).encode("ascii")
    decoded, _ = canonical_path(raw)
    principal = ALICE if area == "members" else None
    decision = LOOSE.decide(decoded, principal, upstream=upstream)
    assert decision.kind != "allow", (decoded, upstream, decision)
