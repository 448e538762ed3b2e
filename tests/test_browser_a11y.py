"""Accessibility of the gateway's and the reader's pages, in a real Chromium.

axe-core (from the npm registry, ``make test`` puts it in ``.cache/npm``) audits every
page a member or visitor meets — also with the form errors shown — and any serious or
critical violation fails. Then the forms are used with the keyboard alone (Tab,
Shift+Tab, Space, Enter and typing; no clicks, no ``fill``), from the sign-in onwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.conftest import Stack
from tests.playwright_support import (
    PageProblems,
    assert_accessible,
    chromium,
    focused,
    new_context,
    serve_axe,
    sign_in,
    tab_to,
)

pytestmark = [pytest.mark.browser, pytest.mark.stack(shared=True, reader=True)]

PAGE = "/issues/2023-03/pages/14"
FREE = "/issues/free-2024/pages/1"
NOTES = "/members/M1001/notes"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


def audited_context(browser: Browser, stack: Stack) -> tuple[BrowserContext, PageProblems]:
    context = new_context(browser)
    serve_axe(context, stack.url)
    return context, PageProblems().watch(context)


@pytest.fixture
def visitor(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A tab in a fresh, anonymous cookie jar."""
    context, problems = audited_context(browser, stack)
    yield context.new_page()
    context.close()
    assert not problems.take(), "\n".join(problems.seen)


@pytest.fixture(scope="module")
def alice_tabs() -> Iterator[dict[str, tuple[Page, PageProblems]]]:
    """The module's signed-in tabs by stack URL, closed (and checked) when it is done."""
    tabs: dict[str, tuple[Page, PageProblems]] = {}
    yield tabs
    for page, problems in tabs.values():
        page.context.close()
        assert not problems.take(), "\n".join(problems.seen)


@pytest.fixture
def alice(browser: Browser, stack: Stack,
          alice_tabs: dict[str, tuple[Page, PageProblems]]) -> Page:
    """One tab for the module, signed in as alice (an active member) with the keyboard
    by the first test that asks for it."""
    if stack.url not in alice_tabs:
        context, problems = audited_context(browser, stack)
        page = context.new_page()
        keyboard_sign_in(page, stack, PAGE, "alice")
        alice_tabs[stack.url] = (page, problems)
    return alice_tabs[stack.url][0]


def keyboard_sign_in(page: Page, stack: Stack, path: str, username: str) -> None:
    page.goto(stack.url + path)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    tab_to(page, "ul.idps a")
    page.keyboard.press("Enter")
    page.wait_for_url(stack.demo.idp.sso_url + "?**")
    tab_to(page, "#username")  # autofocus puts it there already
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type("demo")
    page.keyboard.press("Enter")
    page.wait_for_url(stack.url + path)


# -- axe-core on every page ----------------------------------------------------------------

def register_with_errors(page: Page, stack: Stack) -> None:
    page.goto(stack.url + FREE)
    page.wait_for_url("**/_gateway/register?**")
    page.fill("#email", "not an address")
    page.get_by_role("button", name="Continue to the free issue").click()
    expect(page.locator("#email-error")).to_be_visible()
    expect(page.locator("#consent-error")).to_be_visible()


GATEWAY_PAGES: dict[str, Callable[[Page, Stack], object]] = {
    "sign-in": lambda page, stack: page.goto(stack.url + PAGE),
    "registration": lambda page, stack: page.goto(stack.url + FREE),
    "registration with errors": register_with_errors,
    "error (404)": lambda page, stack: page.goto(stack.url + "/_gateway/no-such-page"),
    "error (sign-in failure)": lambda page, stack: page.goto(
        stack.url + "/saml/login?idp=https%3A%2F%2Fidp.invalid%2F&next=%2F"),
    "lapsed": lambda page, stack: sign_in(page.context, stack, PAGE, "bob"),
    "signed out": lambda page, stack: page.goto(stack.url + "/saml/logout"),
}


