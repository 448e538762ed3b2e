"""Discovery at federation scale: the sign-in page searches on the server and never ships
the whole list; ``/saml/discofeed`` publishes the IdPs as Shibboleth SP's DiscoFeed.

The stack trusts the dev IdP (with mdui keywords, logos, a domain hint and a scope added
to its metadata file) and a signed aggregate of 5,000 generated IdPs (``bench.aggregate``:
one in a hundred unusable and skipped) served as a ``[[metadata]]`` URL, over real
sockets.
"""

from __future__ import annotations

import base64
import gzip
import html
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from bench.aggregate import entities
from gateway.demo.stack import DemoStack
from gateway.saml import IdPRegistry
from gateway.saml.discovery import MAX_QUERY, Discovery, domains_of
from gateway.saml.registry import NO_UI, Logo, idps_from_tree, parse_xml
from tests.browser import client, post_to_acs, sign_in_at_idp
from tests.conftest import Stack, TLSFiles, bound_socket, port_of, run_stack, serving
from tests.playwright_support import PageProblems, assert_accessible, browser_context, serve_axe
from tests.test_browser_smoke import sign_in as idp_sign_in
from tests.test_metadata_sources import FED, MetadataServer, sign

COUNT = 5000
USABLE = COUNT - COUNT // 100  # one in a hundred is POST-only or has no signing certificate
PAGE = "/issues/2023-03/pages/14"
_LINK = re.compile(r'href="(/saml/login\?idp=[^"]+)"')
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
DEV_UI = (
    '<mdui:Keywords xml:lang="en">quokka newsletter+archive</mdui:Keywords>'
    '<mdui:Description xml:lang="en">Members of the demo society</mdui:Description>'
    '<mdui:InformationURL xml:lang="en">https://demo.example/about</mdui:InformationURL>'
    '<mdui:Logo width="80" height="60">https://logos.example/demo.png</mdui:Logo>'
    '<mdui:Logo width="16" height="16">http://insecure.example/demo.png</mdui:Logo>'
    '<mdui:Logo width="16" height="16">data:image/png;base64,AAAA</mdui:Logo>')
DEV_HINTS = (f'<mdui:DiscoHints xmlns:mdui="{MDUI}"><mdui:DomainHint>Demo-Members.example'
             '</mdui:DomainHint></mdui:DiscoHints>'
             '<shibmd:Scope xmlns:shibmd="urn:mace:shibboleth:metadata:1.0" regexp="false">'
             'society.example.org</shibmd:Scope>')


def idp_entity(n: int) -> str:
    return f"https://idp{n}.university{n}.example/idp/shibboleth"


def with_discovery_metadata(xml: str) -> str:
    """The dev IdP's metadata with mdui keywords, logos, a domain hint and a scope."""
    xml = xml.replace("</mdui:DisplayName>", "</mdui:DisplayName>" + DEV_UI, 1)
    return xml.replace("</mdui:UIInfo>", "</mdui:UIInfo>" + DEV_HINTS, 1)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Stack]:
    """The stack, with the federation's signed aggregate served from a real HTTP server
    as a ``[[metadata]]`` URL (as a federation publishes it)."""
    metadata = MetadataServer()
    sock = bound_socket()
    metadata.url = f"http://127.0.0.1:{port_of(sock)}"
    metadata.docs["/federation.xml"] = sign(entities(COUNT, certs=2)[0])

    def setup(demo: DemoStack) -> None:
        dev = demo.workdir / "idp_metadata" / "devidp.xml"
        dev.write_text(with_discovery_metadata(dev.read_text()))
        (demo.workdir / "fed.pem").write_text(FED[1])
        with (demo.workdir / "gateway.toml").open("a") as toml:
            toml.write(f'\n[[metadata]]\nurl = "{metadata.url}/federation.xml"\n'
                       'signing_cert = "fed.pem"\n')

    with (serving(metadata.app(), sock),
          run_stack(tmp_path_factory.mktemp("discovery"), tls, setup=setup) as stack):
        yield stack


def links(page: httpx.Response) -> list[str]:
    """The entity IDs the page offers, in order."""
    assert page.status_code == 200, page.text
    return [parse_qs(urlsplit(html.unescape(href)).query)["idp"][0]
            for href in _LINK.findall(page.text)]


