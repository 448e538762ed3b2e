"""A SAML logout message as it arrives at ``/saml/sls``, checked before anything trusts it.

Both bindings: HTTP-Redirect (a raw query: names decoded, repeated parameters refused,
DEFLATE inflated within ``MAX_INFLATED``) and HTTP-POST (a form). The XML is parsed with
entities, DTDs and network access off, and refused with a DOCTYPE, a comment, a
processing instruction, an entity reference or a repeated ID. A POSTed message's enveloped
signature is verified here (python3-saml checks only Redirect signatures): exactly one
``ds:Signature``, a child of the root referencing the root and shaped as
``gateway.saml.structure`` demands of a Response, verified with xmlsec against the IdP's
configured certificates; the key is set on the context, so ``KeyInfo`` is never used.
"""

from __future__ import annotations

import base64
import binascii
import textwrap
import zlib
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_plus

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.errors import LoginFailed, LogoutFailed
from gateway.saml.registry import IdP
from gateway.saml.response import clean
from gateway.saml.structure import check_signature, parser

MAX_ENCODED: Final = 128 * 1024  # characters of base64 in SAMLRequest / SAMLResponse
MAX_INFLATED: Final = 256 * 1024
MAX_RELAY_STATE: Final = 1024
REQUEST: Final = "SAMLRequest"
RESPONSE: Final = "SAMLResponse"
SIGNATURE: Final = f"{{{C.NS_DS}}}Signature"
_SIGNED_NAMES: Final = frozenset({REQUEST, RESPONSE, "RelayState", "SigAlg", "Signature"})


@dataclass(frozen=True)
class Message:
    """A logout message as it arrived: ``kind`` is ``SAMLRequest`` or ``SAMLResponse``."""

    kind: str
    binding: str  # "redirect" or "post"
    value: str
    relay_state: str | None
    params: dict[str, str]  # decoded query parameters (Redirect binding)
    raw_query: str = ""


def read_redirect(raw_query: str) -> Message:
    """The logout message in a raw query string (names decoded, values kept raw too)."""
    if len(raw_query) > MAX_ENCODED + 4096:
        raise LogoutFailed("too_large", f"The logout query is {len(raw_query)} characters long.")
    params: dict[str, str] = {}
    for part in raw_query.split("&"):
        if part:
            raw_name, _, value = part.partition("=")
            name = unquote_plus(raw_name)
            if name != raw_name and name in _SIGNED_NAMES:
                # python3-saml finds the signed parameters by their raw names.
                raise LogoutFailed("malformed", f"The parameter name {clean(raw_name, 40)} "
                                   "is percent-encoded.")
            if name in params:
                raise LogoutFailed("malformed", f"The parameter {clean(name, 40)} is repeated.")
            params[name] = unquote_plus(value)
    return _message(params, "redirect", raw_query)


def read_post(form: dict[str, list[str]]) -> Message:
    """The logout message in a POSTed form (HTTP-POST binding)."""
    params: dict[str, str] = {}
    for name, values in form.items():
        if len(values) != 1:
            raise LogoutFailed("malformed", f"The field {clean(name, 40)} is repeated.")
        params[name] = values[0]
    return _message(params, "post", "")


def _message(params: dict[str, str], binding: str, raw_query: str) -> Message:
    kinds = [k for k in (REQUEST, RESPONSE) if k in params]
    if len(kinds) != 1:
        raise LogoutFailed("malformed", "Expected exactly one SAMLRequest or SAMLResponse.")
    relay = params.get("RelayState")
    if relay is not None and len(relay) > MAX_RELAY_STATE:
        raise LogoutFailed("too_large", "The RelayState is too long.")
    return Message(kinds[0], binding, params[kinds[0]], relay, params, raw_query)


def decode(value: str, *, inflate: bool) -> bytes:
    if len(value) > MAX_ENCODED:
        raise LogoutFailed("too_large", f"The logout message is {len(value)} characters long.")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise LogoutFailed("malformed", "The logout message is not valid base64.") from None
    if inflate:  # the Redirect binding always DEFLATEs
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, MAX_INFLATED)
        except zlib.error:
            raise LogoutFailed("malformed", "The logout message is not DEFLATE-compressed.") \
                from None
        if inflater.unconsumed_tail:
            raise LogoutFailed("too_large", f"The logout message inflates past {MAX_INFLATED}.")
    elif len(data) > MAX_INFLATED:
        raise LogoutFailed("too_large", "The logout message is too large.")
    return data


def parse(xml: bytes, tag: str, what: str) -> Any:
    """The message's root, refusing DTDs, comments, PIs, entities and repeated IDs."""
    try:
        root = etree.fromstring(xml, parser())
    except etree.XMLSyntaxError as exc:
        raise LogoutFailed("malformed", f"The {what} is not well-formed XML ({clean(exc)}).") \
            from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise LogoutFailed("malformed", f"The {what} has a document type declaration.")
    if root.tag != tag:
        raise LogoutFailed("malformed", f"Expected a {what}, got {clean(root.tag, 80)}.")
    for _ in root.iter(etree.Comment, etree.ProcessingInstruction, etree.Entity):
        raise LogoutFailed("malformed", f"The {what} has a comment, PI or entity inside it.")
    ids = [e.get("ID") for e in root.iter() if isinstance(e.tag, str) and e.get("ID")]
    if not root.get("ID") or len(ids) != len(set(ids)):
        raise LogoutFailed("malformed", f"The {what} has no ID or repeats an ID value.")
    return root


def check_enveloped_signature(root: Any, signatures: list[Any], idp: IdP, where: str) -> None:
    if not signatures:
        raise LogoutFailed("unsigned", f"{where} is not signed.")
    if len(signatures) != 1 or signatures[0].getparent() is not root:
        raise LogoutFailed("signature", f"{where} must carry exactly one signature, on its root.")
    try:
        check_signature(signatures[0])  # one Reference to the root, safe transforms only
    except LoginFailed as exc:
        raise LogoutFailed(exc.kind, exc.reason) from None
    xmlsec.tree.add_ids(root, ["ID"])
    for cert in idp.signing_certs:
        context = xmlsec.SignatureContext()
        context.key = xmlsec.Key.from_memory(_pem(cert), xmlsec.constants.KeyDataFormatCertPem)
        try:
            context.verify(signatures[0])
            return
        except xmlsec.Error:
            continue
    raise LogoutFailed("signature", f"{where} has a signature that does not verify.")


def _pem(body: str) -> str:
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(textwrap.wrap(body, 64))
            + "\n-----END CERTIFICATE-----\n")
