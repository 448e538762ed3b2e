"""The gateway's pages in German, in a real Chromium: axe-core finds no violation at any
impact level on the sign-in, sign-out and error pages, and the switch on the page turns
an English page German (and back) without JavaScript of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.conftest import Stack
from tests.playwright_support import (
    TIMEOUT,
    PageProblems,
    axe_violations,
    chromium,
    serve_axe,
    sign_in,
)

pytestmark = [pytest.mark.browser, pytest.mark.stack(shared=True, reader=True)]

PAGE = "/issues/2023-03/pages/14"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture
def audited(browser: Browser, stack: Stack) -> Iterator[BrowserContext]:
    """A fresh cookie jar whose browser asks for German (``Accept-Language: de-DE``)."""
    context = browser.new_context(ignore_https_errors=True, locale="de-DE")
    context.set_default_timeout(TIMEOUT)
    serve_axe(context, stack.url)
    problems = PageProblems().watch(context)
    yield context
    context.close()
    assert not problems.take(), "\n".join(problems.seen)


def assert_german_and_clean(page: Page, what: str) -> None:
    """The page is German, and axe-core finds nothing, whatever the impact."""
    expect(page.locator("html")).to_have_attribute("lang", "de")
    expect(page.get_by_role("navigation", name="Sprache")).to_be_visible()
    found = axe_violations(page)
    assert found == [], f"axe-core on the German {what} page ({page.url}):\n" + "\n".join(
        f"  {v['id']} [{v['impact']}] {v['help']}: {[n['target'] for n in v['nodes']]}"
        for v in found)


def test_the_sign_in_page_in_german(audited: BrowserContext, stack: Stack) -> None:
    page = audited.new_page()
    page.goto(stack.url + PAGE)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    expect(page).to_have_title("Anmelden · Mitgliederzugang")
    assert_german_and_clean(page, "sign-in")


@pytest.mark.parametrize("path, heading", [
    ("/_gateway/no-such-page", "Nicht gefunden"),
    ("/issues/a%2Fb", "Adresse nicht akzeptiert"),
    ("/saml/login?idp=https%3A%2F%2Fidp.invalid%2F&next=%2F", "Unbekannter Identitätsanbieter"),
])
def test_error_pages_in_german(audited: BrowserContext, stack: Stack, path: str,
                               heading: str) -> None:
    page = audited.new_page()
    page.goto(stack.url + path)
    expect(page.get_by_role("heading", level=1)).to_have_text(heading)
    assert_german_and_clean(page, "error")


def test_signing_out_in_german(audited: BrowserContext, stack: Stack) -> None:
    page = sign_in(audited, stack, PAGE, "alice")
    page.goto(stack.url + "/saml/logout")
    expect(page.get_by_role("heading", level=1)).to_have_text("Abmelden")
    assert_german_and_clean(page, "sign-out")
    page.get_by_role("button", name="Abmelden").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sie sind abgemeldet")
    assert_german_and_clean(page, "signed-out")


def test_the_switch_on_the_page_changes_the_language(browser: Browser, stack: Stack) -> None:
    context = browser.new_context(ignore_https_errors=True, locale="en-GB")
    context.set_default_timeout(TIMEOUT)
    try:
        page = context.new_page()
        page.goto(stack.url + "/_gateway/no-such-page?from=test")
        expect(page.locator("html")).to_have_attribute("lang", "en")
        expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
        page.get_by_role("navigation", name="Language").get_by_role(
            "link", name="Deutsch").click()
        page.wait_for_url(stack.url + "/_gateway/no-such-page?from=test")
        expect(page.locator("html")).to_have_attribute("lang", "de")
        expect(page.get_by_role("heading", level=1)).to_have_text("Nicht gefunden")
        # remembered: another page in the same browser is German too
        page.goto(stack.url + "/saml/logout")
        expect(page.locator("html")).to_have_attribute("lang", "de")
        page.get_by_role("navigation", name="Sprache").get_by_role(
            "link", name="English").click()
        page.wait_for_url(stack.url + "/saml/logout")
        expect(page.locator("html")).to_have_attribute("lang", "en")
        expect(page.get_by_role("heading", level=1)).to_have_text("You are signed out")
    finally:
        context.close()