@pytest.mark.parametrize("name", GATEWAY_PAGES)
def test_gateway_page_has_no_serious_violations(visitor: Page, stack: Stack, name: str) -> None:
    opened = GATEWAY_PAGES[name](visitor, stack)
    page = opened if isinstance(opened, Page) else visitor
    expect(page.get_by_role("heading", level=1)).to_be_visible()
    assert_accessible(page, name)


def test_the_audit_sees_a_violation(visitor: Page, stack: Stack) -> None:
    """The audit itself works: a nameless button is a critical violation."""
    visitor.goto(stack.url + "/_gateway/no-such-page")
    visitor.evaluate("document.querySelector('main').append(document.createElement('button'))")
    with pytest.raises(AssertionError, match=r'button-name \[critical\].*\["button"\]'):
        assert_accessible(visitor, "test")


def note_saved(page: Page, stack: Stack) -> None:
    page.goto(stack.url + PAGE)
    page.fill("#note-text", "Check the flood mark against the 1883 parish note.")
    page.get_by_role("button", name="Save note").click()
    expect(page.get_by_role("status")).to_contain_text("Note saved.")


def notes_with_a_note(page: Page, stack: Stack) -> None:
    page.goto(stack.url + NOTES)
    if page.locator(".note-list > li").count() == 0:
        note_saved(page, stack)
        page.goto(stack.url + NOTES)
    expect(page.locator(".note-list > li").first).to_be_visible()


def note_edit(page: Page, stack: Stack) -> None:
    notes_with_a_note(page, stack)
    page.locator(".note-list a.button").first.click()
    page.wait_for_url(re.compile(r".*/notes/[^/?]+$"))


def order_with_errors(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "/orders/new")
    page.select_option("#code-0", "BI-2303")
    page.fill("#quantity-0", "0")
    page.fill("#quantity-1", "2")  # and no product for it
    page.uncheck("#same-as-billing")
    page.get_by_role("button", name="Place order").click()
    expect(page.locator("#quantity-0-error")).to_be_visible()
    expect(page.locator("#code-1-error")).to_be_visible()
    expect(page.locator("#delivery-city-error")).to_be_visible()


def search_hits(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "/search?q=weir")
    expect(page.locator("#search-results li").first).to_be_visible()


READER_PAGES: dict[str, Callable[[Page, Stack], object]] = {
    "issue list": lambda page, stack: page.goto(stack.url + "/"),
    "issue page": lambda page, stack: page.goto(stack.url + PAGE),
    "issue page with the note saved": note_saved,
    "notes": notes_with_a_note,
    "note edit": note_edit,
    "order": lambda page, stack: page.goto(stack.url + "/orders/new"),
    "order with errors": order_with_errors,
    "search results": search_hits,
}


@pytest.mark.parametrize("name", READER_PAGES)
def test_reader_page_has_no_serious_violations(alice: Page, stack: Stack, name: str) -> None:
    READER_PAGES[name](alice, stack)
    expect(alice.get_by_role("heading", level=1)).to_be_visible()
    assert_accessible(alice, name)


# -- The keyboard alone ------------------------------------------------------------------------

def retype(page: Page, text: str) -> None:
    """Replace the focused field's text, as a keyboard user does."""
    page.keyboard.press("Control+A")
    page.keyboard.type(text)


def test_registration_by_keyboard(visitor: Page, stack: Stack) -> None:
    page = visitor
    page.goto(stack.url + FREE)
    page.wait_for_url("**/_gateway/register?**")
    tab_to(page, "#email")
    page.keyboard.type("reader.example.org")
    page.keyboard.press("Tab")
    assert focused(page).startswith("input#consent"), focused(page)
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    assert focused(page) == 'button "Continue to the free issue"', focused(page)
    page.keyboard.press("Shift+Tab")
    expect(page.locator("#consent")).to_be_focused()
    expect(page.locator("#consent")).to_be_checked()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")

    expect(page.locator("#email-error")).to_contain_text("Please enter a valid e-mail address")
    expect(page.locator("#email")).to_have_value("reader.example.org")
    tab_to(page, "#email")
    retype(page, "keyboard.reader@example.org")
    page.keyboard.press("Enter")  # the form's own submit button
    page.wait_for_url(stack.url + FREE)
    expect(page.get_by_role("heading", level=1)).to_have_text("From the editors")