def search(http: httpx.Client, stack: Stack, q: str) -> httpx.Response:
    return http.get(stack.url + "/saml/login", params={"next": PAGE, "q": q})


def test_the_page_is_small_and_never_lists_everyone(federation: Stack) -> None:
    with client(federation) as http:
        page = http.get(federation.url + "/saml/login", params={"next": PAGE})
    assert links(page) == []  # nothing remembered, nothing asked: a search form only
    assert '<form method="get" action="/saml/login"' in page.text and 'name="q"' in page.text
    assert "sign_in.js" not in page.text  # the live filter is for short lists
    one_button = len('<li><a class="button" href="/saml/login?idp=https%3A//idp1234.'
                     'university1234.example/idp/shibboleth&amp;next=/">University 1234</a>')
    assert len(page.content) < 16_000 < USABLE * one_button


@pytest.mark.parametrize(("query", "why"), [
    ("University number 4321", "display name"),
    ("universitat NUMMER 4321", "the German display name, without its accent"),
    ("campus4321", "keyword"),
    ("alice@university4321.example", "domain hint, from an e-mail address"),
    ("staff.university4321.example", "a subdomain of the domain hint"),
    ("uni4321.ac.example", "scope"),
    (idp_entity(4321), "entity ID"),
])
def test_search_finds_an_idp(federation: Stack, query: str, why: str) -> None:
    with client(federation) as http:
        found = links(search(http, federation, query))
    assert found[:1] == [idp_entity(4321)], why


def test_exact_domain_hits_come_first(federation: Stack) -> None:
    with client(federation) as http:
        # "university1.example" is a substring of the keywords and URLs of many IdPs
        # (university1x, university1xx, …); the one whose domain hint it is comes first.
        found = links(search(http, federation, "university1.example"))
        assert found[0] == idp_entity(1)
        assert links(search(http, federation, "bob@demo-members.EXAMPLE"))[0] \
            == federation.demo.idp.entity_id
        assert links(search(http, federation, "society.example.org"))[0] \
            == federation.demo.idp.entity_id


def test_a_search_never_lists_more_than_the_bound(federation: Stack) -> None:
    with client(federation) as http:
        page = search(http, federation, "university")
    assert len(links(page)) == 20
    assert f"{USABLE - 20} more organisations match" in page.text
    assert len(page.content) < 16_000


def test_an_overlong_query_is_cut_cleanly(federation: Stack) -> None:
    long = "University number 4321 " + "x" * 5000
    with client(federation) as http:
        page = search(http, federation, long)
        assert page.status_code == 200 and links(page) == []
        value = re.search(r'name="q" value="([^"]*)"', page.text)
        assert value is not None and html.unescape(value.group(1)) == long[:MAX_QUERY]
        assert f'maxlength="{MAX_QUERY}"' in page.text
        # Only the first eight words count: a ninth that matches nothing is ignored.
        assert links(search(http, federation, "4321 " * 8 + "nomatch")) == [idp_entity(4321)]
        # Markup in a query is text.
        hostile = search(http, federation, '"><script>alert(1)</script>')
        assert "<script>alert" not in hostile.text and "&lt;script&gt;" in hostile.text


def test_logos_are_https_only_and_the_csp_allows_them_only_when_shown(
        federation: Stack) -> None:
    with client(federation) as http:
        page = search(http, federation, "quokka")  # the dev IdP, by its keyword
        empty = http.get(federation.url + "/saml/login")
    assert links(page) == [federation.demo.idp.entity_id]
    assert ('<img src="https://logos.example/demo.png" width="32" height="24" alt=""'
            in page.text)
    assert "insecure.example" not in page.text and "data:image" not in page.text
    assert "img-src 'self' https:;" in page.headers["content-security-policy"]
    assert "img-src 'self';" in empty.headers["content-security-policy"]


