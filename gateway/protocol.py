"""The login-protocol seam: how a sign-in protocol (SAML today) plugs into the gateway.

A protocol owns its URLs, messages and state; the gateway owns identities, sessions,
policy and the proxy. They meet in three small pieces:

* ``SignedIn``: what a protocol established about a user (the IdP, the attributes as
  released, how and when the user authenticated, and an opaque logout handle plus
  whatever the protocol must remember for its own logout). The gateway turns it into a
  ``Principal`` under its identity rules and starts the session;
* ``SignInServices``: what the gateway offers a protocol's routes (finish a sign-in,
  read the current session, end the sessions a logout names, record a refused sign-in,
  single-use keys, rate limits, cookies);
* ``LoginProtocol``: what a protocol offers the gateway (its routes, where to send a
  visitor who must sign in, where the gateway's sign-out page lives, the IdP leg of a
  sign-out, start and stop).

Nothing outside the protocol's package knows its message names or URLs; a second
protocol is one more ``LoginProtocol`` passed to ``create_app``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from starlette.requests import Request
from starlette.routing import BaseRoute

from gateway.config import Settings
from gateway.cookies import Cookies
from gateway.errors import LoginFailed
from gateway.principal import Principal

if TYPE_CHECKING:
    from gateway.sessions import KeyStore, SessionRecord


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A verified statement by an IdP about a user, before the gateway's identity rules.

    ``released`` holds the attributes under the names the IdP released them with; the
    configured attribute map turns them into the principal's attributes.
    ``logout_handle`` must be the same for every sign-in that one logout message of the
    protocol could name (SAML: a hash of the IdP and the NameID).

    ``scopes`` are the scopes the IdP may assert in scoped attribute values (SAML: its
    metadata's ``shibmd:Scope``); ``persistent_id`` is the protocol's own stable
    identifier of the user at this IdP for this gateway (SAML: a persistent NameID),
    "" when it gave none. The identity rules decide what either is used for.
    """

    idp: str
    protocol: str
    released: Mapping[str, Sequence[str]]
    authn_context: str = ""
    authn_instant: float = 0.0
    session_not_on_or_after: float | None = None
    logout_handle: str = ""
    protocol_data: Mapping[str, str] = field(default_factory=dict)
    scopes: Sequence[AttributeScope] = ()
    persistent_id: str = ""


class AttributeScope(Protocol):
    """A scope an IdP vouches for: the part after the ``@`` of a scoped value."""

    def matches(self, scope: str) -> bool:
        """Whether ``scope`` (of one value) is this one."""


class SignInServices(Protocol):
    """What the gateway offers a login protocol's routes."""

    settings: Settings
    cookies: Cookies
    keys: KeyStore

    async def finish_sign_in(self, signed_in: SignedIn, request: Request, *,
                             replaces: SessionRecord | None = None,
                             ) -> tuple[SessionRecord, str]:
        """Apply the identity rules, start a session; returns it and the signed cookie
        value. Raises ``LoginFailed`` when the identity is not acceptable.

        ``replaces``: the session a step-up sign-in started from. The new identity must
        have its subject (else ``LoginFailed`` ``step_up_subject``, and nothing changes);
        it is ended once the new session exists."""

    async def current_session(self, request: Request) -> SessionRecord | None:
        """The request's live session, if any."""

    async def end_for_logout(self, logout_handle: str, ends: Callable[[Principal], bool],
                             *, idp: str) -> int:
        """End the sessions an IdP's logout names; returns how many ended."""

    async def rate_limit(self, request: Request, what: str, per_minute: int) -> None:
        """Raise ``TooManyRequests`` for a client over ``per_minute`` ``what`` a minute."""

    def login_failed(self, exc: LoginFailed) -> str:
        """Record a sign-in the protocol refused and answers itself (log line, metrics,
        the failure for ``sso-gateway explain``); returns the reference to show. A
        ``LoginFailed`` a route raises is recorded and answered by the gateway."""

    def sign_in_url(self, next_url: str) -> str:
        """Where to send a visitor who must sign in to reach ``next_url``."""


class LoginProtocol(Protocol):
    """A sign-in protocol the gateway can use."""

    #: A short name: labels principals (``Principal.protocol``), logs and metrics.
    name: str
    #: Where a visitor who must sign in is sent; the gateway adds ``?next=<target>``
    #: and, for a step-up or passive sign-in, the ``SignInOptions`` parameters.
    #: The protocol's routes live under this path's first segment (``/saml/…``).
    sign_in_path: str
    #: Where the gateway serves its sign-out page (GET asks, POST signs out) for this
    #: protocol's members, or "" for none; it must not be one of the protocol's routes.
    sign_out_path: str

    def routes(self, services: SignInServices) -> Sequence[BaseRoute]:
        """The protocol's own endpoints (sign-in, callbacks, logout, metadata)."""

    async def start(self) -> None:
        """Begin background work (e.g. metadata refresh); called at startup."""

    async def stop(self) -> None:
        """End background work; called at shutdown."""

    def owns(self, principal: Principal) -> bool:
        """Whether ``principal`` signed in through this protocol."""

    def logout_origin(self, principal: Principal) -> str | None:
        """The origin a sign-out of ``principal`` redirects to (for the sign-out page's
        ``form-action``), or ``None`` when the IdP has no logout of its own."""

    async def start_logout(self, principal: Principal) -> str | None:
        """After the gateway ended the session: the URL that ends the IdP session too, or
        ``None`` (no IdP logout, or it could not be built; never raises)."""


#: Query parameters of a sign-in URL, after ``next``: what the gateway asks of the sign-in.
AUTHN_CONTEXT_PARAM = "authn_context"
FORCE_PARAM = "force"
PASSIVE_PARAM = "passive"


@dataclass(frozen=True, slots=True)
class SignInOptions:
    """What the gateway asks of a sign-in besides where to go afterwards: one of the
    authentication context classes ``authn_context``, a fresh authentication (``force``),
    or no interaction at all (``passive``: come back anonymous if the IdP does not know
    the visitor already).

    They travel as query parameters of the sign-in URL, so whoever follows the link
    chooses them: a protocol only passes them on to its IdP (``read`` keeps only the
    contexts some rule names), and whether the session that comes back is good enough
    is decided by the access rules at the next request, never by what was asked.
    """

    authn_context: tuple[str, ...] = ()
    force: bool = False
    passive: bool = False

    @property
    def step_up(self) -> bool:
        return bool(self.authn_context) or self.force

    def query(self) -> str:
        """The parameters to append to a sign-in URL that has ``?next=`` already."""
        parts = [f"&{AUTHN_CONTEXT_PARAM}={quote(c, safe='')}" for c in self.authn_context]
        if self.force:
            parts.append(f"&{FORCE_PARAM}=1")
        if self.passive:
            parts.append(f"&{PASSIVE_PARAM}=1")
        return "".join(parts)

    @classmethod
    def read(cls, items: Iterable[tuple[str, str]], known: Collection[str]) -> SignInOptions:
        """The options of a sign-in URL's query (``items``: name, value pairs); contexts
        not in ``known`` are dropped, and a passive sign-in never forces one."""
        contexts: list[str] = []
        force = passive = False
        for name, value in items:
            if name == AUTHN_CONTEXT_PARAM and value in known and value not in contexts:
                contexts.append(value)
            elif name == FORCE_PARAM:
                force = value == "1"
            elif name == PASSIVE_PARAM:
                passive = value == "1"
        return cls(tuple(contexts), force and not passive, passive)
