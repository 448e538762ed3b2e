"""SAML for the gateway: the only package that imports ``onelogin.saml2``."""

from gateway.saml import schemas
from gateway.saml.attributes import map_principal
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.sp import LoginRequest, LoginResult, ServiceProvider

__all__ = ["IdP", "IdPRegistry", "LoginRequest", "LoginResult", "ServiceProvider", "map_principal"]

schemas.install()
