"""The sample reader on its own: real uvicorn servers, real tokens, a real JWKS over TLS.

A tiny app plays the gateway's part (it serves the JWKS at the gateway's URL,
over https with the test certificate); tokens are minted with the gateway's own
``TokenIssuer``, so the reader verifies exactly what it gets in the demo.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.demo.auth import DEFAULT_MAX_AGE, Authenticator, JwksCache, max_age
from gateway.demo.reader import create_reader
from gateway.identity import TokenIssuer
from gateway.keys import generate_identity_key
from gateway.principal import Principal
from tests.conftest import TLSFiles, bound_socket, port_of, serving

MEMBER = "urn:mace:example.org:entitlement:member"
CLAIMS = ("email", "display_name", "entitlements", "status", "idp")


@dataclass
class Reader:
    url: str
    gateway_url: str
    issuer: TokenIssuer
    jwks: dict[str, Any]
    tls: TLSFiles
    key_dir: Path

    def token(self, member_id: str = "M1001", *, status: str = "active",
              entitlements: tuple[str, ...] = (MEMBER,), audience: str = "reader",
              session: str = "", issuer: TokenIssuer | None = None) -> str:
        principal = Principal(subject=member_id, idp="devidp", attributes={
            "member_id": (member_id,), "email": (f"{member_id}@example.org",),
            "display_name": (f"Reader {member_id}",), "entitlements": entitlements,
            "status": (status,)})
        raw = (issuer or self.issuer).token(principal, session or f"session-{member_id}",
                                            audience, CLAIMS)
        return raw.decode()

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token:
            headers["X-Gateway-Identity"] = token
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Reader]:
    work = tmp_path_factory.mktemp("reader")
    key = generate_identity_key(work / "keys")
    gw_sock, reader_sock = bound_socket(), bound_socket()
    gateway_url = f"https://127.0.0.1:{port_of(gw_sock)}"
    issuer = TokenIssuer([key], issuer=gateway_url, lifetime=300)
    jwks: dict[str, Any] = {"keys": list(issuer.jwks["keys"])}

    async def serve_jwks(request: Request) -> JSONResponse:
        return JSONResponse(jwks, headers={"cache-control": "public, max-age=300"})

    fake_gateway = Starlette(routes=[Route("/.well-known/jwks.json", serve_jwks)])
    app = create_reader(gateway_url=gateway_url, jwks_verify=tls.client_context(),
                        data_dir=work / "data")
    with (serving(fake_gateway, gw_sock, ssl_keyfile=str(tls.key), ssl_certfile=str(tls.cert)),
          serving(app, reader_sock)):
        yield Reader(f"http://127.0.0.1:{port_of(reader_sock)}", gateway_url, issuer, jwks,
                     tls, work / "keys")


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return html.unescape(match.group(1))


# -- pages and identity ---------------------------------------------------------------------


def test_public_pages_render_for_anonymous_visitors(reader: Reader) -> None:
    with reader.client() as http:
        home = http.get("/")
        assert home.status_code == 200
        assert 'lang="en"' in home.text and 'href="#main"' in home.text
        assert "/saml/login?next=%2F" in home.text and "Signed in as" not in home.text
        assert "script-src 'self'" in home.headers["content-security-policy"]
        assert http.get("/issues").status_code == 200
        about = http.get("/public/about")
        assert about.status_code == 200 and "About the magazine" in about.text
        assert http.get("/public/nothing").status_code == 404
        assert http.get("/static/reader.css").status_code == 200
        assert http.get("/static/search.js").status_code == 200
        for path in ("/issues/2023-03/pages/1", "/issues/free-2024/pages/1", "/orders/new",
                     "/members/M1001/notes"):
            assert http.get(path).status_code == 401, path


def test_member_reads_pages_with_page_navigation(reader: Reader) -> None:
    with reader.client(reader.token("M1001")) as http:
        page = http.get("/issues/2023-03/pages/2")
        assert page.status_code == 200
        assert "Signed in as <strong>Reader M1001</strong>" in page.text
        assert 'href="/saml/logout"' in page.text
        nav = page.text.split('<nav aria-label="Pages"', 1)[1].split("</nav>", 1)[0]
        assert len(re.findall(r">Page \d+</a>", nav)) == 60
        assert '<a href="/issues/2023-03/pages/2" aria-current="page">Page 2</a>' in nav
        assert http.get("/issues/2023-03/pages/61").status_code == 404
        assert http.get("/issues/2023-09").headers["location"] == "/issues/2023-09/pages/1"
    with reader.client(reader.token("M1002", status="lapsed")) as http:
        assert http.get("/issues/2023-06/pages/1").status_code == 403
        assert http.get("/issues/free-2024/pages/3").status_code == 200
    with reader.client(reader.token("R77", status="registered", entitlements=())) as http:
        assert http.get("/issues/free-2024/pages/12").status_code == 200
        assert http.get("/issues/2023-03/pages/1").status_code == 403
        assert http.get("/members/R77/notes").status_code == 403  # notes are for members


def test_only_a_valid_gateway_token_counts(reader: Reader, tmp_path: Path) -> None:
    foreign_key = generate_identity_key(tmp_path / "other")
    forged_issuer = TokenIssuer([foreign_key], issuer=reader.gateway_url, lifetime=300)
    other_gateway = TokenIssuer([foreign_key], issuer="https://elsewhere.example", lifetime=300)
    refused = {
        "another audience": reader.token(audience="wiki"),
        "an unknown key": reader.token(issuer=forged_issuer),
        "another issuer": reader.token(issuer=other_gateway),
        "garbage": "not.a.token",
    }
    for why, token in refused.items():
        with reader.client(token, Accept="application/json") as http:
            answer = http.get("/members/M1001/notes")
            assert answer.status_code == 401, why
            assert answer.json()["error"] == "Please sign in"
    # Raw identity headers are never trusted.
    with reader.client(**{"X-Member-Id": "M1001", "X-Member-Status": "active"}) as http:
        assert http.get("/members/M1001/notes").status_code == 401
        assert http.get("/issues/2023-03/pages/1").status_code == 401


async def test_jwks_refetch_for_unknown_keys_is_rate_limited(reader: Reader) -> None:
    now = [1000.0]
    cache = JwksCache(f"{reader.gateway_url}/.well-known/jwks.json",
                      verify=reader.tls.client_context(), clock=lambda: now[0])
    kid = reader.jwks["keys"][0]["kid"]
    assert (await cache.get(kid)) is not None and cache.fetches == 1
    await cache.get(kid)
    await cache.get("unknown")
    assert cache.fetches == 1  # too soon to refetch
    new_key = generate_identity_key(reader.key_dir)
    reader.jwks["keys"].append(new_key.public_jwk())
    try:
        now[0] += 10
        jwks = await cache.get(new_key.kid)
        assert cache.fetches == 2 and jwks is not None
        assert new_key.kid in {k["kid"] for k in jwks["keys"]}
    finally:
        reader.jwks["keys"].pop()


async def test_a_pruned_key_stops_counting_when_the_jwks_copy_expires(reader: Reader) -> None:
    """The JWKS answer says ``max-age=300`` (as the gateway's does): the cache keeps its
    copy that long and no longer, so a token signed with a key the gateway pruned is
    refused at most 300 s after the prune, while a retained key keeps working."""
    now = [5000.0]
    cache = JwksCache(f"{reader.gateway_url}/.well-known/jwks.json",
                      verify=reader.tls.client_context(), clock=lambda: now[0])
    auth = Authenticator(reader.gateway_url, cache)
    old_token = reader.token("M1001")
    new_key = generate_identity_key(reader.key_dir)
    new_issuer = TokenIssuer([new_key], issuer=reader.gateway_url, lifetime=300)
    new_token = reader.token("M1001", issuer=new_issuer)
    old_keys = list(reader.jwks["keys"])
    reader.jwks["keys"][:] = [new_key.public_jwk(), *old_keys]  # rotated: both published
    try:
        assert await auth.viewer(old_token) is not None
        assert await auth.viewer(new_token) is not None
        assert cache.fetches == 1
        reader.jwks["keys"][:] = [new_key.public_jwk()]  # the old key is pruned
        now[0] += 299
        assert await auth.viewer(old_token) is not None  # the copy is still current
        assert cache.fetches == 1
        now[0] += 1  # max-age reached: the copy is fetched again before it is used
        assert await auth.viewer(old_token) is None
        assert cache.fetches == 2
        assert await auth.viewer(new_token) is not None
        assert cache.fetches == 2
    finally:
        reader.jwks["keys"][:] = old_keys


async def test_an_expired_copy_is_not_used_while_the_gateway_is_away(reader: Reader) -> None:
    now = [5000.0]
    cache = JwksCache(f"{reader.gateway_url}/.well-known/jwks.json",
                      verify=reader.tls.client_context(), clock=lambda: now[0])
    auth = Authenticator(reader.gateway_url, cache)
    token = reader.token("M1001")
    assert await auth.viewer(token) is not None
    cache.url = reader.gateway_url + "/gone.json"  # the JWKS stops answering (404)
    now[0] += 301
    assert await auth.viewer(token) is None
    assert await auth.viewer(token) is None
    assert cache.fetches == 2  # the failed refetch is not retried for every token
    cache.url = f"{reader.gateway_url}/.well-known/jwks.json"
    now[0] += 10
    assert await auth.viewer(token) is not None
    assert cache.fetches == 3


def test_jwks_lifetime_comes_from_cache_control() -> None:
    assert max_age("public, max-age=300") == 300
    assert max_age("max-age=60, must-revalidate") == 60
    assert max_age(None) == DEFAULT_MAX_AGE
    assert max_age("no-store") == 0 and max_age("public, no-cache") == 0
    assert max_age("max-age=soon") == 0
    assert max_age("max-age=99999999") == 86400


# -- notes ----------------------------------------------------------------------------------


def test_notes_json_api_crud(reader: Reader) -> None:
    with reader.client(reader.token("M2001")) as http:
        created = http.post("/members/M2001/notes",
                            json={"ref": "/issues/2023-06/pages/4", "text": "Check the moths."})
        assert created.status_code == 201, created.text
        note = created.json()
        assert created.headers["location"] == note["url"] == f"/members/M2001/notes/{note['id']}"
        listed = http.get("/members/M2001/notes", headers={"Accept": "application/json"}).json()
        assert [n["id"] for n in listed["notes"]] == [note["id"]]
        edited = http.put(note["url"], json={"text": "Checked: two moths."})
        assert edited.status_code == 200 and edited.json()["text"] == "Checked: two moths."
        assert http.get(note["url"], headers={"Accept": "application/json"}).json()["text"] \
            == "Checked: two moths."
        assert http.put(note["url"], json={"text": "  "}).status_code == 422
        bad_ref = http.post("/members/M2001/notes", json={"ref": "/nowhere", "text": "x"})
        assert bad_ref.status_code == 422
        assert http.delete(note["url"]).status_code == 204
        assert http.get(note["url"]).status_code == 404
        # A bare POST that is neither a form nor JSON is refused.
        assert http.post("/members/M2001/notes", content=b"ref=x",
                         headers={"Content-Type": "text/plain"}).status_code == 415


def test_notes_html_forms_with_csrf(reader: Reader) -> None:
    with reader.client(reader.token("M2002", session="s-a")) as http:
        page = http.get("/public/help")
        token = csrf_of(page.text)
        form = {"csrf": token, "ref": "/public/help", "text": "Ask about <b>sign-in</b>."}
        saved = http.post("/members/M2002/notes", data=form)
        assert saved.status_code == 303
        assert saved.headers["location"] == "/public/help?note=saved#note-form"
        assert "Note saved" in http.get(saved.headers["location"]).text
        notes = http.get("/members/M2002/notes").text
        assert "Ask about &lt;b&gt;sign-in&lt;/b&gt;." in notes  # escaped, not markup
        note_url = re.search(r'href="(/members/M2002/notes/[0-9a-f]+)"', notes).group(1)
        edit_page = http.get(note_url)
        assert edit_page.status_code == 200 and 'id="note-text"' in edit_page.text
        edited = http.post(note_url, data={"csrf": token, "text": "Edited."})
        assert edited.status_code == 303
        assert "Note updated" in http.get(edited.headers["location"]).text
        empty = http.post(note_url, data={"csrf": token, "text": ""})
        assert empty.status_code == 422 and "Write something" in empty.text
        # Refused: no token, a wrong token, another member's token, a foreign Origin.
        # (Tokens are per member, not per session: a form kept across a sign-in replays.)
        other = reader.token("M2003", session="s-b")
        with reader.client(other) as second_session:
            foreign_token = csrf_of(second_session.get("/public/help").text)
        for bad in ({}, {"csrf": "nonsense"}, {"csrf": foreign_token}):
            answer = http.post(note_url, data={"text": "Forged.", **bad})
            assert answer.status_code == 403, bad
        cross_site = http.post(note_url, data={"csrf": token, "text": "Forged."},
                               headers={"Origin": "https://evil.example"})
        assert cross_site.status_code == 403
        assert http.post(f"{note_url}/delete", data={"csrf": ""}).status_code == 403
        assert "Edited." in http.get(note_url).text
        deleted = http.post(f"{note_url}/delete", data={"csrf": token})
        assert deleted.status_code == 303
        assert "Note deleted" in http.get(deleted.headers["location"]).text
        assert http.get(note_url).status_code == 404


def test_members_cannot_reach_each_others_notes(reader: Reader) -> None:
    with reader.client(reader.token("M3002")) as bob:
        bobs = bob.post("/members/M3002/notes",
                        json={"ref": "/issues/2023-09/pages/7", "text": "Bob's private note"})
        note_id = bobs.json()["id"]
    with reader.client(reader.token("M3001"), Accept="application/json") as alice:
        # Bob's member ID in the path: 403 whatever the note.
        assert alice.get("/members/M3002/notes").status_code == 403
        theirs = f"/members/M3002/notes/{note_id}"
        assert alice.get(theirs).status_code == 403
        assert alice.put(theirs, json={"text": "mine now"}).status_code == 403
        assert alice.delete(theirs).status_code == 403
        assert alice.post("/members/M3002/notes", json={"ref": "/public/about",
                                                        "text": "planted"}).status_code == 403
        # Bob's note ID under Alice's own path: it does not exist for her.
        mine = f"/members/M3001/notes/{note_id}"
        assert alice.get(mine).status_code == 404
        assert alice.put(mine, json={"text": "mine now"}).status_code == 404
        assert alice.delete(mine).status_code == 404
        assert alice.get("/members/M3001/notes").json() == {"notes": []}
    with reader.client(reader.token("M3002")) as bob:
        still = bob.get(f"/members/M3002/notes/{note_id}", headers={"Accept": "application/json"})
        assert still.json()["text"] == "Bob's private note"


# -- orders ---------------------------------------------------------------------------------

ADDRESS = {"billing-name": "Alice Archer", "billing-street": "1 Mill Lane",
           "billing-postcode": "OX1 2AB", "billing-city": "Oxley", "same-as-billing": "on"}


def order_count(http: httpx.Client) -> int:
    return len(http.get("/orders", headers={"Accept": "application/json"}).json()["orders"])


def test_order_totals_come_from_the_catalogue(reader: Reader) -> None:
    with reader.client(reader.token("M4001")) as http:
        form = http.get("/orders/new")
        assert form.status_code == 200 and "No items" in form.text
        token = csrf_of(form.text)
        rows = {"code-0": "BI-2303", "quantity-0": "2", "code-1": "BND-23", "quantity-1": "1",
                "price-0": "0.01", "total": "0.02"}  # forged prices are ignored
        update = http.post("/orders/new", data={"csrf": token, "action": "update", **rows})
        assert update.status_code == 200 and "No items" not in update.text
        assert "£13.00" in update.text and "Slipcase binder" in update.text
        assert '<td class="num" id="order-total">£25.00</td>' in update.text
        placed = http.post("/orders/new", data={"csrf": token, "action": "place", **rows,
                                                **ADDRESS})
        assert placed.status_code == 303, placed.text
        done = http.get(placed.headers["location"])
        assert "is placed" in done.text and 'id="order-total">£25.00<' in done.text
        order = http.get(placed.headers["location"],
                         headers={"Accept": "application/json"}).json()
        assert order["total"] == 2500 and order["delivery"] == order["billing"]
        assert [i["line"] for i in order["items"]] == [1300, 1200]
    with reader.client(reader.token("M4002"), Accept="application/json") as other:
        assert other.get(placed.headers["location"]).status_code == 404


def test_bad_quantities_codes_and_empty_baskets_are_refused(reader: Reader) -> None:
    with reader.client(reader.token("M4003")) as http:
        token = csrf_of(http.get("/orders/new").text)
        for quantity in ("0", "-1", "1.5", "abc", "1000"):
            answer = http.post("/orders/new", data={
                "csrf": token, "action": "place", "code-0": "BI-2306", "quantity-0": quantity,
                **ADDRESS})
            assert answer.status_code == 422, quantity
            assert 'id="quantity-0-error"' in answer.text, quantity
            assert f'name="quantity-0" value="{quantity}"' in answer.text  # kept as typed
        unknown = http.post("/orders/new", data={"csrf": token, "action": "place",
                                                 "code-0": "XX-999", "quantity-0": "1",
                                                 **ADDRESS})
        assert unknown.status_code == 422 and "There is no product with this code" in unknown.text
        empty = http.post("/orders/new", data={"csrf": token, "action": "place", **ADDRESS})
        assert empty.status_code == 422 and "No items" in empty.text
        assert "basket is empty" in empty.text
        no_address = http.post("/orders/new", data={"csrf": token, "action": "place",
                                                    "code-0": "PC-SET", "quantity-0": "1"})
        assert no_address.status_code == 422 and "Enter the billing address" in no_address.text
        no_csrf = http.post("/orders/new", data={"action": "place", "code-0": "PC-SET",
                                                 "quantity-0": "1", **ADDRESS})
        assert no_csrf.status_code == 403
        assert order_count(http) == 0
    with reader.client(reader.token("M4004", status="lapsed")) as lapsed:
        assert lapsed.get("/orders/new").status_code == 403


# -- search ---------------------------------------------------------------------------------


def test_search_covers_only_what_the_reader_may_see(reader: Reader) -> None:
    def hits(http: httpx.Client, query: str) -> list[str]:
        answer = http.get("/search.json", params={"q": query})
        assert answer.status_code == 200
        return [hit["url"] for hit in answer.json()["results"]]

    with reader.client() as anonymous:
        assert hits(anonymous, "weir") == []
        assert hits(anonymous, "milestone") == []
        assert hits(anonymous, "membership") and all(
            url.startswith("/public/") for url in hits(anonymous, "membership"))
        page = anonymous.get("/search", params={"q": "weir"})
        assert "No results for “weir”" in page.text and 'aria-live="polite"' in page.text
    with reader.client(reader.token("M5001")) as member:
        found = hits(member, "weir")
        assert found and all(url.startswith("/issues/2023-03/") for url in found)
        assert hits(member, "zzqxjv nonsense") == []
        assert "No results" in member.get("/search", params={"q": "zzqxjv"}).text
        assert "/issues/2023-03/pages/" in member.get("/search", params={"q": "weir"}).text
    with reader.client(reader.token("R5002", status="registered", entitlements=())) as visitor:
        assert hits(visitor, "weir") == []
        assert all(url.startswith("/issues/free-2024/") for url in hits(visitor, "milestone"))
