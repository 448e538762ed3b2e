"""sso-gateway: a SAML single sign-on gateway for member-only content."""

from gateway.version import VERSION as __version__

__all__ = ["__version__"]
