"""A kept form is sent again only to the member whose session posted it (review 4, stash).

A form posted after a session ended (or before a step-up) is kept across the sign-in. The
kept form names the subject of the session that posted it, and the replay page gives it
only to a session of that same subject. Otherwise a signed stash cookie obtained by one
member (Mallory, with a client that sets ``Origin`` freely) and planted in another
member's browser would make that browser send Mallory's fields under Alice's session, and
on a shared browser member A's form would be sent as member B. Real gateway, IdP and
upstream over loopback HTTPS.
"""

from __future__ import annotations

import logging
import sqlite3
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from tests.browser import client, follow_sign_in, login, post_to_acs, sign_in_at_idp
from tests.conftest import Stack
from tests.test_hostile_store import (
    PAGE,
    SESSION,
    from_address,
    idle_out,
    once_rows,
    plain_sign_in_answer,
    post_form,
    stale_cookie,
)
from tests.test_step_up import RULES

pytestmark = pytest.mark.stack(extra_config=RULES)  # /mfa/** needs a step-up

NOT_YOURS = "This form was kept for another account, so it was not sent."


def stash_binding(answer: httpx.Response) -> tuple[str, str]:
    """The kept-form cookie the gateway set with a 303: its name and value."""
    for cookie in answer.headers.get_list("set-cookie"):
        name, _, rest = cookie.partition("=")
        if name.endswith("gw-stash"):
            return name, rest.split(";")[0]
    raise AssertionError("no kept-form cookie was set")


def stash_path(answer: httpx.Response) -> str:
    path = parse_qs(urlsplit(answer.headers["location"]).query)["next"][0]
    assert path.startswith("/_gateway/replay/")
    return path


def refused_for_another_member(answer: httpx.Response) -> bool:
    return (answer.status_code == 403 and NOT_YOURS in answer.text
            and "<form" not in answer.text and "xxxx" not in answer.text)


def keep_as_mallory(stack: Stack, *, step_up: bool) -> tuple[str, str, str]:
    """Mallory (the demo's bob) gets a form of hers kept, with a client that claims the
    site's own ``Origin``: after her session idled out, or (``step_up``) before a step-up
    of her live session. Returns the replay path and the stash cookie's name and value."""
    with from_address(stack, "127.0.0.3") as mallory:
        if step_up:
            login(mallory, stack, PAGE, "bob")
            kept = mallory.post(stack.url + "/mfa/settings", content=b"limit=xxxx",
                                headers={"origin": stack.url, "content-type":
                                         "application/x-www-form-urlencoded"})
        else:
            kept = post_form(mallory, stack, stale_cookie(stack, mallory, "bob"),
                             headers={"origin": stack.url})
    assert kept.status_code == 303, kept.text
    return (stash_path(kept), *stash_binding(kept))


@pytest.mark.parametrize("step_up", [False, True], ids=["idled", "step-up"])
def test_a_planted_stash_cookie_sends_nothing_for_another_member(
        stack: Stack, step_up: bool, caplog: pytest.LogCaptureFixture) -> None:
    path, name, value = keep_as_mallory(stack, step_up=step_up)
    with caplog.at_level(logging.WARNING, logger="gateway"), client(stack) as alice:
        login(alice, stack, PAGE, "alice")
        # Planted by a sibling subdomain, or on an http deployment, or any cookie injection.
        alice.cookies.set(name, value)
        answer = alice.get(stack.url + path)
        assert refused_for_another_member(answer), (answer.status_code, answer.text[:300])
        cleared = [c for c in answer.headers.get_list("set-cookie") if c.startswith(name + "=")]
        assert cleared and "Max-Age=0" in cleared[0]
        # Single use: dropped, so Mallory cannot have it sent anywhere later either.
        assert once_rows(stack, "stash:") == 0
        assert alice.get(stack.url + path).status_code == 404
    assert [r.getMessage() for r in caplog.records
            if "kept for another member" in r.getMessage()]
    assert all(r["method"] != "POST" for r in stack.upstream.requests)


def test_on_a_shared_browser_a_form_is_not_sent_as_the_next_member(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        idle_out(stack)
        posted = post_form(http, stack, None)  # alice's stale cookie is still in the jar
        assert posted.status_code == 303
        path = stash_path(posted)
        # Someone else signs in on that browser.
        done = post_to_acs(http, sign_in_at_idp(
            http, follow_sign_in(http, stack, posted.headers["location"]), "bob"))
        assert done.headers["location"] == path
        answer = http.get(stack.url + path)
        assert refused_for_another_member(answer), (answer.status_code, answer.text[:300])
        assert once_rows(stack, "stash:") == 0
    assert all(r["method"] != "POST" for r in stack.upstream.requests)


def test_the_same_member_gets_the_form_back(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        idle_out(stack)
        posted = post_form(http, stack, None)
        done = post_to_acs(http, sign_in_at_idp(
            http, follow_sign_in(http, stack, posted.headers["location"]), "alice"))
        answer = http.get(urljoin(stack.url, done.headers["location"]))
    assert answer.status_code == 200 and "Sending your form" in answer.text
    assert "xxxx" in answer.text


def test_an_ended_marker_that_names_nobody_keeps_nothing(stack: Stack) -> None:
    """A session that idled out under an older version left a marker without a subject:
    its cookie still gets the sign-in, but no form is kept for an unknown member."""
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies[SESSION]
        idle_out(stack)
        assert http.get(stack.url + PAGE).status_code == 302  # ends it: the marker is made
        with sqlite3.connect(stack.db) as db:
            assert db.execute("UPDATE once SET value = 'idle' WHERE key LIKE 'ended:%'"
                              ).rowcount == 1
        http.cookies.clear()
        answer = post_form(http, stack, cookie)
    assert plain_sign_in_answer(answer)
    assert once_rows(stack, "stash:") == 0
