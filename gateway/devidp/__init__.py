"""A development SAML 2.0 IdP for ``sso-gateway demo`` and the test-suite.

It really signs (RSA-SHA256, SHA-256 digests, exclusive c14n), binds to loopback only
and says DEVELOPMENT ONLY on every page. Nothing in the gateway's core imports it.
"""

from gateway.devidp.app import create_app, run
from gateway.devidp.settings import DevIdPSettings, ensure_keys
from gateway.devidp.users import DEMO_USERS, DemoUser

__all__ = ["DEMO_USERS", "DemoUser", "DevIdPSettings", "create_app", "ensure_keys", "run"]
