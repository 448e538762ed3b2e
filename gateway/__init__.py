"""sso-gateway: a SAML single sign-on gateway for member-only content."""

__version__ = "0.1.0"
