"""The gateway's exception tree.

    GatewayError                 base; carries a public ``status`` and a private ``reason``
    ├── ConfigError              bad gateway.toml / environment; lists every problem at once
    ├── BadRequest               400: malformed input (path, form, parameters)
    │   ├── AmbiguousPath        a path the gateway will not interpret (``%2f``, ``..``, ``;``)
    │   ├── BodyTooLarge         413: a request body over the configured limit
    │   ├── CrossSite            403: a state-changing request sent from another site
    │   └── TooManyRequests      429: a client over its rate limit
    ├── LoginFailed              400: a SAML login was refused (the user sees only a reference)
    ├── LogoutFailed             400: a SAML logout message was refused (likewise)
    ├── UnknownIdP               400: an IdP entity ID that is not configured
    ├── StoreError               503: the session store is unreachable or failed
    └── UpstreamError            502: the upstream could not be reached
        └── UpstreamTimeout      504: the upstream did not answer in time

``reason`` is for the log only; what users see comes from ``public_message``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status = 500
    public_message = "Something went wrong in the gateway."

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class BadRequest(GatewayError):
    status = 400
    public_message = "The request could not be understood."


class AmbiguousPath(BadRequest):
    public_message = "This address contains characters or segments the gateway does not accept."


class BodyTooLarge(BadRequest):
    status = 413
    public_message = "The request body is larger than this site accepts."


class CrossSite(BadRequest):
    status = 403
    public_message = "This form must be sent from this site's own pages."


class TooManyRequests(BadRequest):
    status = 429
    public_message = "Too many attempts from your network. Please wait a minute and try again."


class LoginFailed(GatewayError):
    """A login response was refused. ``kind`` is a short fixed label for metrics and logs;
    ``details`` holds the values the check compared (for ``sso-gateway explain``)."""

    status = 400
    public_message = "Sign-in failed."

    def __init__(self, kind: str, reason: str, details: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.details = dict(details or {})


class LogoutFailed(GatewayError):
    """A LogoutRequest or LogoutResponse was refused. ``kind`` as for ``LoginFailed``."""

    status = 400
    public_message = "The sign-out message could not be accepted."

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class UnknownIdP(GatewayError):
    status = 400
    public_message = "The identity provider you chose is not known to this site."


class StoreError(GatewayError):
    status = 503
    public_message = "Sign-in is temporarily unavailable. Please try again in a moment."


class UpstreamError(GatewayError):
    status = 502
    public_message = "The content service is not reachable right now."


class UpstreamTimeout(UpstreamError):
    status = 504
    public_message = "The content service took too long to answer."
