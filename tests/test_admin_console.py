"""The admin console in a real Chromium: the admin signs in through the dev IdP, revokes
a member's session (the member's next request is anonymous) and reads why a login
failed; a member without the admin entitlement gets 403."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser import client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import TLSFiles, run_stack
from tests.test_browser_smoke import browser_context, open_to_idp, sign_in

PAGE = "/issues/2023-03/pages/14"
CONSOLE = "/_gateway/admin"

pytestmark = pytest.mark.browser


def test_admin_revokes_a_session_and_reads_a_failure(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, idp_host="localhost") as stack, client(stack) as alice, \
            client(stack) as mallory, browser_context() as context:
        login(alice, stack, PAGE, "alice")
        assert alice.get(stack.url + PAGE).status_code == 200
        assert alice.get(stack.url + CONSOLE).status_code == 403  # not an admin

        answer = sign_in_at_idp(mallory, start_login(mallory, stack, PAGE), "dave")
        failed = post_to_acs(mallory, answer, SAMLResponse="bm90IFNBTUw=")
        assert failed.status_code == 400
        reference = re.search(r"<code>([0-9A-F]{8})</code>", failed.text)
        assert reference is not None

        page = open_to_idp(context, stack, CONSOLE)
        sign_in(page, stack, CONSOLE, "carol")
        expect(page.get_by_role("heading", name="Admin console", level=1)).to_be_visible()
        expect(page.get_by_role("heading", name="Identity providers")).to_be_visible()
        expect(page.get_by_role("cell", name=stack.demo.idp.entity_id)).to_be_visible()

        page.get_by_role("link", name="Sessions").click()
        page.get_by_role("textbox", name="Member ID").fill("M1001")
        page.keyboard.press("Enter")  # the search form works from the keyboard
        expect(page.get_by_role("heading", name="Sessions of M1001")).to_be_visible()
        revoke_all = page.get_by_role("button", name="Revoke all 1 session of M1001")
        revoke_all.focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("status")).to_have_text("1 session ended.")
        expect(page.get_by_text("No live sessions for this member ID.")).to_be_visible()

        anonymous = alice.get(stack.url + PAGE)
        assert anonymous.status_code == 302
        assert anonymous.headers["location"].startswith("/saml/login")

        page.get_by_role("link", name="Login failures").click()
        page.get_by_role("textbox", name="Failure reference").fill(reference.group(1))
        page.keyboard.press("Enter")
        failure = page.get_by_role("article")
        expect(failure).to_have_count(1)
        expect(failure).to_contain_text(reference.group(1))
        expect(failure).to_contain_text("malformed")
        expect(failure).to_contain_text("was not a well-formed SAML Response")
