"""Identity headers and the signed identity token: minting, JWKS, verification, rotation."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from gateway.cli import main
from gateway.config import Settings, Upstream
from gateway.errors import ConfigError
from gateway.identity import InvalidToken, UpstreamIdentity, encode_value, verify_token
from gateway.keys import generate_identity_key, load_identity_keys
from gateway.principal import Principal
from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, run_stack

PAGE = "/issues/2023-03/pages/14"
ISSUER = "https://gw.example.org"
TOKEN = b"x-gateway-identity"


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def carol(**extra: tuple[str, ...]) -> Principal:
    return Principal(subject="M1003", idp="https://idp", attributes={
        "member_id": ("M1003",), "email": ("c@example.org",),
        "display_name": ("Carol Clarke",), "status": ("active",),
        "entitlements": ("urn:x:admin", "urn:x:member"), **extra})


def settings(*upstreams: Upstream, **options: object) -> Settings:
    return Settings.model_validate({"public_url": ISSUER, "upstreams": list(upstreams),
                                    **options})


def upstream(name: str, claims: list[str] | None = None) -> Upstream:
    if claims is None:
        return Upstream(name=name, url="http://127.0.0.1:9")
    return Upstream(name=name, url="http://127.0.0.1:9", claims=claims)


def token_of(identity: UpstreamIdentity, principal: Principal, session: str,
             name: str) -> bytes:
    return dict(identity.headers(session, principal, name))[TOKEN]


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    generate_identity_key(tmp_path)
    return tmp_path


@pytest.fixture
def identity(keys_dir: Path) -> tuple[UpstreamIdentity, Clock]:
    clock = Clock()
    config = settings(upstream("reader", ["display_name", "entitlements"]),
                      upstream("notes", []))
    return UpstreamIdentity(config, load_identity_keys(keys_dir), clock), clock


def test_token_claims_and_audience(identity: tuple[UpstreamIdentity, Clock]) -> None:
    upstreams, _ = identity
    token = token_of(upstreams, carol(), "session-key", "reader")
    claims = verify_token(token, upstreams.jwks, "reader", issuer=ISSUER, leeway=1e9)
    assert claims["sub"] == "M1003" and claims["aud"] == "reader" and claims["iss"] == ISSUER
    assert claims["name"] == "Carol Clarke"
    assert claims["entitlements"] == ["urn:x:admin", "urn:x:member"]
    assert "email" not in claims and "member_status" not in claims  # not this upstream's
    assert "member_id" not in claims  # only when the upstream's claims name it
    assert claims["exp"] - claims["iat"] == 60 and claims["jti"] and claims["sid"]
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verify_token(token, upstreams.jwks, "notes", issuer=ISSUER, leeway=1e9)


def test_token_sub_is_the_subject_and_any_attribute_is_a_claim(keys_dir: Path) -> None:
    config = settings(upstream("reader", ["member_id", "affiliation", "status", "idp"]),
                      attributes={"affiliation": ["eduPersonAffiliation"]})
    upstreams = UpstreamIdentity(config, load_identity_keys(keys_dir))
    scoped = Principal(subject="https://idp!M1003", idp="https://idp",
                       attributes={**carol().attributes, "affiliation": ("member", "staff")})
    claims = verify_token(token_of(upstreams, scoped, "k", "reader"), upstreams.jwks, "reader",
                          issuer=ISSUER)
    assert claims["sub"] == "https://idp!M1003"
    assert claims["member_id"] == "M1003"  # the number as the IdP asserted it
    assert claims["affiliation"] == ["member", "staff"]
    assert (claims["member_status"], claims["idp"]) == ("active", "https://idp")


@pytest.mark.parametrize(("claims", "problem"), [
    (["exp"], "would replace the token's own claim 'exp'"),
    (["display_name", "name"], "its token claim 'name' is also 'display_name''s"),
])
def test_claims_that_would_clash_in_the_token_are_config_errors(
        keys_dir: Path, claims: list[str], problem: str) -> None:
    config = settings(upstream("reader"), upstream("notes", claims),
                      attributes={"exp": ["a"], "name": ["b"]})
    with pytest.raises(ConfigError) as info:
        UpstreamIdentity(config, load_identity_keys(keys_dir))
    assert info.value.problems[0].startswith(f"{config.source}: key upstreams[1].claims[")
    assert problem in info.value.problems[0]


def test_token_is_reused_until_shortly_before_expiry(
        identity: tuple[UpstreamIdentity, Clock]) -> None:
    upstreams, clock = identity
    first = token_of(upstreams, carol(), "k", "reader")
    clock.now += 44
    assert token_of(upstreams, carol(), "k", "reader") == first
    assert token_of(upstreams, carol(), "k", "notes") != first  # per upstream
    assert token_of(upstreams, carol(), "other-session", "reader") != first  # per session
    clock.now += 1  # 15 s before expiry: a fresh token
    assert token_of(upstreams, carol(), "k", "reader") != first


def test_expired_tampered_and_foreign_tokens_fail(identity: tuple[UpstreamIdentity, Clock],
                                                  keys_dir: Path) -> None:
    upstreams, _ = identity
    config = settings(upstream("reader", ["status"]))
    # verify_token checks against real time, so an expired token is one minted in the past.
    past = UpstreamIdentity(config, load_identity_keys(keys_dir), lambda: 1_000_000_000.0)
    with pytest.raises(InvalidToken, match=r"(?i)expired"):
        verify_token(token_of(past, carol(), "k", "reader"), past.jwks, "reader",
                     issuer=ISSUER)
    good = token_of(past, carol(), "k2", "reader").decode()
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "M1001"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="Signature verification failed"):
        verify_token(f"{head}.{forged_body}.{sig}", past.jwks, "reader", issuer=ISSUER,
                     leeway=1e10)
    other_dir = keys_dir / "other"
    generate_identity_key(other_dir)
    foreign = UpstreamIdentity(config, load_identity_keys(other_dir))
    with pytest.raises(InvalidToken, match="unknown key"):
        verify_token(token_of(foreign, carol(), "k", "reader"), upstreams.jwks, "reader",
                     issuer=ISSUER)
    with pytest.raises(InvalidToken) as info:
        verify_token("not.a.token", upstreams.jwks, "reader", issuer=ISSUER)
    assert info.value.status == 401 and info.value.reason


def test_header_values_are_encoded_safely(keys_dir: Path) -> None:
    assert encode_value("Zoë O'Brien") == b"Zo%C3%AB O'Brien"
    assert encode_value("a\r\nSet-Cookie: x=y") == b"a%0D%0ASet-Cookie: x=y"
    assert encode_value("50%, off") == b"50%25%2C off"
    upstreams = UpstreamIdentity(settings(upstream("reader", ["display_name", "entitlements"])),
                                 load_identity_keys(keys_dir))
    person = Principal(subject="M1", idp="i", attributes={
        "member_id": ("M1",), "display_name": ("Zoë",), "entitlements": ("a,b", "c")})
    got = dict(upstreams.headers("k", person, "reader"))
    assert got.pop(TOKEN)
    assert got == {b"x-member-id": b"M1", b"x-member-name": b"Zo%C3%AB",
                   b"x-member-entitlements": b"a%2Cb,c"}
    entitlements = got[b"x-member-entitlements"].decode().split(",")
    assert [unquote(v) for v in entitlements] == ["a,b", "c"]


def test_identity_headers_from_any_attribute(keys_dir: Path) -> None:
    config = settings(upstream("reader", ["affiliation", "email", "member_id"]),
                      upstream("notes", []),
                      attributes={"affiliation": ["eduPersonAffiliation"]},
                      identity_headers={"affiliation": "X-Member-Affiliation", "email": "",
                                        "member_id": "X-Member-Number"})
    upstreams = UpstreamIdentity(config, load_identity_keys(keys_dir))
    scoped = Principal(subject="https://idp!M1003", idp="https://idp",
                       attributes={**carol().attributes, "affiliation": ("staff", "a,b")})
    got = dict(upstreams.headers("k", scoped, "reader"))
    assert got.pop(TOKEN)
    assert got == {b"x-member-id": b"https://idp!M1003", b"x-member-number": b"M1003",
                   b"x-member-affiliation": b"staff,a%2Cb"}  # email: "" = no header
    notes = dict(upstreams.headers("k", scoped, "notes"))
    assert set(notes) == {b"x-member-id", TOKEN}
    assert upstreams.knows("notes") and not upstreams.knows("elsewhere")
    assert upstreams.strip_names == {
        "x-member-id", "x-member-name", "x-member-entitlements", "x-member-status",
        "x-member-idp", "x-member-email-verified", "x-member-affiliation", "x-member-number",
        "x-gateway-identity"}


def upstream_token(stack: Stack) -> str:
    values = stack.upstream.header_values("x-gateway-identity")
    assert values, "the upstream received no identity token"
    return values[-1]


def fetch_jwks(stack: Stack) -> dict[str, object]:
    answer = httpx.get(stack.url + "/.well-known/jwks.json", verify=stack.tls.client_context())
    assert answer.status_code == 200
    assert "max-age" in answer.headers["cache-control"]
    return dict(answer.json())


def test_upstream_verifies_the_token_from_the_jwks_over_http(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        assert http.get(stack.url + PAGE).status_code == 200
    token = upstream_token(stack)
    jwks = fetch_jwks(stack)
    claims = verify_token(token, jwks, "reader", issuer=stack.url)
    assert claims["sub"] == "M1001" and claims["member_status"] == "active"
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verify_token(token, jwks, "notes", issuer=stack.url)
    with pytest.raises(InvalidToken, match=r"(?i)issuer"):
        verify_token(token, jwks, "reader", issuer="https://other.example")


def test_rotation_keeps_old_tokens_valid_until_pruned(tmp_path: Path, tls: TLSFiles) -> None:
    keys_dir = tmp_path / "certs" / "identity"
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        http.get(stack.url + PAGE)
        old_token = upstream_token(stack)
        old_issuer = stack.url  # each run of the stack listens on a new port
        old_kids = [k["kid"] for k in fetch_jwks(stack)["keys"]]  # type: ignore[index]
    assert main(["certs", "rotate-identity", "--dir", str(keys_dir)]) == 0
    with run_stack(tmp_path, tls) as stack, client(stack) as http:  # restarted
        jwks = fetch_jwks(stack)
        kids = [k["kid"] for k in jwks["keys"]]  # type: ignore[index]
        assert len(kids) == 2 and old_kids[0] in kids
        assert verify_token(old_token, jwks, "reader", issuer=old_issuer)["sub"] == "M1001"
        login(http, stack, PAGE, "alice")
        http.get(stack.url + PAGE)
        new_header = json.loads(base64.urlsafe_b64decode(upstream_token(stack).split(".")[0]
                                                         + "=="))
        assert new_header["kid"] == kids[0] != old_kids[0]  # newest first, and it signs
    assert main(["certs", "prune-identity", "--dir", str(keys_dir), "--keep", "1"]) == 0
    with run_stack(tmp_path, tls) as stack:
        jwks = fetch_jwks(stack)
        assert [k["kid"] for k in jwks["keys"]] == [kids[0]]  # type: ignore[index]
        with pytest.raises(InvalidToken, match="unknown key"):
            verify_token(old_token, jwks, "reader", issuer=old_issuer)


def test_per_upstream_claims(tmp_path: Path, tls: TLSFiles) -> None:
    extra = '\n[[upstreams]]\nname = "notes"\nprefix = "/members"\nurl = "{url}"\nclaims = []\n'

    def add_notes_upstream(demo: object) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text(config.read_text() + extra.format(url=demo.reader_url))  # type: ignore[attr-defined]

    with run_stack(tmp_path, tls, setup=add_notes_upstream) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        assert http.get(stack.url + "/members/M1001/notes").status_code == 200
        seen = dict(stack.upstream.requests[-1]["headers"])
        jwks = fetch_jwks(stack)
    assert seen["x-member-id"] == "M1001"
    assert "x-member-email" not in seen and "x-member-name" not in seen
    claims = verify_token(seen["x-gateway-identity"], jwks, "notes", issuer=stack.url)
    assert set(claims) == {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "sid"}
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verify_token(seen["x-gateway-identity"], jwks, "reader", issuer=stack.url)
