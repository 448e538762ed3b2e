"""Identity headers and the signed identity token: minting, JWKS, verification, rotation."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from gateway.cli import main
from gateway.config import IdentityHeaders
from gateway.identity import (
    IdentityHeaderSet,
    InvalidToken,
    TokenIssuer,
    encode_value,
    verify_token,
)
from gateway.keys import generate_identity_key, load_identity_keys
from gateway.principal import Principal
from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, run_stack

PAGE = "/issues/2023-03/pages/14"
ISSUER = "https://gw.example.org"


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def carol() -> Principal:
    return Principal(member_id="M1003", idp="https://idp", name_id="n", email="c@example.org",
                     display_name="Carol Clarke", status="active",
                     entitlements=("urn:x:admin", "urn:x:member"))


@pytest.fixture
def issuer(tmp_path: Path) -> tuple[TokenIssuer, Clock]:
    generate_identity_key(tmp_path)
    clock = Clock()
    return TokenIssuer(load_identity_keys(tmp_path), issuer=ISSUER, lifetime=60,
                       clock=clock), clock


def test_token_claims_and_audience(issuer: tuple[TokenIssuer, Clock]) -> None:
    tokens, _ = issuer
    token = tokens.token(carol(), "session-key", "reader", ["display_name", "entitlements"])
    claims = verify_token(token, tokens.jwks, "reader", issuer=ISSUER, leeway=1e9)
    assert claims["sub"] == "M1003" and claims["aud"] == "reader" and claims["iss"] == ISSUER
    assert claims["name"] == "Carol Clarke"
    assert claims["entitlements"] == ["urn:x:admin", "urn:x:member"]
    assert "email" not in claims and "member_status" not in claims  # not this upstream's
    assert claims["exp"] - claims["iat"] == 60 and claims["jti"] and claims["sid"]
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verify_token(token, tokens.jwks, "notes", leeway=1e9)


def test_token_is_reused_until_shortly_before_expiry(issuer: tuple[TokenIssuer, Clock]) -> None:
    tokens, clock = issuer
    first = tokens.token(carol(), "k", "reader", [])
    clock.now += 44
    assert tokens.token(carol(), "k", "reader", []) == first
    assert tokens.token(carol(), "k", "notes", []) != first  # per upstream
    assert tokens.token(carol(), "other-session", "reader", []) != first  # per session
    clock.now += 1  # 15 s before expiry: a fresh token
    assert tokens.token(carol(), "k", "reader", []) != first


def test_expired_tampered_and_foreign_tokens_fail(issuer: tuple[TokenIssuer, Clock],
                                                  tmp_path: Path) -> None:
    tokens, _ = issuer
    # verify_token checks against real time, so an expired token is one minted in the past.
    past = TokenIssuer(load_identity_keys(tmp_path), issuer=ISSUER, lifetime=60,
                       clock=lambda: 1_000_000_000.0)
    with pytest.raises(InvalidToken, match=r"(?i)expired"):
        verify_token(past.token(carol(), "k", "reader", []), past.jwks, "reader")
    good = past.token(carol(), "k2", "reader", ["status"]).decode()
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "M1001"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="Signature verification failed"):
        verify_token(f"{head}.{forged_body}.{sig}", past.jwks, "reader", leeway=1e10)
    other_dir = tmp_path / "other"
    generate_identity_key(other_dir)
    foreign = TokenIssuer(load_identity_keys(other_dir), issuer=ISSUER, lifetime=60)
    with pytest.raises(InvalidToken, match="unknown key"):
        verify_token(foreign.token(carol(), "k", "reader", []), tokens.jwks, "reader")
    with pytest.raises(InvalidToken):
        verify_token("not.a.token", tokens.jwks, "reader")


def test_header_values_are_encoded_safely() -> None:
    assert encode_value("Zoë O'Brien") == b"Zo%C3%AB O'Brien"
    assert encode_value("a\r\nSet-Cookie: x=y") == b"a%0D%0ASet-Cookie: x=y"
    assert encode_value("50%, off") == b"50%25%2C off"
    headers = IdentityHeaderSet(IdentityHeaders())
    person = Principal(member_id="M1", idp="i", name_id="n", display_name="Zoë",
                       entitlements=("a,b", "c"))
    got = dict(headers.headers(person, headers.fields(["display_name", "entitlements"])))
    assert got == {b"x-member-id": b"M1", b"x-member-name": b"Zo%C3%AB",
                   b"x-member-entitlements": b"a%2Cb,c"}
    entitlements = got[b"x-member-entitlements"].decode().split(",")
    assert [unquote(v) for v in entitlements] == ["a,b", "c"]


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
        old_kids = [k["kid"] for k in fetch_jwks(stack)["keys"]]  # type: ignore[index]
    assert main(["certs", "rotate-identity", "--dir", str(keys_dir)]) == 0
    with run_stack(tmp_path, tls) as stack, client(stack) as http:  # restarted
        jwks = fetch_jwks(stack)
        kids = [k["kid"] for k in jwks["keys"]]  # type: ignore[index]
        assert len(kids) == 2 and old_kids[0] in kids
        assert verify_token(old_token, jwks, "reader")["sub"] == "M1001"
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
            verify_token(old_token, jwks, "reader")


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
    claims = verify_token(seen["x-gateway-identity"], jwks, "notes")
    assert set(claims) == {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "sid"}
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        verify_token(seen["x-gateway-identity"], jwks, "reader")
