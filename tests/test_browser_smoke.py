"""Smoke tests in a real Chromium (Playwright, Debian's /usr/bin/chromium).

What only a browser can show: the IdP's auto-POST back to /saml/acs is a cross-site
POST, so the login-binding cookie must survive it (``SameSite=None; Secure``), while the
session cookie itself stays ``SameSite=Lax``; two tabs can log in at the same time with
one cookie jar; the pages render with their CSS under their CSP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, Request

from tests.conftest import Stack, TLSFiles, run_stack
from tests.playwright_support import SCREENSHOTS, browser_context

PAGE_A = "/issues/2023-03/pages/14"
PAGE_B = "/issues/2023-06/pages/2"

pytestmark = pytest.mark.browser


def open_to_idp(context: BrowserContext, stack: Stack, path: str) -> Page:
    """Open a gated page in a new tab; from the gateway's sign-in page, go to the IdP."""
    page = context.new_page()
    page.goto(stack.url + path)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    assert page.title().startswith("Sign in")
    page.get_by_role("link", name="Development IdP").click()
    page.wait_for_url(stack.demo.idp.sso_url + "?**")
    assert "DEVELOPMENT ONLY" in page.content()
    return page


def sign_in(page: Page, stack: Stack, path: str, username: str) -> None:
    """Sign in with the form (shown even when 'Continue as …' is offered too)."""
    page.fill("#username", username)
    page.fill("#password", password_of(page))
    page.click("form:has(#username) button[type=submit]")
    page.wait_for_url(stack.url + path)  # the IdP's page auto-posts to the ACS


def password_of(page: Page) -> str:
    """The demo password, as the login page itself tells it."""
    return page.locator("section[aria-labelledby=users-heading] p code").inner_text()


def test_two_tabs_log_in_across_sites(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, idp_host="localhost") as stack, browser_context() as context:
        assert stack.demo.idp.sso_url.startswith("http://localhost:")
        assert stack.url.startswith("https://127.0.0.1:")
        requests: list[Request] = []
        context.on("request", lambda request: requests.append(request))
        tab_a = open_to_idp(context, stack, PAGE_A)
        tab_b = open_to_idp(context, stack, PAGE_B)  # two outstanding AuthnRequests
        logins = [c for c in context.cookies(stack.url + "/saml/acs")
                  if c["name"].startswith("__Secure-gw-login-")]
        assert [(c["sameSite"], c["secure"], c["path"]) for c in logins] == [
            ("None", True, "/saml/")] * 2

        sign_in(tab_b, stack, PAGE_B, "alice")
        assert "Upstream page " + PAGE_B in tab_b.content()
        sign_in(tab_a, stack, PAGE_A, "alice")
        assert "Upstream page " + PAGE_A in tab_a.content()
        assert "Alice Archer" in tab_a.content()

        acs_posts = [r.all_headers() for r in requests if r.url == stack.url + "/saml/acs"]
        assert [h.get("sec-fetch-site") for h in acs_posts] == ["cross-site"] * 2
        assert all("__Secure-gw-login-" in h.get("cookie", "") for h in acs_posts)
        cookies = {c["name"]: c for c in context.cookies(stack.url + "/saml/acs")}
        session = cookies["__Host-gw_session"]
        assert (session["sameSite"], session["secure"], session["httpOnly"]) == ("Lax", True, True)
        assert session["path"] == "/"
        assert [n for n in cookies if n.startswith("__Secure-gw-login-")] == []
        assert stack.session_count() == 2

        tab_b.reload()  # the Lax session cookie is sent on the tab's own navigation
        assert "Upstream page " + PAGE_B in tab_b.content()


def test_plain_http_demo_member_and_lapsed(tmp_path: Path, tls: TLSFiles) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with run_stack(tmp_path, tls, gateway_tls=False) as stack:
        assert stack.url.startswith("http://127.0.0.1:")
        with browser_context() as context:
            page = open_to_idp(context, stack, PAGE_A)
            sign_in(page, stack, PAGE_A, "alice")
            assert "Upstream page " + PAGE_A in page.content()
            names = {c["name"]: c for c in context.cookies(stack.url + "/saml/acs")}
            assert names["gw_session"]["sameSite"] == "Lax"
            assert not [n for n in names if n.startswith("gw-login-")]

        with browser_context() as context:
            page = open_to_idp(context, stack, PAGE_A)
            # The docs show `make demo`'s fixed port, not this run's random one (no churn).
            page.get_by_text(stack.url + "/saml/metadata").evaluate(
                "el => { el.textContent = 'http://127.0.0.1:8000/saml/metadata' }")
            page.screenshot(path=str(SCREENSHOTS / "idp-login.png"), full_page=True)
            sign_in(page, stack, PAGE_A, "bob")
            assert page.get_by_role("heading").first.inner_text() == "Your membership has lapsed"
            assert "Bob Baker" in page.content()
            css = page.evaluate("getComputedStyle(document.querySelector('main')).maxWidth")
            assert css != "none", "gateway.css did not apply"
            page.screenshot(path=str(SCREENSHOTS / "lapsed.png"), full_page=True)
        issues = [r["path"] for r in stack.upstream.requests if r["path"].startswith("/issues/")]
        assert issues == [PAGE_A]  # alice's; bob's login reached nothing upstream
        assert stack.session_count() == 2
