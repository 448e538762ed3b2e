"""Verifying the XML signature of fetched metadata against one pinned certificate.

The shape is checked before xmlsec runs, so that what is verified is what is used:
exactly one ``ds:Signature``, a child of the root, with one ``Reference`` to the root
itself (``URI=""`` or ``#`` + the root's ``ID``, which must be unique), only the
enveloped-signature and exclusive-c14n transforms, exclusive c14n for ``SignedInfo``,
and SHA-256 or stronger (SHA-1 is refused). The key is the pinned certificate and
nothing else: xmlsec is given that key, so any ``KeyInfo`` in the document is ignored.
"""

from __future__ import annotations

from typing import Any

import xmlsec
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.saml.registry import parse_xml

EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SIGNATURE_METHODS = frozenset({
    C.RSA_SHA256, C.RSA_SHA384, C.RSA_SHA512,
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
})
DIGEST_METHODS = frozenset({C.SHA256, C.SHA384, C.SHA512})
WEAK = frozenset({C.RSA_SHA1, C.DSA_SHA1, C.SHA1})
_NS = {"ds": C.NS_DS}


class MetadataRefused(ValueError):
    """Metadata that must not be used; ``str(exc)`` says why."""


def verify_signed_metadata(data: bytes, cert_pem: str, where: str) -> Any:
    """The root element of ``data`` once its signature verifies with ``cert_pem``;
    raises ``MetadataRefused`` otherwise."""
    problems: list[str] = []
    root = parse_xml(data, where, problems)
    if root is None:
        raise MetadataRefused("; ".join(problems))
    signature = _only_root_signature(root, where)
    _check_signed_info(root, signature, where)
    try:
        key = xmlsec.Key.from_memory(cert_pem, xmlsec.constants.KeyDataFormatCertPem)
    except xmlsec.Error as exc:
        raise MetadataRefused(f"{where}: the pinned certificate cannot be loaded") from exc
    if root.get("ID"):
        xmlsec.tree.add_ids(root, ["ID"])
    context = xmlsec.SignatureContext()
    context.key = key
    try:
        context.verify(signature)
    except xmlsec.Error as exc:
        raise MetadataRefused(
            f"{where}: the signature does not verify with the pinned certificate") from exc
    return root


def _only_root_signature(root: Any, where: str) -> Any:
    on_root = root.findall("ds:Signature", _NS)
    if not on_root:
        raise MetadataRefused(f"{where}: the metadata is not signed (no ds:Signature on the "
                              "root element); a signature is required for metadata URLs")
    if len(on_root) > 1:
        raise MetadataRefused(f"{where}: more than one ds:Signature on the root element")
    return on_root[0]


def _check_signed_info(root: Any, signature: Any, where: str) -> None:
    def algorithm(path: str, node: Any = signature) -> str:
        found = node.find(path, _NS)
        return "" if found is None else str(found.get("Algorithm") or "")

    c14n = algorithm("ds:SignedInfo/ds:CanonicalizationMethod")
    if c14n != EXC_C14N:
        raise MetadataRefused(f"{where}: SignedInfo canonicalization {c14n!r} is not "
                              "exclusive c14n")
    method = algorithm("ds:SignedInfo/ds:SignatureMethod")
    if method not in SIGNATURE_METHODS:
        weak = " (SHA-1 is not accepted)" if method in WEAK else ""
        raise MetadataRefused(f"{where}: signature algorithm {method!r} refused{weak}")
    references = signature.findall("ds:SignedInfo/ds:Reference", _NS)
    if len(references) != 1:
        raise MetadataRefused(f"{where}: the signature must have exactly one Reference")
    reference = references[0]
    uri = reference.get("URI")
    root_id = root.get("ID") or ""
    if uri != "" and not (uri and uri.startswith("#") and root_id and uri[1:] == root_id):
        raise MetadataRefused(f"{where}: the signature does not cover the root element "
                              f"(Reference URI {uri!r})")
    if root_id and len(root.xpath("//*[@ID=$id]", id=root_id)) != 1:
        raise MetadataRefused(f"{where}: the root element's ID {root_id!r} is not unique")
    transforms = [str(t.get("Algorithm") or "")
                  for t in reference.findall("ds:Transforms/ds:Transform", _NS)]
    if ENVELOPED not in transforms or not set(transforms) <= {ENVELOPED, EXC_C14N}:
        raise MetadataRefused(f"{where}: unexpected signature transforms {transforms}")
    digest = algorithm("ds:DigestMethod", reference)
    if digest not in DIGEST_METHODS:
        weak = " (SHA-1 is not accepted)" if digest in WEAK else ""
        raise MetadataRefused(f"{where}: digest algorithm {digest!r} refused{weak}")
