"""SAML for the gateway: the only package that imports ``onelogin.saml2``.

``SamlProtocol`` is SAML as one of the gateway's login protocols; the rest of the
package is its engine (IdP registry, service provider, Single Logout, metadata).
"""

from gateway.saml import schemas
from gateway.saml.protocol import SamlProtocol
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.sp import LoginRequest, LoginResult, ServiceProvider

__all__ = ["IdP", "IdPRegistry", "LoginRequest", "LoginResult", "SamlProtocol",
           "ServiceProvider"]

schemas.install()