def test_notes_by_keyboard(alice: Page, stack: Stack) -> None:
    page = alice
    page.goto(stack.url + PAGE)
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")  # past the header; the note form is after 60 page links
    tab_to(page, "#note-text")
    page.keyboard.type("Typed without a mouse.")
    page.keyboard.press("Tab")
    assert focused(page) == 'button "Save note"', focused(page)
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Note saved.")

    tab_to(page, "#note-form a[href$='/notes']")  # "See all your notes"
    page.keyboard.press("Enter")
    page.wait_for_url(stack.url + NOTES)
    note = page.locator(".note-list > li", has_text="Typed without a mouse.")
    expect(note).to_have_count(1)
    edit = note.locator("a.button")
    tab_to(page, f"a[href='{edit.get_attribute('href')}']")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/notes/[^/?]+$"))
    tab_to(page, "#note-text")
    retype(page, "Edited without a mouse.")
    page.keyboard.press("Tab")
    assert focused(page) == 'button "Save changes"', focused(page)
    page.keyboard.press("Space")
    page.wait_for_url(f"**{NOTES}?done=updated")
    expect(page.get_by_role("status")).to_have_text("Note updated.")

    note = page.locator(".note-list > li", has_text="Edited without a mouse.")
    expect(note).to_have_count(1)
    delete_action = note.locator("form").get_attribute("action")
    tab_to(page, f"form[action='{delete_action}'] button")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{NOTES}?done=deleted")
    expect(page.get_by_role("status")).to_have_text("Note deleted.")
    expect(page.locator(".note-list > li", has_text="without a mouse")).to_have_count(0)


def test_order_by_keyboard(alice: Page, stack: Stack) -> None:
    page = alice
    page.goto(stack.url + "/orders/new")
    tab_to(page, "#code-0")
    page.keyboard.type("BI-2306")  # type-ahead picks the option starting so
    expect(page.locator("#code-0")).to_have_value("BI-2306")
    page.keyboard.press("Tab")
    page.keyboard.type("0")
    page.keyboard.press("Tab")
    page.keyboard.type("BND")
    expect(page.locator("#code-1")).to_have_value("BND-23")
    page.keyboard.press("Tab")
    page.keyboard.type("3")
    page.keyboard.press("Enter")  # the first submit button: "Update totals"

    expect(page.locator("#quantity-0-error")).to_have_text("The quantity must be at least 1.")
    tab_to(page, ".error-summary a[href='#quantity-0']")
    page.keyboard.press("Enter")  # the summary's link takes the focus to the field
    expect(page.locator("#quantity-0")).to_be_focused()
    retype(page, "2")
    page.keyboard.press("Enter")
    expect(page.locator("#order-total")).to_have_text("£49.00")  # 2 at £6.50, 3 at £12.00

    tab_to(page, "#billing-name")
    for text in ("Alice Archer", "3 Towpath Row", "OX1 4RR", "Oxley Reach"):
        page.keyboard.type(text)
        page.keyboard.press("Tab")
    assert focused(page).startswith("input#same-as-billing"), focused(page)
    expect(page.locator("#same-as-billing")).to_be_checked()
    page.keyboard.press("Tab")  # the delivery address is hidden while the box is ticked
    assert focused(page) == 'button "Place order"', focused(page)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/orders/[0-9a-f]{12}$"))
    expect(page.get_by_role("status")).to_contain_text("Your order total is £49.00")
