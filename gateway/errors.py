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
    │   ├── LogoutFailed         400 a logout message was refused (likewise)
    │   └── UnknownIdP           400 an IdP entity ID that is not configured
    ├── InvalidToken             401 an identity token failed verification (services)
    └── ServiceError             5xx: something the gateway depends on failed
        ├── StoreError           503 the session store is unreachable or failed
        └── UpstreamError        502 the upstream could not be reached
            └── UpstreamTimeout  504 the upstream did not answer in time

Every class carries its answer as class data: ``status`` (HTTP), ``title`` (the error
page's heading, the JSON ``error``) and ``public_message`` (what users read). ``reason``
is for the log only.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Something went wrong"
    public_message: ClassVar[str] = "Something went wrong in the gateway."

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    title = "Configuration error"
    public_message = "The gateway's configuration is invalid."

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# -- the request is at fault ------------------------------------------------------------


class ClientError(GatewayError):
    """A request the gateway refuses because of what it contains (4xx)."""

    status = 400
    title = "Bad request"
    public_message = "The request could not be understood."


class BadRequest(ClientError):
    """Malformed input: a form, a parameter, the body's framing."""


class AmbiguousPath(BadRequest):
    """A path two parsers could read two ways (see ``gateway.paths``)."""

    title = "Address not accepted"
    public_message = "This address contains characters or segments the gateway does not accept."


class BodyTooLarge(ClientError):
    status = 413
    title = "Request too large"
    public_message = "The request body is larger than this site accepts."


class CrossSite(ClientError):
    status = 403
    title = "Access denied"
    public_message = "This form must be sent from this site's own pages."


class TooManyRequests(ClientError):
    status = 429
    title = "Too many requests"
    public_message = "Too many attempts from your network. Please wait a minute and try again."


# -- a sign-in protocol message was refused -----------------------------------------------


class SignInError(GatewayError):
    """A message of a sign-in or sign-out exchange was refused (400)."""

    status = 400
    title = "Sign-in failed"
    public_message = ("We could not sign you in. Please try again; if it keeps failing, "
                      "contact support.")


class LoginFailed(SignInError):
    """A login response was refused. ``kind`` is a short fixed label for metrics and logs;
    ``details`` holds the values the check compared (for ``sso-gateway explain``)."""

    def __init__(self, kind: str, reason: str, details: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.details = dict(details or {})


class LogoutFailed(SignInError):
    """A logout request or response was refused. ``kind`` as for ``LoginFailed``."""

    title = "Sign-out failed"
    public_message = "The sign-out message could not be accepted."

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class UnknownIdP(SignInError):
    public_message = "The identity provider you chose is not known to this site."


# -- a credential presented to a service ----------------------------------------------------


class InvalidToken(GatewayError):
    """The identity token failed verification (raised by ``identity.verify_token``)."""

    status = 401
    title = "Sign-in required"
    public_message = "The identity token was not accepted."


# -- something the gateway depends on failed -------------------------------------------------


class ServiceError(GatewayError):
    """A service the gateway depends on failed (5xx); the request itself was fine."""

    status = 503
    title = "Temporarily unavailable"
    public_message = "This service is temporarily unavailable. Please try again in a moment."


class StoreError(ServiceError):
    public_message = "Sign-in is temporarily unavailable. Please try again in a moment."


class UpstreamError(ServiceError):
    status = 502
    title = "Service unreachable"
    public_message = "The content service is not reachable right now."


class UpstreamTimeout(UpstreamError):
    status = 504
    title = "Service timed out"
    public_message = "The content service took too long to answer."
