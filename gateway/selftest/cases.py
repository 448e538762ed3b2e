"""The self-test's checks: forged responses at the ACS, then edge probes (``probes``).

Each case is independent: its own browser (cookie jar), its own pending login, its own
Assertion IDs. A case answers an ``Outcome``; a ``CaseError`` (a step that did not go
as a gateway's normal behaviour would) is a FAIL with its message, because a self-test
that could not look proves nothing.

Forgeries signed with a throwaway key (unsigned, self-signed with the certificate in
KeyInfo) need nothing from the admin. The rest (a positive control, signature wrapping,
replay, wrong audience) need the IdP's real key (``--idp-key``: the demo's dev IdP or
a test IdP whose key the admin holds), so the only difference from a valid login is
the attack; without it they are SKIPped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.devidp.response import new_id
from gateway.selftest.attacks import forge_attack
from gateway.selftest.flow import (
    CaseError,
    Context,
    Outcome,
    accepted,
    begin,
    describe,
    login_with,
    post_response,
    sign_out,
)
from gateway.selftest.hostile import PROBES as HOSTILE
from gateway.selftest.probes import probes

REFUSED = "400, no session"
# A few of the wrapping shapes: each costs a sign-in start and an ACS post, and the
# gateway's per-address limit on those (default 30 a minute) must hold the whole run.
WRAPPING_SHAPES = ("XSW1", "XSW3", "XSW7")
OFF_AUDIENCE = "https://sso-gateway-selftest.invalid/not-this-sp"


@dataclass(frozen=True)
class Case:
    name: str
    expected: str
    check: Callable[[Context], Outcome]
    needs_idp_key: bool = False


def _refusal(answer_text: str, refused: bool) -> Outcome:
    return Outcome("PASS" if refused else "FAIL", answer_text)


def _forged(build: Callable[[Context, str], object]) -> Callable[[Context], Outcome]:
    """Post ``build(ctx, request_id)`` to a fresh pending login; it must be refused."""
    def check(ctx: Context) -> Outcome:
        browser = ctx.browser()
        pending = begin(browser, ctx)
        answer = post_response(browser, ctx, pending, build(ctx, pending.request_id))
        if accepted(answer):
            sign_out(browser, ctx)
        return _refusal(describe(answer), answer.status == 400 and not accepted(answer))
    return check


def _unsigned(ctx: Context, request_id: str) -> object:
    return ctx.attacker.xml(request_id, assertion_id=new_id(), sign_assertion=False)


def _self_signed(ctx: Context, request_id: str) -> object:
    # add_sign embeds the throwaway certificate in KeyInfo: trusting it would be fatal.
    return ctx.attacker.xml(request_id, assertion_id=new_id(), sign_response=True)


def _wrapped(shape: str) -> Callable[[Context, str], object]:
    def build(ctx: Context, request_id: str) -> object:
        assert ctx.idp is not None
        return forge_attack(ctx.idp, shape, request_id, new_id())
    return build


def _off_audience(ctx: Context, request_id: str) -> object:
    assert ctx.idp is not None
    return ctx.idp.xml(request_id, assertion_id=new_id(), audience=OFF_AUDIENCE)


def _control(ctx: Context) -> Outcome:
    ok, got = login_with(ctx, "/", new_id())
    return Outcome("PASS" if ok else "FAIL", f"accepted -> {got}" if ok else got)


def _replay(ctx: Context) -> Outcome:
    assertion_id = new_id()
    ok, got = login_with(ctx, "/", assertion_id)
    if not ok:
        raise CaseError(f"the first, genuine login was refused: {got}")
    assert ctx.idp is not None
    browser = ctx.browser()
    pending = begin(browser, ctx)
    again = post_response(browser, ctx, pending,
                          ctx.idp.xml(pending.request_id, assertion_id=assertion_id))
    if accepted(again):
        sign_out(browser, ctx)
    return _refusal(describe(again), again.status == 400 and not accepted(again))


def all_cases(ctx: Context) -> list[Case]:
    """Every case for the gateway in ``ctx``, in the order they run (``hostile.RATE_LIMIT``
    is not among them: it runs after them all)."""
    cases = [
        Case("forged: unsigned response", REFUSED, _forged(_unsigned)),
        Case("forged: self-signed, certificate in KeyInfo", REFUSED, _forged(_self_signed)),
        Case("control: valid response (IdP key) accepted", "302, session", _control,
             needs_idp_key=True),
        *(Case(f"wrapped: {shape}", REFUSED, _forged(_wrapped(shape)), needs_idp_key=True)
          for shape in WRAPPING_SHAPES),
        Case("replayed: same Assertion ID, new response", REFUSED, _replay,
             needs_idp_key=True),
        Case("off-audience: Audience of another SP", REFUSED, _forged(_off_audience),
             needs_idp_key=True),
    ]
    return cases + [Case(p.name, p.expected, p.check, p.needs_idp_key)
                    for p in [*probes(ctx), *HOSTILE]]
