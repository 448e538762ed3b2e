"""The sample reader behind the gateway, used the way members use it, in a real Chromium.

One demo stack (gateway over https, dev IdP, the real reader) and one Chromium serve
the whole module; every test has its own cookie jar. Each context also fails the test
on a script error, a CSP refusal or a failed stylesheet/script/fetch.

The test run also writes the README's screenshots (``docs/screenshots/``), with the
text that changes between runs (times) replaced first, so they only change when the
pages do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.conftest import Stack
from tests.playwright_support import (
    SCREENSHOTS,
    PageProblems,
    chromium,
    new_context,
    sign_in,
)

pytestmark = [pytest.mark.browser, pytest.mark.stack(shared=True, reader=True)]

PAGE = "/issues/2023-03/pages/14"  # member-only
FREE = "/issues/free-2024/pages/1"  # behind the registration gate
MEMBER_WORD = "spokeshave"  # only in the member-only issue 2023-09 (gateway/demo/content.py)
NONSENSE = "qwxzvpt"
NOTES = "/members/M1001/notes"  # alice's


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh cookie jar; script errors, CSP refusals and failed subresources fail it."""
    jar = new_context(browser)
    problems = PageProblems().watch(jar)
    yield jar
    jar.close()
    assert not problems.take(), "\n".join(problems.seen)


def pence(money: str) -> int:
    match = re.fullmatch(r"£(\d+)\.(\d\d)", money.strip())
    assert match, f"not a price: {money!r}"
    return int(match[1]) * 100 + int(match[2])


def search(page: Page, query: str) -> str:
    """Search from the search page as typed; returns the status line once answered.

    The status line's every text is recorded, so the "Searching…" state is seen even
    when the answer is quicker than a poll.
    """
    page.fill("#q", query)
    page.evaluate("""() => {
        const status = document.getElementById('search-status');
        window.statusTexts = [];
        new MutationObserver(() => window.statusTexts.push(status.textContent.trim()))
            .observe(status, {childList: true, characterData: true, subtree: true});
    }""")
    page.get_by_role("button", name="Search", exact=True).click()
    status = page.locator("#search-status")
    expect(status).to_contain_text(f"for “{query}”")
    seen: list[str] = page.evaluate("window.statusTexts")
    assert seen[0] == "Searching…", seen
    assert page.url.endswith("/search?q=" + query)
    return status.inner_text()


def test_member_signs_in_reads_searches_and_signs_out(context: BrowserContext,
                                                      stack: Stack) -> None:
    page = context.new_page()
    page.goto(stack.url + PAGE)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    expect(page).to_have_title("Sign in · Member access")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to read")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "sign-in.png"), full_page=True)

    page.get_by_role("link", name="Development IdP").click()
    page.wait_for_url(stack.demo.idp.sso_url + "?**")
    page.fill("#username", "alice")
    page.fill("#password", "demo")
    page.click("form:has(#username) button[type=submit]")
    page.wait_for_url(stack.url + PAGE)  # the IdP's page posts back, the gateway redirects
    expect(page.locator("header.site .who")).to_have_text("Signed in as Alice Archer")
    expect(page.locator(".kicker")).to_contain_text("Page 14 of 60")
    expect(page.locator("nav[aria-label=Pages] a[aria-current=page]")).to_have_text("Page 14")
    page.screenshot(path=str(SCREENSHOTS / "issue-page.png"))
    sessions = stack.session_count()

    page.get_by_role("link", name="Search", exact=True).click()
    page.wait_for_url(stack.url + "/search")
    assert re.fullmatch(r"\d+ results? for “spokeshave”\.", search(page, MEMBER_WORD))
    hits = page.locator("#search-results li a")
    assert hits.count() > 0
    assert all(href.startswith("/issues/2023-09/pages/")
               for href in hits.evaluate_all("links => links.map(a => a.getAttribute('href'))"))
    hits.first.click()
    expect(page.locator("article.reading")).to_contain_text(MEMBER_WORD)
    page.go_back()
    page.wait_for_url("**/search?q=" + MEMBER_WORD)
    page.goto(stack.url + "/search")
    assert search(page, NONSENSE) == f"No results for “{NONSENSE}”."
    expect(page.locator("#search-results li")).to_have_count(0)

    page.get_by_role("link", name="Sign out").click()
    page.wait_for_url(stack.url + "/saml/logout")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign out")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("You are signed out")
    assert stack.session_count() == sessions - 1

    page.goto(stack.url + PAGE)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to read")
    page.goto(stack.url + "/search")  # anonymous again: the member-only issue is not searched
    assert search(page, MEMBER_WORD) == f"No results for “{MEMBER_WORD}”."


def test_member_creates_edits_and_deletes_a_note(context: BrowserContext,
                                                 stack: Stack) -> None:
    page = sign_in(context, stack, PAGE, "alice")
    title = page.get_by_role("heading", level=1).inner_text()
    page.fill("#note-text", "Ask the lock keeper about the 1947 flood mark.")
    page.get_by_role("button", name="Save note").click()
    page.wait_for_url(f"**{PAGE}?note=saved#note-form")
    expect(page.get_by_role("status")).to_contain_text("Note saved.")

    page.get_by_role("link", name="See all your notes").click()
    page.wait_for_url(stack.url + NOTES)
    notes = page.locator(".note-list > li")
    expect(notes).to_have_count(1)
    expect(notes.get_by_role("heading", level=2)).to_have_text(title)
    expect(notes.locator(".note-text")).to_have_text(
        "Ask the lock keeper about the 1947 flood mark.")
    # The one text that changes between runs; the README's picture should not.
    page.locator(".note-list .meta").evaluate_all(
        "els => els.forEach(el => { el.textContent = 'Written 14 March 2024, 09:30 UTC' })")
    page.screenshot(path=str(SCREENSHOTS / "notes.png"), full_page=True)

    page.get_by_role("link", name=f"Edit the note on “{title}”").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Edit note")
    expect(page.locator("#note-text")).to_have_value(
        "Ask the lock keeper about the 1947 flood mark.")
    page.fill("#note-text", "The flood mark is on the mill race wall, not the weir.")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(f"**{NOTES}?done=updated")
    expect(page.get_by_role("status")).to_have_text("Note updated.")
    expect(notes.locator(".note-text")).to_have_text(
        "The flood mark is on the mill race wall, not the weir.")
    expect(notes.locator(".meta")).to_contain_text("edited")

    page.get_by_role("button", name=f"Delete the note on “{title}”").click()
    page.wait_for_url(f"**{NOTES}?done=deleted")
    expect(page.get_by_role("status")).to_have_text("Note deleted.")
    expect(notes).to_have_count(0)
    expect(page.locator(".empty")).to_contain_text("You have no notes yet.")


