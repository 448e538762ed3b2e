"""End to end over real sockets: anonymous → IdP → ACS → the upstream page, and who is kept out."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lxml import etree

from tests.browser import client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import Stack, TLSFiles

PAGE = "/issues/2023-03/pages/14"


def test_member_reads_a_gated_page(stack: Stack) -> None:
    with client(stack) as http:
        first = http.get(stack.url + PAGE)
        assert first.status_code == 302
        assert first.headers["location"] == "/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
        assert stack.upstream.requests == []  # nothing reached the upstream anonymously

        sign_in = http.get(stack.url + first.headers["location"])
        assert sign_in.status_code == 200
        assert "<title>Sign in" in sign_in.text
        assert "member number, name, e-mail address" in sign_in.text
        to_idp = http.get(stack.url + "/saml/login", params={
            "idp": stack.demo.idp.entity_id, "next": PAGE})
        assert to_idp.status_code == 302
        location = urlsplit(to_idp.headers["location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == stack.demo.idp.sso_url
        query = parse_qs(location.query)
        assert query["SigAlg"] == ["http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"]
        assert query["Signature"][0]
        request_xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
        authn = etree.fromstring(request_xml)
        assert authn.get("AssertionConsumerServiceURL") == stack.url + "/saml/acs"

        idp_page = http.get(to_idp.headers["location"])
        assert "DEVELOPMENT ONLY" in idp_page.text
        answer = sign_in_at_idp(http, idp_page, "alice")
        assert answer.acs == stack.url + "/saml/acs"
        done = post_to_acs(http, answer)
        assert done.status_code == 302
        assert done.headers["location"] == PAGE
        cookies = done.headers.get_list("set-cookie")
        session_cookie = next(c for c in cookies if c.startswith("__Host-gw_session="))
        for attribute in ("Path=/", "HttpOnly", "SameSite=Lax", "Secure"):
            assert attribute in session_cookie
        assert stack.session_count() == 1

        page = http.get(stack.url + PAGE)
        assert page.status_code == 200
        assert "Upstream page /issues/2023-03/pages/14" in page.text
        assert "Alice Archer" in page.text
        assert "private" in page.headers["cache-control"]

    seen = dict(stack.upstream.requests[-1]["headers"])
    assert seen["x-member-id"] == "M1001"
    assert seen["x-member-email"] == "alice@members.example.org"
    assert seen["x-member-status"] == "active"
    assert seen["x-member-entitlements"] == "urn:mace:example.org:entitlement:member"
    assert "__Host-gw_session" not in seen.get("cookie", "")


def test_lapsed_member_gets_the_lapsed_page(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "bob")
        page = http.get(stack.url + PAGE)
    assert page.status_code == 403
    assert "Your membership has lapsed" in page.text
    assert "Bob Baker" in page.text
    assert stack.upstream.requests == []


def test_api_client_gets_json_401_and_403(stack: Stack) -> None:
    with client(stack) as http:
        anonymous = http.get(stack.url + PAGE, headers={"accept": "application/json"})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "Sign-in required"
        login(http, stack, PAGE, "bob")
        lapsed = http.get(stack.url + PAGE, headers={"accept": "application/json"})
    assert lapsed.status_code == 403
    assert lapsed.json()["reason"] == "membership status is lapsed, needs active"


def test_member_cannot_open_another_members_notes(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        own = http.get(stack.url + "/members/M1001/notes")
        other = http.get(stack.url + "/members/M1004/notes")
        other_deep = http.get(stack.url + "/members/M1004/notes/7")
    assert own.status_code == 200
    assert other.status_code == 403
    assert other_deep.status_code == 403
    assert [r["path"] for r in stack.upstream.requests] == ["/members/M1001/notes"]


def test_public_pages_need_no_login(stack: Stack) -> None:
    with client(stack) as http:
        page = http.get(stack.url + "/public/about")
    assert page.status_code == 200
    assert "x-member-id" not in dict(stack.upstream.requests[-1]["headers"])


def test_two_logins_in_one_browser_both_complete(stack: Stack) -> None:
    """Two tabs, one cookie jar: two outstanding AuthnRequests, answered in reverse order."""
    with client(stack) as http:
        tab1 = start_login(http, stack, "/issues/2023-03/pages/1")
        tab2 = start_login(http, stack, "/issues/2023-06/pages/2")
        answer2 = sign_in_at_idp(http, tab2, "alice")
        answer1 = sign_in_at_idp(http, tab1, "alice")
        done2 = post_to_acs(http, answer2)
        done1 = post_to_acs(http, answer1)
    assert (done2.status_code, done2.headers["location"]) == (302, "/issues/2023-06/pages/2")
    assert (done1.status_code, done1.headers["location"]) == (302, "/issues/2023-03/pages/1")


def test_next_to_another_origin_lands_on_root(stack: Stack) -> None:
    with client(stack) as http:
        to_idp = http.get(stack.url + "/saml/login", params={
            "next": "https://evil.example/", "idp": stack.demo.idp.entity_id})
        idp_page = http.get(to_idp.headers["location"])
        done = post_to_acs(http, sign_in_at_idp(http, idp_page, "alice"))
    assert done.status_code == 302
    assert done.headers["location"] == "/"


def test_sp_metadata_is_served_from_public_url(stack: Stack) -> None:
    with client(stack) as http:
        answer = http.get(stack.url + "/saml/metadata")
    assert answer.status_code == 200
    assert answer.headers["strict-transport-security"] == "max-age=31536000"
    assert answer.headers["content-type"].startswith("application/samlmetadata+xml")
    root = etree.fromstring(answer.content)
    ns = {"md": "urn:oasis:names:tc:SAML:2.0:metadata"}
    acs = root.find(".//md:AssertionConsumerService", ns)
    assert acs is not None and acs.get("Location") == stack.url + "/saml/acs"
    assert root.get("entityID") == stack.url + "/saml/metadata"


def test_only_navigations_are_sent_to_login(stack: Stack) -> None:
    """A favicon or XHR must not start a login (no pending request, no cookie)."""
    with client(stack) as http:
        image = http.get(stack.url + PAGE, headers={"sec-fetch-mode": "no-cors",
                                                    "sec-fetch-dest": "image"})
        post = http.post(stack.url + PAGE, data={"a": "b"})
        navigation = http.get(stack.url + PAGE, headers={"sec-fetch-mode": "navigate"})
    assert image.status_code == 401
    assert post.status_code == 401
    assert "Sign in again" in post.text
    assert navigation.status_code == 302


def test_upstream_down_is_a_502_page(tmp_path: Path, tls: TLSFiles) -> None:
    from tests.conftest import bound_socket, run_stack

    dead = bound_socket()  # bound, never listening: connections are refused
    extra = f'\n[[upstreams]]\nname = "dead"\nprefix = "/public/dead"\n' \
            f'url = "http://127.0.0.1:{dead.getsockname()[1]}"\n'
    with run_stack(tmp_path, tls, extra_config=extra) as running, client(running) as http:
        page = http.get(running.url + "/public/dead/x")
        api = http.get(running.url + "/public/dead/x", headers={"accept": "application/json"})
    dead.close()
    assert page.status_code == 502
    assert "The content service is not reachable right now." in page.text
    assert "reference" in page.text
    assert api.status_code == 502 and api.json()["error"] == "Service unreachable"


def test_unknown_host_is_refused(stack: Stack) -> None:
    with client(stack) as http:
        spoofed = http.get(stack.url + "/saml/metadata", headers={"host": "evil.example"})
        proxied = http.get(stack.url + "/public/about", headers={"host": "evil.example"})
        probe = http.get(stack.url + "/healthz", headers={"host": "10.0.0.7:8000"})
    assert (spoofed.status_code, proxied.status_code, probe.status_code) == (400, 400, 200)
    assert stack.upstream.requests == []


def test_cross_site_unsafe_requests_to_gated_pages_are_refused(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        evil = http.post(stack.url + "/members/M1001/notes", data={"text": "x"},
                         headers={"origin": "https://evil.example"})
        fetch = http.post(stack.url + "/members/M1001/notes", data={"text": "x"},
                          headers={"sec-fetch-site": "cross-site"})
        own = http.post(stack.url + "/members/M1001/notes", data={"text": "x"},
                        headers={"origin": stack.url, "sec-fetch-site": "same-origin"})
    assert (evil.status_code, fetch.status_code, own.status_code) == (403, 403, 200)
    assert [r["method"] for r in stack.upstream.requests] == ["POST"]
