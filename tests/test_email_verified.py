"""The ``email_verified`` marker over a real stack: what an upstream learns about the
e-mail it is given (``X-Member-Email-Verified`` and the token's ``email_verified``
claim), for an IdP member, a reader who only typed an address, and a client that
tries to say so itself. A confirmed reader (``verify = true``) is in
``test_registration_gate.test_the_link_signs_the_reader_in_once``."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.config import Settings, Upstream, load_settings
from gateway.identity import UpstreamIdentity, verify_token
from gateway.keys import generate_identity_key, load_identity_keys
from gateway.principal import EMAIL, Principal
from tests.browser import client, login
from tests.conftest import Stack

ISSUER = "https://gw.example.org"
PAGE = "/issues/2023-03/pages/14"
FREE = "/issues/free-2024/pages/1"
FORGED = [("X-Member-Email-Verified", "true"), ("x-member-email-verified", "yes"),
          ("X_Member_Email_Verified", "true")]


def upstream_saw(stack: Stack, path: str) -> dict[str, list[str]]:
    """Every header of the upstream's latest request for ``path``, by lower-case name."""
    request = [r for r in stack.upstream.requests if r["path"] == path][-1]
    seen: dict[str, list[str]] = {}
    for name, value in request["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


def claims(stack: Stack, seen: dict[str, list[str]]) -> dict[str, object]:
    jwks = httpx.get(stack.url + "/.well-known/jwks.json",
                     verify=stack.tls.client_context()).json()
    return verify_token(seen["x-gateway-identity"][0], jwks, "reader", issuer=stack.url)


def test_an_idp_members_email_goes_upstream_verified(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        assert http.get(stack.url + PAGE, headers=FORGED).status_code == 200
    seen = upstream_saw(stack, PAGE)
    assert seen["x-member-email"] == ["alice@members.example.org"]
    assert seen["x-member-email-verified"] == ["true"]  # the gateway's, and only it
    assert "x_member_email_verified" not in seen
    token = claims(stack, seen)
    assert token["email_verified"] is True and token["idp"] == seen["x-member-idp"][0]


def test_a_typed_address_goes_upstream_unverified(stack: Stack) -> None:
    with client(stack) as http:
        done = http.post(stack.url + "/_gateway/register",
                         data={"email": "victim@example.org", "consent": "yes", "next": FREE},
                         headers={"origin": stack.url})
        assert done.status_code == 303, done.text
        assert http.get(stack.url + FREE, headers=FORGED).status_code == 200
    seen = upstream_saw(stack, FREE)
    assert seen["x-member-email"] == ["victim@example.org"]
    assert seen["x-member-status"] == ["registered"]
    assert seen["x-member-email-verified"] == ["false"]  # the forged "true" never arrives
    assert "x_member_email_verified" not in seen
    token = claims(stack, seen)
    assert token["email"] == "victim@example.org" and token["email_verified"] is False


def test_an_anonymous_clients_marker_never_reaches_the_upstream(stack: Stack) -> None:
    with client(stack) as http:
        assert http.get(stack.url + "/issues", headers=FORGED).status_code == 200
    seen = upstream_saw(stack, "/issues")
    assert "x-member-email-verified" not in seen and "x_member_email_verified" not in seen


def test_the_marker_is_on_by_default_and_named_like_its_neighbours(stack: Stack) -> None:
    settings = load_settings(stack.demo.workdir / "gateway.toml", environ={})
    assert settings.identity_headers["email_verified"] == "X-Member-Email-Verified"
    assert "email_verified" in settings.upstreams[0].claims


def test_stored_principals_without_the_marker_read_by_their_kind() -> None:
    old = {"subject": "M1", "idp": "https://idp.example.org", "kind": "member",
           "attributes": {EMAIL: ["m@example.org"]}}
    assert Principal.from_dict(old).values("email_verified") == ("true",)
    reader = {"subject": "reader!ab", "idp": "", "kind": "registered",
              "attributes": {EMAIL: ["r@example.org"]}}
    assert Principal.from_dict(reader).values("email_verified") == ("false",)
    # What a session keeps now says so itself, and an address it lacks is not verified.
    confirmed = Principal("reader!cd", "", {EMAIL: ("c@example.org",)}, kind="registered",
                          email_verified=True)
    assert Principal.from_dict(confirmed.to_dict()).values("email_verified") == ("true",)
    unconfirmed = Principal.from_dict({**old, "email_verified": False})
    assert unconfirmed.values("email_verified") == ("false",)
    assert Principal("M2", "https://idp.example.org").values("email_verified") == ("false",)


def test_an_upstream_that_names_the_claim_gets_a_boolean(tmp_path: Path) -> None:
    generate_identity_key(tmp_path)
    config = Settings.model_validate({
        "public_url": ISSUER, "identity_headers": {"email_verified": "X-Email-Checked"},
        "upstreams": [Upstream(name="shop", url="http://127.0.0.1:9",
                               claims=["email", "email_verified"]),
                      Upstream(name="notes", url="http://127.0.0.1:9", claims=["email"])]})
    identity = UpstreamIdentity(config, load_identity_keys(tmp_path))
    member = Principal("M1", "https://idp", {EMAIL: ("m@example.org",)}, email_verified=True)
    sent = dict(identity.headers("k", member, "shop"))
    assert sent[b"x-email-checked"] == b"true" and b"x-member-email-verified" not in sent
    claims = verify_token(sent[b"x-gateway-identity"], identity.jwks, "shop", issuer=ISSUER,
                          leeway=1e9)
    assert claims["email_verified"] is True and claims["email"] == "m@example.org"
    # Only the upstreams whose claims name it get it; the client's copy is dropped anyway.
    notes = dict(identity.headers("k", member, "notes"))
    assert b"x-email-checked" not in notes
    assert "email_verified" not in verify_token(notes[b"x-gateway-identity"], identity.jwks,
                                                "notes", issuer=ISSUER, leeway=1e9)
    assert "x-email-checked" in identity.strip_names
    no_address = Principal("M2", "https://idp", email_verified=True)
    claims = verify_token(dict(identity.headers("k2", no_address, "shop"))[b"x-gateway-identity"],
                          identity.jwks, "shop", issuer=ISSUER, leeway=1e9)
    assert claims["email_verified"] is False and claims["email"] == ""
