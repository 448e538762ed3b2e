"""Playwright with Debian's Chromium, and an axe-core audit that works under the pages' CSP.

A missing Chromium or axe-core is a failure, not a skip: ``make test`` installs both
(``apt-get install chromium``; ``npm install --prefix .cache/npm axe-core@4``).

The reader and the gateway send ``script-src 'self'``, so axe-core cannot be injected as
an inline script (``add_script_tag(path=…)`` is refused by the CSP). Instead the context
answers one same-origin URL with the file from ``.cache/npm`` and the page loads it with
``add_script_tag(url=…)`` — the CSP stays on, exactly as members get it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    Route,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

if TYPE_CHECKING:
    from tests.conftest import Stack

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
AXE = ROOT / ".cache" / "npm" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = ROOT / "docs" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT = 15_000
AXE_PATH = "/__test-axe__/axe.min.js"  # answered by the test context, never by a server
BLOCKING_IMPACTS = ("serious", "critical")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Debian Chromium; a missing one is a failure."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing (make test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_context(browser: Browser) -> BrowserContext:
    """A fresh cookie jar; the tests' gateway has a self-signed certificate."""
    context = browser.new_context(ignore_https_errors=True)
    context.set_default_timeout(TIMEOUT)
    return context


@contextmanager
def browser_context() -> Iterator[BrowserContext]:
    """A fresh context in a fresh headless Chromium; a missing Chromium is a failure."""
    with chromium() as browser:
        context = new_context(browser)
        try:
            yield context
        finally:
            context.close()


# -- What went wrong in the page ---------------------------------------------------------

@dataclass
class PageProblems:
    """Script errors, CSP refusals and failed subresources seen in a context's pages.

    Documents answered with 4xx on purpose (an error page, a refused form) are not
    problems; their console line "Failed to load resource" is left out for that reason,
    and subresource failures are caught from the responses instead.
    """

    seen: list[str] = field(default_factory=list)

    def watch(self, context: BrowserContext) -> PageProblems:
        context.on("page", self._watch_page)
        for page in context.pages:
            self._watch_page(page)
        return self

    def _watch_page(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.seen.append(f"page error: {error}"))
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.seen.append(f"console error at {message.location.get('url')}: {message.text}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and response.request.resource_type != "document":
            self.seen.append(f"{response.request.resource_type} {response.url}: "
                             f"HTTP {response.status}")

    def take(self) -> list[str]:
        found, self.seen = self.seen, []
        return found


# -- axe-core ----------------------------------------------------------------------------

def serve_axe(context: BrowserContext, origin: str) -> None:
    """Answer ``origin + AXE_PATH`` with axe-core, so a CSP ``script-src 'self'`` allows it."""
    assert AXE.exists(), (f"{AXE} is missing: run `make test`, or "
                          "`npm install --prefix .cache/npm axe-core@4`")
    source = AXE.read_bytes()

    def fulfil(route: Route) -> None:
        route.fulfill(status=200, body=source, content_type="application/javascript")

    context.route(origin + AXE_PATH, fulfil)


def axe_violations(page: Page) -> list[dict[str, Any]]:
    """Run axe-core (WCAG 2.x A/AA and best practices) on the page as it is now."""
    origin = page.evaluate("location.origin")
    if not page.evaluate("typeof window.axe === 'object'"):
        try:
            page.add_script_tag(url=origin + AXE_PATH)
        except PlaywrightError as exc:  # e.g. serve_axe() not called for this origin
            raise AssertionError(f"could not load axe-core into {page.url}: {exc}") from exc
    found: list[dict[str, Any]] = page.evaluate("""async () => {
        const result = await axe.run(document, {resultTypes: ['violations']});
        return result.violations.map(v => ({
            id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.map(n => ({target: n.target.join(' '), impact: n.impact})),
        }));
    }""")
    return found


def assert_accessible(page: Page, what: str) -> None:
    """Fail on any serious or critical axe-core violation; the message says where."""
    blocking = [v for v in axe_violations(page) if v["impact"] in BLOCKING_IMPACTS]
    assert not blocking, (
        f"axe-core: {len(blocking)} serious/critical violation(s) on the {what} page "
        f"({page.url}):\n" + "\n".join(
            f"  {v['id']} [{v['impact']}] {v['help']}: "
            + json.dumps([n["target"] for n in v["nodes"]]) for v in blocking))


# -- Signing in, moving by keyboard -------------------------------------------------------

def sign_in(context: BrowserContext, stack: Stack, path: str, username: str) -> Page:
    """Open ``path`` anonymously in a new tab and sign in the way a member does: the
    gateway's sign-in page, its "Development IdP" link, the IdP's login form, and the
    IdP's auto-post back; returns the tab, back on ``path``."""
    page = context.new_page()
    page.goto(stack.url + path)
    page.wait_for_url(stack.url + "/saml/login?next=**")
    page.get_by_role("link", name="Development IdP").click()
    page.wait_for_url(stack.demo.idp.sso_url + "?**")
    page.fill("#username", username)
    page.fill("#password", "demo")
    page.click("form:has(#username) button[type=submit]")
    page.wait_for_url(stack.url + path)
    return page


def focused(page: Page) -> str:
    """The focused element, as ``tag#id "text"`` (for assertions and their messages)."""
    described: str = page.evaluate("""() => {
        const el = document.activeElement;
        if (!el || el === document.body) return 'body';
        const text = (el.innerText || el.value || '').trim().slice(0, 40);
        return el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + ' "' + text + '"';
    }""")
    return described


def tab_to(page: Page, selector: str, *, backwards: bool = False, limit: int = 120) -> None:
    """Press Tab (or Shift+Tab) until the element at ``selector`` has the focus."""
    key = "Shift+Tab" if backwards else "Tab"
    for _ in range(limit):
        if page.evaluate("s => document.activeElement === document.querySelector(s)", selector):
            return
        page.keyboard.press(key)
    raise AssertionError(f"{selector} never got the focus with {key} on {page.url} "
                         f"(focus is on {focused(page)})")