def test_discofeed_is_shibboleths_json_computed_once_per_generation(
        federation: Stack) -> None:
    with client(federation) as http:
        feed = http.get(federation.url + "/saml/discofeed")
        assert feed.status_code == 200 and feed.headers["content-type"] == "application/json"
        assert feed.headers["cache-control"] == "public, max-age=300"
        assert feed.headers["access-control-allow-origin"] == "*"  # a DS on another site
        assert "set-cookie" not in feed.headers
        assert feed.headers["content-encoding"] == "gzip"  # httpx asks for it
        entries = feed.json()
        etag = feed.headers["etag"]
        again = http.get(federation.url + "/saml/discofeed",
                         headers={"if-none-match": etag, "accept-encoding": "identity"})
        assert again.status_code == 304 and again.headers["etag"] == etag
        plain = http.get(federation.url + "/saml/discofeed",
                         headers={"accept-encoding": "gzip;q=0"})
        assert "content-encoding" not in plain.headers and plain.json() == entries
        assert len(gzip.compress(plain.content)) < len(plain.content) / 5
    assert len(entries) == USABLE + 1
    by_id = {e["entityID"]: e for e in entries}
    assert by_id[idp_entity(4321)] == {
        "entityID": idp_entity(4321),
        "DisplayNames": [{"value": "University number 4321", "lang": "en"},
                         {"value": "Universität Nummer 4321", "lang": "de"}],
        "Descriptions": [{"value": "Staff and students of University 4321", "lang": "en"}],
        "Keywords": [{"value": "campus4321 research+library", "lang": "en"}],
        "InformationURLs": [{"value": "https://university4321.example/about", "lang": "en"}],
        "Logos": [{"value": "https://university4321.example/logo.png", "height": "60",
                   "width": "80"}],
    }
    dev = by_id[federation.demo.idp.entity_id]
    assert dev["Logos"] == [{"value": "https://logos.example/demo.png", "height": "60",
                             "width": "80"}]  # the http: and data: logos are left out
    assert idp_entity(50) not in by_id  # a skipped (POST-only) entity is not offered


def test_a_member_finds_their_idp_signs_in_and_is_remembered(federation: Stack) -> None:
    stack = federation
    with client(stack) as http:
        first = http.get(stack.url + PAGE)
        assert first.status_code == 302
        sign_in = http.get(urljoin(stack.url, first.headers["location"]))
        assert links(sign_in) == []
        found = http.get(stack.url + "/saml/login",
                         params={"next": PAGE, "q": "alice@demo-members.example"})
        [href] = [html.unescape(h) for h in _LINK.findall(found.text)][:1]
        started = http.get(urljoin(stack.url, href))
        assert started.status_code == 302
        answer = sign_in_at_idp(http, http.get(started.headers["location"]), "alice")
        done = post_to_acs(http, answer)
        assert done.status_code == 302 and done.headers["location"] == PAGE
        assert http.get(stack.url + PAGE).status_code == 200
        # Next time the chosen IdP is offered at once, without a search; other
        # searches still show it first.
        again = http.get(stack.url + "/saml/login", params={"next": PAGE})
        assert links(again) == [stack.demo.idp.entity_id] and "(last used)" in again.text
        other = search(http, stack, "campus4321")
        assert links(other) == [stack.demo.idp.entity_id, idp_entity(4321)]


def test_the_discovery_service_return_still_works_at_scale(tmp_path: Path,
                                                           tls: TLSFiles) -> None:
    def setup(demo: DemoStack) -> None:
        (demo.workdir / "idp_metadata" / "federation.xml").write_text(
            entities(200, certs=1)[0])

    config = '\n[idp]\ndiscovery_url = "https://ds.example.org/ds"\ndiscofeed = false\n'
    with (run_stack(tmp_path, tls, setup=setup, extra_config=config) as stack,
          client(stack) as http):
        sent = http.get(stack.url + "/saml/login", params={"next": PAGE})
        back = parse_qs(urlsplit(sent.headers["location"]).query)["return"][0]
        chosen = http.get(back, params={"idp": idp_entity(7)})
        assert chosen.status_code == 302
        assert chosen.headers["location"].startswith(
            "https://idp7.university7.example/idp/profile/SAML2/Redirect/SSO?")
        # Back without a choice: our own search page (not a loop), whose form keeps
        # ds=1, so searching there does not send the member to the DS again.
        own = http.get(back)
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"',
                                 own.text))
        assert fields == {"next": PAGE, "ds": "1"}
        found = http.get(stack.url + "/saml/login", params={**fields, "q": "campus7"})
        assert links(found)[0] == idp_entity(7)
        assert http.get(stack.url + "/saml/discofeed").status_code == 404  # switched off


