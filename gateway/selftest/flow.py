"""What every self-test case shares: the gateway as discovered, and the login steps.

A case starts a real login (``begin``: GET ``/saml/login?idp=…&next=…`` answers a 302 to
the IdP whose query holds the deflated AuthnRequest — its ID is what a Response must
answer — and the opaque RelayState, and sets the browser's binding cookie), then posts
a forged or genuine Response to the ACS from the same browser, as the IdP's auto-post
form would.
"""

from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from gateway.devidp.response import new_id
from gateway.selftest.client import Answer, Browser, Target
from gateway.selftest.deployment import Deployment
from gateway.selftest.forge import Forge, encode, parse

_CSRF = re.compile(r'name="csrf"\s+value="([^"]+)"')


class CaseError(Exception):
    """A step of a case went wrong before the attack could be judged."""


@dataclass(frozen=True)
class Context:
    """The gateway under test and the forgers: ``attacker`` holds a throwaway key;
    ``idp`` (only with ``--idp-key``) signs as the real IdP. ``deployment`` holds the
    names the deployment uses (its config with ``--config``, else the defaults);
    ``public_path`` is a path anyone may open, ``echo_path`` (optional) one whose answer
    shows the request headers the upstream got. ``shared`` is what cases share within
    one run (the test member's session, the forward-auth headers found)."""

    target: Target
    idp_entity_id: str
    sp_entity_id: str
    acs_url: str
    gated_path: str
    attacker: Forge
    idp: Forge | None
    deployment: Deployment = field(default_factory=Deployment)
    public_path: str = "/"
    echo_path: str | None = None
    shared: dict[str, Any] = field(default_factory=dict, compare=False)

    def browser(self) -> Browser:
        return Browser(self.target)

    @property
    def acs_path(self) -> str:
        return urlsplit(self.acs_url).path or "/saml/acs"

    @property
    def session_cookie(self) -> str:
        """The gateway's session cookie name, as a browser holds it."""
        return self.deployment.session_cookie(self.target.url.startswith("https:"))

    def member(self) -> Browser:
        """A browser holding a live session of the test member, signed in once per run
        with the IdP's key (only with ``--idp-key``); ``end_member`` signs it out."""
        browser = self.shared.get("member")
        if isinstance(browser, Browser):
            return browser
        if self.idp is None:
            raise CaseError("needs --idp-key and --idp-cert")
        browser = self.browser()
        pending = begin(browser, self)
        answer = post_response(browser, self, pending,
                               self.idp.xml(pending.request_id, assertion_id=new_id()))
        if not accepted(answer):
            raise CaseError(f"the test member's genuine login was refused: {describe(answer)}")
        self.shared["member"] = browser
        return browser

    def end_member(self) -> None:
        """Sign the shared test member out, if a case signed it in."""
        browser = self.shared.pop("member", None)
        if isinstance(browser, Browser):
            sign_out(browser, self)


@dataclass(frozen=True)
class Outcome:
    status: str  # PASS, FAIL or SKIP
    got: str


@dataclass(frozen=True)
class Pending:
    request_id: str
    relay_state: str


def begin(browser: Browser, ctx: Context, raw_next: str = "/") -> Pending:
    """Start a login in ``browser``; ``raw_next`` goes into the query as given."""
    answer = browser.get(f"/saml/login?idp={quote(ctx.idp_entity_id, safe='')}"
                         f"&next={raw_next}")
    if answer.status != 302:
        hint = " (rate limited: see [limits] logins)" if answer.status == 429 else ""
        raise CaseError(f"sign-in start answered {answer.status}{hint}")
    query = parse_qs(urlsplit(answer.header("location") or "").query)
    try:
        xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
        request_id = parse(xml).get("ID")
    except (KeyError, ValueError, zlib.error, SyntaxError) as exc:
        raise CaseError(f"no readable AuthnRequest in the redirect ({exc})") from None
    if not request_id:
        raise CaseError("the AuthnRequest has no ID")
    return Pending(request_id, query.get("RelayState", [""])[0])


def post_response(browser: Browser, ctx: Context, pending: Pending, message: Any) -> Answer:
    """Post ``message`` (an lxml tree, XML text or bytes) to the ACS as the IdP's form does."""
    answer = browser.post_form(ctx.acs_path, {"SAMLResponse": encode(message),
                                              "RelayState": pending.relay_state})
    if answer.status == 429:
        raise CaseError("ACS answered 429 (rate limited: see [limits] logins)")
    return answer


def session_started(answer: Answer) -> bool:
    """Did the answer set a cookie other than (the removal of) the login binding cookie?"""
    return any(value and "gw-login-" not in name for name, value in answer.set_cookies())


def accepted(answer: Answer) -> bool:
    return answer.status in (302, 303) and session_started(answer)


def describe(answer: Answer) -> str:
    text = str(answer.status)
    if answer.status in (301, 302, 303, 307, 308):
        text += f" -> {answer.header('location')}"
    if session_started(answer):
        text += ", session cookie set"
    return text


def sign_out(browser: Browser, ctx: Context) -> None:
    """End the session a positive control created (best effort: the confirmation page's
    form, posted with its CSRF token from the gateway's own origin)."""
    try:
        page = browser.get("/saml/logout")
        token = _CSRF.search(page.text)
        if page.status == 200 and token:
            browser.post_form("/saml/logout", {"csrf": token.group(1)},
                              [("Origin", ctx.target.origin)])
    except OSError:
        pass


def login_with(ctx: Context, raw_next: str, assertion_id: str) -> tuple[bool, str]:
    """A complete login signed with the IdP's key: ``(accepted, where it lands)``."""
    assert ctx.idp is not None
    browser = ctx.browser()
    pending = begin(browser, ctx, raw_next)
    answer = post_response(browser, ctx, pending,
                           ctx.idp.xml(pending.request_id, assertion_id=assertion_id))
    ok = accepted(answer)
    if ok:
        sign_out(browser, ctx)
    return ok, describe(answer) if not ok else answer.header("location") or ""
