"""The gateway's exception tree, grouped by cause.

    GatewayError                 base: a private ``reason`` (log) and public class data
    ├── ConfigError              500 bad gateway.toml / environment; lists every problem
    ├── ClientError              4xx: the request itself is at fault
    │   ├── BadRequest           400 malformed input (path, form, parameters, framing)
    │   │   └── AmbiguousPath    400 a path the gateway will not interpret (``%2f``, ``..``)
    │   ├── BodyTooLarge         413 a request body over the configured limit
    │   ├── CrossSite            403 a state-changing request sent from another site
    │   └── TooManyRequests      429 a client over its rate limit
    ├── SignInError              400: a sign-in protocol message was refused
    │   ├── LoginFailed          400 a login was refused (the user sees only a reference)
    │   │   └── StepUpFailed     403 a step-up sign-in came back without what the page needs
    │   ├── LogoutFailed         400 a logout message was refused (likewise)
    │   └── UnknownIdP           400 an IdP entity ID that is not configured
    ├── InvalidToken             401 an identity token failed verification (services)
    └── ServiceError             5xx: something the gateway depends on failed
        ├── StoreError           503 the session store is unreachable or failed
        ├── SignInsBusy          503 too many sign-ins in progress ([limits] pending_logins)
        ├── MailError            503 the SMTP relay did not take a mail
        └── UpstreamError        502 the upstream could not be reached
            ├── UpstreamTimeout  504 the upstream did not answer in time
            └── UpgradeRefused   502 (or its 4xx) the upstream refused a WebSocket upgrade

Every class carries its answer as class data: ``status`` (HTTP), ``title`` (the error
page's heading, the JSON ``error``) and ``public_message`` (what users read). ``reason``
is for the log only. Titles and public messages are marked with ``N_`` for the gettext
catalogues: pages show them translated, JSON answers in English.
"""

from __future__ import annotations

from typing import ClassVar


def N_(text: str) -> str:
    """Mark ``text`` for translation without translating it (gettext's ``N_``): a page
    shows it in the reader's language when it renders (``gateway.i18n``)."""
    return text


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = N_("Something went wrong")
    public_message: ClassVar[str] = N_("Something went wrong in the gateway.")

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    title = N_("Configuration error")
    public_message = N_("The gateway's configuration is invalid.")

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# -- the request is at fault ------------------------------------------------------------


class ClientError(GatewayError):
    """A request the gateway refuses because of what it contains (4xx)."""

    status = 400
    title = N_("Bad request")
    public_message = N_("The request could not be understood.")


class BadRequest(ClientError):
    """Malformed input: a form, a parameter, the body's framing."""


class AmbiguousPath(BadRequest):
    """A path two parsers could read two ways (see ``gateway.paths``)."""

    title = N_("Address not accepted")
    public_message = N_("This address contains characters or segments the gateway does not "
                        "accept.")


class BodyTooLarge(ClientError):
    status = 413
    title = N_("Request too large")
    public_message = N_("The request body is larger than this site accepts.")


class CrossSite(ClientError):
    status = 403
    title = N_("Access denied")
    public_message = N_("This form must be sent from this site's own pages.")


class TooManyRequests(ClientError):
    status = 429
    title = N_("Too many requests")
    public_message = N_("Too many attempts from your network. Please wait a minute and try "
                        "again.")


# -- a sign-in protocol message was refused -----------------------------------------------


class SignInError(GatewayError):
    """A message of a sign-in or sign-out exchange was refused (400)."""

    status = 400
    title = N_("Sign-in failed")
    public_message = N_("We could not sign you in. Please try again; if it keeps failing, "
                        "contact support.")


class LoginFailed(SignInError):
    """A login response was refused. ``kind`` is a short fixed label for metrics and logs;
    ``details`` holds the values the check compared (for ``sso-gateway explain``)."""

    def __init__(self, kind: str, reason: str, details: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.details = dict(details or {})


class StepUpFailed(LoginFailed):
    """A sign-in that asked the IdP for an authentication context class (``authn_context``,
    any one) or a fresh authentication (``fresh``) did not bring it back: the IdP refused,
    or answered without it. The page needs what was asked, so this is a 403 that names it."""

    status = 403
    title = N_("A stronger sign-in is needed")
    public_message = N_("This page needs a stronger sign-in than your identity provider gave.")

    def __init__(self, kind: str, reason: str, *, authn_context: tuple[str, ...] = (),
                 fresh: bool = False, details: dict[str, str] | None = None) -> None:
        super().__init__(kind, reason, details)
        self.authn_context = authn_context
        self.fresh = fresh


class LogoutFailed(SignInError):
    """A logout request or response was refused. ``kind`` as for ``LoginFailed``."""

    title = N_("Sign-out failed")
    public_message = N_("The sign-out message could not be accepted.")

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class UnknownIdP(SignInError):
    public_message = N_("The identity provider you chose is not known to this site.")


# -- a credential presented to a service ----------------------------------------------------


class InvalidToken(GatewayError):
    """The identity token failed verification (raised by ``identity.verify_token``)."""

    status = 401
    title = N_("Sign-in required")
    public_message = N_("The identity token was not accepted.")


# -- something the gateway depends on failed -------------------------------------------------


class ServiceError(GatewayError):
    """A service the gateway depends on failed (5xx); the request itself was fine."""

    status = 503
    title = N_("Temporarily unavailable")
    public_message = N_("This service is temporarily unavailable. Please try again in a moment.")


class StoreError(ServiceError):
    public_message = N_("Sign-in is temporarily unavailable. Please try again in a moment.")


class SignInsBusy(ServiceError):
    """The gateway holds ``[limits] pending_logins`` sign-ins in progress already: a new
    one is not started (nothing is signed or stored) until some finish or expire."""

    public_message = N_("Sign-in is temporarily unavailable. Please try again in a moment.")


class MailError(ServiceError):
    """The SMTP relay did not take a mail (unreachable, refused, timed out)."""

    title = N_("Mail not sent")
    public_message = N_("We could not send the mail just now. Please try again later.")


class UpstreamError(ServiceError):
    status = 502
    title = N_("Service unreachable")
    public_message = N_("The content service is not reachable right now.")


class UpstreamTimeout(UpstreamError):
    status = 504
    title = N_("Service timed out")
    public_message = N_("The content service took too long to answer.")


class UpgradeRefused(UpstreamError):
    """The upstream answered a WebSocket upgrade with ``upstream_status`` instead of 101;
    a 4xx is passed on to the client (the upstream's own answer), anything else is a 502."""

    title = N_("Connection refused")
    public_message = N_("The content service did not accept this connection.")

    def __init__(self, reason: str, upstream_status: int) -> None:
        super().__init__(reason)
        self.upstream_status = upstream_status
