"""``decision_answer``: one decision → answer function for the hot path, forward-auth and
the admin guard; and the error answers built from the exception tree's class data."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from gateway.answers import (
    decision_answer,
    exception_answer,
    forward_auth_refusal,
    is_navigation,
    passive_candidate,
    passive_sign_in,
    step_up_refusal,
)
from gateway.errors import (
    AmbiguousPath,
    BadRequest,
    BodyTooLarge,
    ClientError,
    CrossSite,
    GatewayError,
    InvalidToken,
    LoginFailed,
    LogoutFailed,
    ServiceError,
    SignInError,
    StoreError,
    TooManyRequests,
    UnknownIdP,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.paths import with_next
from gateway.policy import Decision
from gateway.principal import Principal
from gateway.sessions import SessionRecord
from gateway.web import Answer

HTML = "text/html,application/xhtml+xml,*/*;q=0.8"
JSON = "application/json"
# A target with everything a ``next`` parameter must survive: an encoded byte, a query
# with its own ``&`` and ``=``, and a ``/`` in a value.
TARGET = "/issues/caf%C3%A9?page=2&q=a/b"
LOGIN = Decision("login", "member", "/issues/**")
REGISTER = Decision("register", "registered", "/free/**")
ALLOW = Decision("allow", "member", "/issues/**")
DENY = Decision("deny", "owner", "/members/{id}/**", reason="path belongs to another member")
LAPSED = Decision("deny", "member", "/issues/**", reason="status is lapsed", failed="status",
                  message="Renew to read on.")
ALICE = SessionRecord("k" * 64, Principal("alice@idp", "https://idp.example/",
                                          {"display_name": ("Alice Example",)}), 0, 0, 9e9)


def sign_in_url(next_url: str) -> str:
    return with_next("/proto/login", next_url)


def answer(decision: Decision, *, accept: str = HTML, navigation: bool = True,
           forward_auth: bool = False, origin: str = "") -> Answer:
    got = decision_answer(decision, ALICE if decision.kind == "deny" else None,
                          target=TARGET, accept=accept, navigation=navigation,
                          sign_in_url=sign_in_url, forward_auth=forward_auth, origin=origin)
    assert got is not None
    return got


def header(got: Answer, name: bytes) -> str:
    values = [v for k, v in got[1] if k == name]
    assert len(values) == 1, got[1]
    return values[0].decode()


def next_of(location: str) -> str:
    [value] = parse_qs(urlsplit(location).query)["next"]
    return value


def test_allowed_is_no_answer() -> None:
    assert decision_answer(ALLOW, ALICE, target=TARGET, accept=HTML, navigation=True,
                           sign_in_url=sign_in_url) is None


@pytest.mark.parametrize(("decision", "page"), [(LOGIN, "/proto/login"),
                                                (REGISTER, "/_gateway/register")])
def test_navigation_is_redirected_with_the_whole_target_quoted(decision: Decision,
                                                               page: str) -> None:
    status, _, body = got = answer(decision)
    assert status == 302 and body == b""
    location = header(got, b"location")
    assert location == f"{page}?next={quote(TARGET, safe='')}"
    assert "&" not in location and next_of(location) == TARGET  # one parameter, intact
    assert header(got, b"cache-control") == "no-store"


@pytest.mark.parametrize("decision", [LOGIN, REGISTER])
def test_not_a_navigation_gets_a_401_page_naming_the_sign_in(decision: Decision) -> None:
    status, _, body = got = answer(decision, navigation=False)
    assert status == 401
    assert header(got, b"content-type").startswith("text/html")
    assert b"Sign-in required" in body
    assert quote(TARGET, safe="").encode() in body  # the retry link (HTML-escaped &)


@pytest.mark.parametrize("navigation", [True, False])
def test_api_clients_get_json_401(navigation: bool) -> None:
    status, _, body = got = answer(LOGIN, accept=JSON, navigation=navigation)
    assert status == 401 and header(got, b"content-type") == "application/json"
    payload = json.loads(body)
    assert payload["error"] == "Sign-in required"
    assert next_of(payload["retry_url"]) == TARGET


def test_denied_member_gets_a_403_page_or_json() -> None:
    status, _, body = got = answer(DENY)
    assert status == 403 and header(got, b"content-type").startswith("text/html")
    assert b"Access denied" in body and b"path belongs to another member" in body
    status, _, body = answer(DENY, accept=JSON)
    assert status == 403
    assert json.loads(body) == {"error": "Access denied",
                                "message": "path belongs to another member",
                                "display_name": "Alice Example",
                                "reason": "path belongs to another member"}


def test_lapsed_member_gets_the_lapsed_page() -> None:
    status, _, body = answer(LAPSED)
    assert status == 403
    assert b"Your membership has lapsed" in body and b"Alice Example" in body
    assert b"Renew to read on." in body


def test_forward_auth_401_names_the_absolute_sign_in_url() -> None:
    origin = "https://gw.example.test"
    status, _, body = got = answer(LOGIN, accept=JSON, navigation=False, forward_auth=True,
                                   origin=origin)
    assert status == 401
    location = header(got, b"location")
    assert location == f"{origin}/proto/login?next={quote(TARGET, safe='')}"
    assert json.loads(body)["login"] == location
    assert header(got, b"cache-control") == "no-store"


def test_forward_auth_redirect_mode_is_a_302_whatever_the_accept() -> None:
    status, _, _ = got = answer(REGISTER, accept=JSON, forward_auth=True, origin="https://gw")
    assert status == 302
    assert header(got, b"location") == f"https://gw/_gateway/register?next={quote(TARGET, safe='')}"


def test_forward_auth_403_carries_the_reason() -> None:
    status, _, body = got = answer(DENY, forward_auth=True)
    assert status == 403
    assert json.loads(body) == {"error": "Access denied",
                                "reason": "path belongs to another member"}
    assert header(got, b"x-auth-reason") == "path belongs to another member"


def test_forward_auth_reason_header_is_always_a_valid_header_value() -> None:
    _, headers, body = forward_auth_refusal("no upstream named 'caf\u00e9\u6f22\r\nx: y'")
    [value] = [v for k, v in headers if k == b"x-auth-reason"]
    assert all(0x20 <= b < 0x7F for b in value), value
    assert json.loads(body)["reason"].endswith("\r\nx: y'")


@pytest.mark.parametrize(("method", "fetch_mode", "accept", "expected"), [
    ("GET", "", HTML, True), ("HEAD", "navigate", "", True),
    ("GET", "cors", HTML, False), ("GET", "no-cors", "image/avif,*/*", False),
    ("GET", "", JSON, False), ("POST", "navigate", HTML, False),
])
def test_what_counts_as_a_navigation(method: str, fetch_mode: str, accept: str,
                                     expected: bool) -> None:
    assert is_navigation(method, fetch_mode, accept) is expected


# -- the exception tree -------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "group", "status", "title"), [
    (BadRequest, ClientError, 400, "Bad request"),
    (AmbiguousPath, BadRequest, 400, "Address not accepted"),
    (BodyTooLarge, ClientError, 413, "Request too large"),
    (CrossSite, ClientError, 403, "Access denied"),
    (TooManyRequests, ClientError, 429, "Too many requests"),
    (UnknownIdP, SignInError, 400, "Sign-in failed"),
    (InvalidToken, GatewayError, 401, "Sign-in required"),
    (StoreError, ServiceError, 503, "Temporarily unavailable"),
    (UpstreamError, ServiceError, 502, "Service unreachable"),
    (UpstreamTimeout, UpstreamError, 504, "Service timed out"),
])
def test_errors_carry_their_answer_as_class_data(cls: type[GatewayError],
                                                 group: type[GatewayError], status: int,
                                                 title: str) -> None:
    assert issubclass(cls, group)
    assert (cls.status, cls.title) == (status, title) and cls.public_message
    exc = cls("the private reason")
    got_status, _, body = exception_answer(exc, accept=JSON, reference="ABCD1234")
    assert got_status == status
    assert json.loads(body) == {"error": title, "message": cls.public_message,
                                "reference": "ABCD1234"}
    assert b"private reason" not in body


def test_sign_in_errors_keep_their_details() -> None:
    failed = LoginFailed("signature", "bad signature", {"idp": "https://idp/"})
    assert (failed.status, failed.title, failed.kind, failed.details) == (
        400, "Sign-in failed", "signature", {"idp": "https://idp/"})
    logout = LogoutFailed("issuer", "unknown issuer")
    assert isinstance(logout, SignInError) and logout.kind == "issuer" and logout.status == 400
    assert not issubclass(SignInError, ClientError) and not issubclass(ServiceError, ClientError)


# -- Step-up and passive sign-in (issue 16) -----------------------------------------------

MFA = "https://refeds.org/profile/mfa"
STEP_UP = Decision("step_up", "member", "/admin/**", reason="signed in with password",
                   failed="authn_context", authn_context=(MFA, "urn:x:token"), force=True)


def test_step_up_navigation_goes_to_a_sign_in_asking_for_the_rule() -> None:
    status, _, _ = got = answer(STEP_UP)
    assert status == 302
    query = parse_qs(urlsplit(header(got, b"location")).query)
    assert query == {"next": [TARGET], "authn_context": [MFA, "urn:x:token"], "force": ["1"]}


def test_step_up_for_an_api_client_or_a_proxy_is_a_401_naming_that_sign_in() -> None:
    status, _, body = got = answer(STEP_UP, accept=JSON)
    assert status == 401
    payload = json.loads(body)
    assert payload["error"] == "Sign in again"
    assert "stronger sign-in" in payload["message"]
    assert parse_qs(urlsplit(payload["retry_url"]).query)["authn_context"] == [MFA,
                                                                               "urn:x:token"]
    status, _, body = got = answer(STEP_UP, navigation=False, forward_auth=True,
                                   origin="https://gw.example")
    assert status == 401
    assert header(got, b"location").startswith("https://gw.example/proto/login?next=")
    assert "force=1" in header(got, b"location")


def test_step_up_refusal_names_what_was_missing() -> None:
    status, _, body = step_up_refusal((MFA,), fresh=False, accept=HTML, reference="ABCD1234")
    assert status == 403
    assert MFA in body.decode() and "ABCD1234" in body.decode()
    status, _, body = step_up_refusal((), fresh=True, accept=JSON)
    assert (status, json.loads(body)["reason"]) == (403, "needs a fresh authentication")


@pytest.mark.parametrize(("method", "mode", "accept", "agent", "purpose", "expected"), [
    ("GET", "navigate", HTML, "Mozilla/5.0 Firefox/128.0", "", True),
    ("HEAD", "navigate", HTML, "Mozilla/5.0", "", False),
    ("GET", "", HTML, "Mozilla/5.0", "", False),  # no Sec-Fetch-Mode: not sure it is a browser
    ("GET", "no-cors", HTML, "Mozilla/5.0", "", False),
    ("GET", "navigate", JSON, "Mozilla/5.0", "", False),
    ("GET", "navigate", HTML, "Mozilla/5.0 (compatible; Googlebot/2.1)", "", False),
    ("GET", "navigate", HTML, "Mozilla/5.0", "prefetch", False),
    ("POST", "navigate", HTML, "Mozilla/5.0", "", False),
])
@pytest.mark.parametrize(("dest", "framed"), [("document", False), ("", False),
                                               ("iframe", True)])
def test_who_may_be_sent_on_a_passive_sign_in(method: str, mode: str, accept: str,
                                              agent: str, purpose: str, expected: bool,
                                              dest: str, framed: bool) -> None:
    assert passive_candidate(method, mode, accept, agent, purpose, dest) is (
        expected and not framed)
    assert passive_sign_in("/p?a=1", sign_in_url) == "/proto/login?next=%2Fp%3Fa%3D1&passive=1"
