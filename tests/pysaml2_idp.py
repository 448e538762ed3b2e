"""A SAML IdP the gateway did not write: pysaml2's ``saml2.server.Server``.

pysaml2 uses its own keys, parses the gateway's AuthnRequest itself (checking the
HTTP-Redirect signature against the certificate in the SP metadata) and builds and
signs its own Response with xmlsec1. Nothing listens at its SSO URL: the test reads
the AuthnRequest from the gateway's redirect and posts the Response itself.

Its metadata does not depend on the SP's, so it is written before the gateway
starts; the ``Server`` is built afterwards, from the SP metadata the running
gateway serves.
"""

from __future__ import annotations

import base64
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.utils import CryptographyDeprecationWarning

# pysaml2 7.5 reads ``modes.CFB`` at import time (saml2/cryptography/symmetric.py), which
# cryptography >= 47 deprecates. The import runs at collection, before any
# ``pytest.mark.filterwarnings`` applies, so that one warning is silenced here.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="CFB has been moved",
                            category=CryptographyDeprecationWarning)
    from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
    from saml2.config import IdPConfig
    from saml2.metadata import create_metadata_string
    from saml2.saml import NAME_FORMAT_URI, NAMEID_FORMAT_PERSISTENT, NameID
    from saml2.samlp import AuthnRequest
    from saml2.server import Server
    from saml2.sigver import get_xmlsec_binary
    from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

from gateway.keys import generate_self_signed

PASSWORD_PROTECTED_TRANSPORT = (
    "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
)


@dataclass(frozen=True)
class ParsedRequest:
    """What the IdP answers: the AuthnRequest's ID, ACS URL and issuer, and the RelayState."""

    id: str
    acs_url: str
    sp_entity_id: str
    relay_state: str


class PySaml2IdP:
    """Keys, entity ID and metadata now; the pysaml2 ``Server`` once the SP is known."""

    def __init__(self, directory: Path, entity_id: str = "https://idp.pysaml2.test/idp",
                 slo_post_url: str = "") -> None:
        self.entity_id = entity_id
        self.slo_post_url = slo_post_url  # an HTTP-POST (only) SingleLogoutService
        self.sso_url = "https://idp.pysaml2.test/sso/redirect"  # nobody listens: see module doc
        directory.mkdir(parents=True, exist_ok=True)
        key_pem, cert_pem = generate_self_signed("pysaml2 test IdP")
        self.key_file = directory / "idp.key"
        self.cert_file = directory / "idp.crt"
        self.key_file.write_text(key_pem)
        self.cert_file.write_text(cert_pem)
        self._directory = directory
        self._server: Server | None = None

    def _config(self, sp_metadata: str | None) -> IdPConfig:
        conf: dict[str, Any] = {
            "entityid": self.entity_id,
            "xmlsec_binary": get_xmlsec_binary(["/usr/bin"]),
            "key_file": str(self.key_file),
            "cert_file": str(self.cert_file),
            "signing_algorithm": SIG_RSA_SHA256,
            "digest_algorithm": DIGEST_SHA256,
            "service": {
                "idp": {
                    "name": "pysaml2 interop IdP",
                    "endpoints": {
                        "single_sign_on_service": [(self.sso_url, BINDING_HTTP_REDIRECT)],
                        **({"single_logout_service": [(self.slo_post_url, BINDING_HTTP_POST)]}
                           if self.slo_post_url else {}),
                    },
                    "name_id_format": [NAMEID_FORMAT_PERSISTENT],
                    # The gateway signs its AuthnRequests: make pysaml2 check that.
                    "want_authn_requests_signed": True,
                    "sign_assertion": True,
                    "sign_response": False,
                    "policy": {
                        "default": {
                            "lifetime": {"minutes": 5},
                            "attribute_restrictions": None,
                            # pysaml2's default converters: known names become urn:oid:
                            # (mail, displayName, eduPersonEntitlement); names it has no
                            # OID for (memberId, memberStatus) pass through as they are.
                            "name_form": NAME_FORMAT_URI,
                        },
                    },
                },
            },
        }
        if sp_metadata is not None:
            path = self._directory / "sp-metadata.xml"
            path.write_text(sp_metadata)
            conf["metadata"] = {"local": [str(path)]}
        config = IdPConfig()
        config.load(conf)
        return config

    def metadata(self) -> str:
        """pysaml2's own IdP metadata (EntityDescriptor), for the gateway's idp_metadata/."""
        xml: bytes = create_metadata_string(None, config=self._config(None))
        return xml.decode()

    def trust_sp(self, sp_metadata: str) -> None:
        """Build the pysaml2 ``Server`` that knows the SP from its metadata."""
        self._server = Server(config=self._config(sp_metadata))

    @property
    def server(self) -> Server:
        assert self._server is not None, "call trust_sp() first"
        return self._server

    def parse_redirect(self, location: str) -> ParsedRequest:
        """Parse (and signature-check) the AuthnRequest in an HTTP-Redirect URL."""
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == self.sso_url
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        relay_state = query.get("RelayState", "")
        parsed = self.server.parse_authn_request(
            query["SAMLRequest"], BINDING_HTTP_REDIRECT, relay_state=relay_state or None,
            sigalg=query.get("SigAlg"), signature=query.get("Signature"),
        )
        assert parsed is not None
        message: AuthnRequest = parsed.message
        return ParsedRequest(str(message.id), str(message.assertion_consumer_service_url),
                             str(message.issuer.text), relay_state)

    def respond(self, request: ParsedRequest, identity: dict[str, list[str]],
                name_id: str, *, sign_response: bool = False) -> str:
        """A signed Response for ``request``, base64 as the HTTP-POST binding carries it."""
        response = self.server.create_authn_response(
            identity=identity,
            in_response_to=request.id,
            destination=request.acs_url,
            sp_entity_id=request.sp_entity_id,
            name_id=NameID(format=NAMEID_FORMAT_PERSISTENT, text=name_id,
                           name_qualifier=self.entity_id,
                           sp_name_qualifier=request.sp_entity_id),
            authn={"class_ref": PASSWORD_PROTECTED_TRANSPORT,
                   "authn_auth": self.entity_id},
            sign_assertion=True,
            sign_response=sign_response,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
        # The acs must be one the SP metadata lists for HTTP-POST.
        acs = self.server.config.metadata.assertion_consumer_service(
            request.sp_entity_id, BINDING_HTTP_POST)
        assert request.acs_url in [a["location"] for a in acs]
        return base64.b64encode(str(response).encode()).decode()