@pytest.mark.browser
def test_in_a_browser_search_shows_the_logo_under_the_csp_and_signs_in(
        federation: Stack) -> None:
    stack = federation
    # The logo's host does not exist: the browser context answers it with a 1x1 PNG, so
    # the test sees whether the page's CSP lets the browser load it.
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
                           "z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    with browser_context() as context:
        problems = PageProblems().watch(context)
        context.route("https://logos.example/demo.png",
                      lambda route: route.fulfill(status=200, body=png,
                                                  content_type="image/png"))
        serve_axe(context, stack.url)
        page = context.new_page()
        page.goto(stack.url + PAGE)
        page.wait_for_url(stack.url + "/saml/login?next=**")
        assert page.locator("#idp-list a").count() == 0
        page.get_by_label("Find your organisation").fill("quokka")
        page.keyboard.press("Enter")  # a plain GET form: no script involved
        page.wait_for_url("**q=quokka**")
        logo = page.locator("#idp-list img")
        assert logo.evaluate("img => img.complete && img.naturalWidth") == 1
        assert_accessible(page, "sign-in search")
        page.get_by_role("link", name="Development IdP").click()
        page.wait_for_url(stack.demo.idp.sso_url + "?**")
        idp_sign_in(page, stack, PAGE, "alice")
        assert problems.take() == []


# -- the index itself ------------------------------------------------------------------


def test_metadata_ui_is_read_and_kept_small(tmp_path: Path) -> None:
    (tmp_path / "fed.xml").write_text(entities(3, certs=1)[0])
    registry = IdPRegistry.load_dir(tmp_path)
    idp = registry.get(idp_entity(1))
    assert idp.display_name == "University number 1"
    assert idp.ui.domain_hints == ("university1.example",)
    assert idp.ui.logos == (Logo("https://university1.example/logo.png", 80, 60),)
    assert [str(s) for s in idp.scopes] == ["uni1.ac.example"]
    # An entity without mdui shares one empty UIInfo; its display name is still chosen.
    plain = re.sub(r"<md:Extensions>.*?</md:Extensions>", "", entities(1, certs=1)[0])
    (tmp_path / "fed.xml").write_text(plain)
    bare = IdPRegistry.load_dir(tmp_path).get(idp_entity(0))
    assert bare.display_name == "University 0"  # the OrganizationDisplayName
    assert bare.ui.display_names == (("University 0", "en"),) and bare.ui.logos == ()


def test_the_index_is_rebuilt_only_for_a_new_generation_and_searches_fast() -> None:
    problems: list[str] = []
    root = parse_xml(entities(COUNT, certs=2)[0].encode(), "x", problems)
    registry = IdPRegistry()
    registry.replace_source("fed", idps_from_tree(root, Path("x"), problems, skipped=[]))
    discovery = Discovery(registry, min_age=0)
    catalogue = discovery.catalogue()
    assert discovery.catalogue() is catalogue and len(catalogue) == USABLE
    assert catalogue.feed() is catalogue.feed()  # built once
    times = []
    for _ in range(5):
        started = time.perf_counter()
        catalogue.search("university number 4321", 20)
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.25  # about 10 ms on a loaded 2-core machine
    registry.replace_source("fed", registry.source("fed")[:10])
    assert discovery.catalogue() is not catalogue and len(discovery.catalogue()) == 10
    # Rebuilt at most once every min_age seconds (a visitor can make MDQ add IdPs).
    slow = Discovery(registry, min_age=60)
    first = slow.catalogue()
    registry.replace_source("fed", registry.source("fed")[:5])
    assert slow.catalogue() is first and len(first) == 10
    assert NO_UI.logos == ()


def test_domains_of_a_query_word() -> None:
    assert domains_of("alice@cs.ox.ac.uk") == ["cs.ox.ac.uk", "ox.ac.uk", "ac.uk"]
    assert domains_of("ox.ac.uk.") == ["ox.ac.uk", "ac.uk"]
    assert domains_of("oxford") == [] and domains_of("a..b") == [] and domains_of("@") == []
    assert domains_of("x.y") == ["x.y"]
