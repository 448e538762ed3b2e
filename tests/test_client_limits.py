"""Per-client limits that one client cannot dodge, and that nobody can spend for another.

* A client is counted by its network, not its exact address: an IPv6 client by its /64
  (a subscriber gets a whole /64 and may use any address in it), an IPv4-mapped IPv6
  address as the IPv4 address.
* A sign-in start must be a top-level navigation: an image or a fetch that a web page
  fires from a visitor's browser is refused before it is counted or stored, so it cannot
  spend the limit of everyone behind that visitor's address.
* ACS posts have their own counter, and a post that answers a sign-in this browser
  started (binding cookie, pending state) is not counted at all: a failed one consumes the
  pending state, so it cannot be repeated for free.
* The whole gateway keeps at most ``[limits] pending_logins`` sign-ins in progress.

Real stack over HTTP (gateway, dev IdP, echo upstream), as in ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from urllib.parse import quote

import pytest

from gateway.demo.stack import DemoStack
from gateway.rate_limits import client_key
from tests.browser import client, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import Stack

PAGE = "/issues/2023-03/pages/14"
IMAGE = {"sec-fetch-dest": "image", "sec-fetch-mode": "no-cors", "sec-fetch-site": "cross-site"}


def limits(**values: int) -> str:
    merged = {"logins": 30, "registrations": 100000, "logouts": 100000, **values}
    return "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in merged.items())


def trusting(address: str) -> Callable[[DemoStack], None]:
    def setup(demo: DemoStack) -> None:
        toml = demo.workdir / "gateway.toml"
        toml.write_text(f'trusted_proxies = ["{address}"]\n' + toml.read_text())
    return setup


def rows(stack: Stack, prefix: str) -> int:
    with sqlite3.connect(stack.db) as db:
        return int(db.execute("SELECT count(*) FROM once WHERE key LIKE ?",
                              (prefix + "%",)).fetchone()[0])


def start_url(stack: Stack) -> str:
    return f"{stack.url}/saml/login?idp={quote(stack.demo.idp.entity_id, safe='')}&next={PAGE}"


# -- the key of a client ----------------------------------------------------------------------

@pytest.mark.parametrize(("address", "key"), [
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:1:2", "2001:db8::/64"),
    ("2001:DB8:0:0:1::7", "2001:db8::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("2002:c633:6407::1", "198.51.100.7"),  # 6to4: the IPv4 address it is built on
    ("198.51.100.7", "198.51.100.7"),
    ("unknown", "unknown"),
    ("victim@example.org", "victim@example.org"),  # the mail limit's key is no address
])
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


@pytest.mark.stack(extra_config=limits(), setup=trusting("127.0.0.1"))
def test_an_ipv6_slash_64_is_one_client(stack: Stack) -> None:
    with client(stack) as http:
        codes = [http.get(start_url(stack), headers={"x-forwarded-for": f"2001:db8::{i:x}"}
                          ).status_code for i in range(1, 32)]
        other_net = http.get(start_url(stack), headers={"x-forwarded-for": "2001:db8:0:1::1"})
        ipv4 = [http.get(start_url(stack), headers={"x-forwarded-for": "198.51.100.7"}
                         ).status_code for _ in range(30)]
        mapped = http.get(start_url(stack), headers={"x-forwarded-for": "::ffff:198.51.100.7"})
    assert codes == [302] * 30 + [429]
    assert other_net.status_code == 302  # the next /64 is someone else
    assert ipv4 == [302] * 30 and mapped.status_code == 429
    assert rows(stack, "authn:") == 61  # the refused starts stored nothing
    assert rows(stack, "count:rate:logins:2001:db8::") == 1  # one counter for the whole /64


# -- sign-in starts that are no navigation ----------------------------------------------------

@pytest.mark.stack(extra_config=limits())
def test_image_starts_cannot_spend_a_members_sign_in(stack: Stack) -> None:
    with client(stack) as member, client(stack) as page:
        junk = [page.get(start_url(stack), headers=IMAGE) for _ in range(30)]
        fetch = page.get(start_url(stack), headers={"sec-fetch-mode": "cors",
                                                    "sec-fetch-dest": "empty"})
        prefetch = page.get(start_url(stack), headers={"sec-fetch-mode": "navigate",
                                                       "sec-fetch-dest": "document",
                                                       "sec-purpose": "prefetch"})
        assert rows(stack, "authn:") == 0 and rows(stack, "count:rate:logins") == 0
        answer = sign_in_at_idp(member, start_login(member, stack, PAGE), "alice")
        done = post_to_acs(member, answer)
        assert done.status_code == 302, done.text
        assert member.get(stack.url + PAGE).status_code == 200
    assert {r.status_code for r in junk} == {400} and "<h1>" in junk[0].text
    assert fetch.status_code == 400 and prefetch.status_code == 400
    assert stack.session_count() == 1


@pytest.mark.stack(extra_config=limits())
def test_a_neighbour_cannot_spend_a_members_acs(stack: Stack) -> None:
    """The same address (a NAT): starts and junk ACS posts up to both limits, then the
    member's answer from the IdP still gets in, as it answers the member's own start."""
    with client(stack) as member, client(stack) as neighbour:
        answer = sign_in_at_idp(member, start_login(member, stack, PAGE), "alice")
        starts = [neighbour.get(start_url(stack)).status_code for _ in range(31)]
        posts = [neighbour.post(stack.url + "/saml/acs", data={"SAMLResponse": "x"}
                                ).status_code for _ in range(31)]
        done = post_to_acs(member, answer)
    assert starts == [302] * 29 + [429] * 2  # the member's start was the first of 30
    assert posts == [400] * 30 + [429]
    assert done.status_code == 302, done.text
    assert stack.session_count() == 1


@pytest.mark.stack(extra_config=limits(logins=5))
def test_a_failed_acs_post_consumes_its_sign_in(stack: Stack) -> None:
    """The binding cookie lets an ACS post skip the limit once: the refusal takes the
    pending state, and the next post with that cookie counts as any other."""
    with client(stack) as http:
        answer = sign_in_at_idp(http, start_login(http, stack, PAGE), "alice")
        junk = "PHNhbWxwOlJlc3BvbnNlLz4="  # <samlp:Response/>
        codes = [post_to_acs(http, answer, SAMLResponse=junk).status_code for _ in range(7)]
        late = post_to_acs(http, answer)
    assert codes == [400] * 6 + [429]  # the first was not counted; then 5 a minute
    assert late.status_code == 429
    assert rows(stack, "authn:") == 0 and stack.session_count() == 0


# -- pending sign-ins of the whole gateway ---------------------------------------------------

@pytest.mark.stack(extra_config=limits(pending_logins=3))
def test_pending_sign_ins_are_capped(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with client(stack) as member, client(stack) as other:
        idp_page = start_login(member, stack, PAGE)
        more = [other.get(start_url(stack)).status_code for _ in range(2)]
        with caplog.at_level(logging.WARNING, logger="gateway"):
            full = other.get(start_url(stack))
        assert rows(stack, "authn:") == 3
        done = post_to_acs(member, sign_in_at_idp(member, idp_page, "alice"))
        again = other.get(start_url(stack))
    assert more == [302, 302]
    assert full.status_code == 503 and "set-cookie" not in full.headers
    assert "Sign-in is temporarily unavailable" in full.text
    assert any("3 sign-ins in progress" in r.getMessage() for r in caplog.records)
    assert done.status_code == 302 and again.status_code == 302  # a place came free


@pytest.mark.stack(extra_config=limits(pending_logins=1))
def test_passive_sign_in_over_the_cap_goes_back_quietly(stack: Stack) -> None:
    """The one IdP is tried passively, but no place is free: back, as when over the limit."""
    with client(stack) as http, client(stack) as other:
        assert other.get(start_url(stack)).status_code == 302
        back = http.get(f"{stack.url}/saml/login?passive=1&next={quote(PAGE, safe='')}")
    assert back.status_code == 302 and back.headers["location"].endswith(PAGE)