def row_prices(page: Page, index: int) -> tuple[int, int]:
    """The item price and line price the page shows for basket row ``index``."""
    row = page.locator(f"tr:has(#code-{index})")
    return (pence(row.locator("td[data-label='Item price']").inner_text()),
            pence(row.locator("td[data-label='Line price']").inner_text()))


def test_member_orders_back_issues(context: BrowserContext, stack: Stack) -> None:
    page = sign_in(context, stack, "/orders/new", "alice")
    expect(page.locator("#no-items")).to_have_text("No items")
    expect(page.locator("#order-total")).to_have_text("£0.00")

    update = page.get_by_role("button", name="Update totals")
    page.select_option("#code-0", "BI-2303")
    for typed, message in (("0", "The quantity must be at least 1."),
                           ("25", "You can order at most 20 of each item.")):
        page.fill("#quantity-0", typed)
        update.click()
        expect(page.get_by_role("alert")).to_contain_text(message)
        field = page.locator("#quantity-0")
        expect(field).to_have_value(typed)  # kept as typed
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_attribute("aria-describedby", "quantity-0-error")
        cell = page.locator("td:has(#quantity-0)")  # the message sits next to the field
        expect(cell.locator("#quantity-0-error")).to_have_text(message)
        expect(page.locator("#code-0")).to_have_value("BI-2303")
        expect(page.locator("#order-total")).to_have_text("£0.00")

    page.fill("#quantity-0", "2")
    page.select_option("#code-1", "BND-23")
    page.fill("#quantity-1", "3")
    update.click()
    expect(page.get_by_role("alert")).to_have_count(0)
    expect(page.locator("#no-items")).to_have_count(0)
    (price_0, line_0), (price_1, line_1) = row_prices(page, 0), row_prices(page, 1)
    assert (line_0, line_1) == (2 * price_0, 3 * price_1)
    total = 2 * price_0 + 3 * price_1
    assert total == 2 * 650 + 3 * 1200  # the catalogue's prices (gateway/demo/orders.py)
    expect(page.locator("#order-total")).to_have_text(f"£{total // 100}.{total % 100:02d}")

    expect(page.locator("#same-as-billing")).to_be_checked()
    expect(page.locator("#delivery")).to_be_hidden()
    for name, value in (("name", "Alice Archer"), ("street", "3 Towpath Row"),
                        ("postcode", "OX1 4RR"), ("city", "Oxley Reach")):
        page.fill(f"#billing-{name}", value)
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(r".*/orders/[0-9a-f]{12}$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"Order \w+ is placed"))
    shown = f"£{total // 100}.{total % 100:02d}"
    expect(page.get_by_role("status")).to_contain_text(f"Your order total is {shown}")
    expect(page.locator("#order-total")).to_have_text(shown)
    expect(page.locator("address").first).to_contain_text("3 Towpath Row")


def test_lapsed_member_sees_the_lapsed_page(context: BrowserContext, stack: Stack) -> None:
    page = sign_in(context, stack, PAGE, "bob")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your membership has lapsed")
    expect(page.locator("main")).to_contain_text("Bob Baker")
    expect(page.locator("article.reading")).to_have_count(0)


def test_visitor_registers_and_reads_the_free_issue(context: BrowserContext,
                                                    stack: Stack) -> None:
    page = context.new_page()
    page.goto(stack.url + FREE)
    page.wait_for_url(stack.url + "/_gateway/register?next=**")
    expect(page.get_by_role("heading", level=1)).to_have_text("Read the free issue")

    page.fill("#email", "reader at example dot org")
    page.check("#consent")
    page.get_by_role("button", name="Continue to the free issue").click()
    expect(page.locator("#email-error")).to_contain_text(
        "Please enter a valid e-mail address")
    expect(page.get_by_role("alert")).to_contain_text("Please enter a valid e-mail address")
    expect(page.locator("#email")).to_have_value("reader at example dot org")
    expect(page.locator("#email")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#consent")).to_be_checked()
    assert "/issues/" not in page.url

    page.fill("#email", "reader@example.org")
    page.get_by_role("button", name="Continue to the free issue").click()
    page.wait_for_url(stack.url + FREE)
    expect(page.locator(".kicker")).to_contain_text("Free issue 2024")
    expect(page.get_by_role("heading", level=1)).to_have_text("From the editors")
    page.get_by_role("link", name="Page 2", exact=True).click()
    page.wait_for_url(stack.url + "/issues/free-2024/pages/2")
    page.goto(stack.url + PAGE)  # a registered reader is no member: sign in for this one
    page.wait_for_url(stack.url + "/saml/login?next=**")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to read")


def test_screenshots_are_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in ("sign-in.png", "issue-page.png", "notes.png"):
        assert f"docs/screenshots/{name}" in readme, name
