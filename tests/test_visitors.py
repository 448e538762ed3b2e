"""The registration gate, sign-out, and the registrations export, over real sockets."""

from __future__ import annotations

import csv
import io
import re

import httpx

from tests.browser import client, login
from tests.conftest import Stack

FREE = "/issues/free-2024/pages/1"
PAGE = "/issues/2023-03/pages/14"


def origin(stack: Stack) -> dict[str, str]:
    return {"origin": stack.url}


def register(http: httpx.Client, stack: Stack, email: str, consent: bool = True,
             headers: dict[str, str] | None = None) -> httpx.Response:
    data = {"email": email, "next": FREE, **({"consent": "yes"} if consent else {})}
    return http.post(stack.url + "/_gateway/register", data=data,
                     headers=origin(stack) if headers is None else headers)


def test_free_issue_sends_anonymous_visitors_to_registration(stack: Stack) -> None:
    with client(stack) as http:
        first = http.get(stack.url + FREE)
        assert first.status_code == 302
        assert first.headers["location"] == \
            "/_gateway/register?next=%2Fissues%2Ffree-2024%2Fpages%2F1"
        form = http.get(stack.url + first.headers["location"])
    assert form.status_code == 200
    assert 'name="email"' in form.text and 'name="consent"' in form.text
    assert stack.upstream.requests == []


def test_invalid_email_is_refused_and_kept(stack: Stack) -> None:
    with client(stack) as http:
        answer = register(http, stack, "not-an-address@")
        no_consent = register(http, stack, "reader@example.org", consent=False)
    assert answer.status_code == 400
    assert "Please enter a valid e-mail address" in answer.text
    assert 'value="not-an-address@"' in answer.text
    assert no_consent.status_code == 400 and "Please tick the box" in no_consent.text
    assert stack.session_count() == 0


def test_registered_visitor_reads_the_free_issue_only(stack: Stack) -> None:
    with client(stack) as http:
        done = register(http, stack, "Reader@Example.ORG")
        assert done.status_code == 303 and done.headers["location"] == FREE
        page = http.get(stack.url + FREE)
        member_page = http.get(stack.url + PAGE)
    assert page.status_code == 200
    seen = dict(stack.upstream.requests[-1]["headers"])
    assert seen["x-member-status"] == "registered"
    assert seen["x-member-email"] == "Reader@example.org"
    assert re.fullmatch(r"reader![0-9a-f]{24}", seen["x-member-id"])
    assert member_page.status_code == 302  # a member sign-in is still needed
    assert member_page.headers["location"].startswith("/saml/login?next=")


def test_each_registration_is_its_own_identity(stack: Stack) -> None:
    """The subject is random per registration, never derived from the address: knowing a
    reader's address gives no way to their identity or sessions."""
    with client(stack) as first, client(stack) as second:
        register(first, stack, "same@example.org")
        register(second, stack, "same@example.org")
        first.get(stack.url + FREE)
        second.get(stack.url + FREE)
    subjects = [dict(r["headers"])["x-member-id"] for r in stack.upstream.requests[-2:]]
    assert len(set(subjects)) == 2 and all(s.startswith("reader!") for s in subjects)
    assert stack.session_count() == 2


def test_cross_site_registration_is_refused(stack: Stack) -> None:
    with client(stack) as http:
        answer = register(http, stack, "reader@example.org",
                          headers={"origin": "https://evil.example"})
        no_origin = register(http, stack, "reader@example.org", headers={})
    assert answer.status_code == 403 and no_origin.status_code == 403
    assert stack.session_count() == 0


def test_admin_exports_registrations_as_csv(stack: Stack) -> None:
    with client(stack) as visitor:
        register(visitor, stack, "first@example.org")
        register(visitor, stack, "=cmd@example.org")
    url = stack.url + "/_gateway/admin/registrations.csv"
    with client(stack) as anonymous:
        assert anonymous.get(url).status_code == 302
    with client(stack) as member:
        login(member, stack, PAGE, "alice")
        assert member.get(url).status_code == 403
    with client(stack) as admin:
        login(admin, stack, PAGE, "carol")
        export = admin.get(url)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(export.text)))
    assert rows[0] == ["email", "registered_at", "consent", "subject", "verified_at"]
    assert [r[0] for r in rows[1:]] == ["first@example.org", "'=cmd@example.org"]
    assert rows[1][2].startswith("I agree that the publisher stores my e-mail address")
    # The reader's random subject (their sessions'); not confirmed by mail (verify is off).
    assert all(re.fullmatch(r"reader![0-9a-f]{24}", r[3]) and r[4] == "" for r in rows[1:])


def test_sign_out_needs_the_form_and_kills_the_cookie(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
        confirm = http.get(stack.url + "/saml/logout")
        assert confirm.status_code == 200 and stack.session_count() == 1  # GET ends nothing
        token = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
        assert token is not None
        logout = stack.url + "/saml/logout"
        forged = http.post(logout, data={"csrf": "x"}, headers=origin(stack))
        cross = http.post(logout, data={"csrf": token.group(1)},
                          headers={"origin": "https://evil.example"})
        # A cross-site form without the token: refused by origin, and by token alone.
        no_token = [http.post(logout, data={"next": "/"}, headers=headers) for headers in (
            {"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}, {},
            origin(stack))]
        assert (forged.status_code, cross.status_code) == (403, 403)
        assert [answer.status_code for answer in no_token] == [403] * 4
        assert stack.session_count() == 1
        done = http.post(logout, data={"csrf": token.group(1)}, headers=origin(stack))
        assert stack.session_count() == 0
        # The dev IdP has SLO: the gateway sends the member there, and back to sign-out.
        assert done.status_code == 302 and done.headers["location"].startswith(
            stack.demo.idp.slo_url)
        back = http.get(done.headers["location"])
        signed_out = http.get(back.headers["location"])
        assert signed_out.status_code == 200 and "You are signed out" in signed_out.text
    with client(stack) as copier:  # a copied cookie is dead after sign-out
        again = copier.get(stack.url + PAGE, headers={"cookie": f"__Host-gw_session={cookie}"})
    assert again.status_code == 302
