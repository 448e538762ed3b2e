"""The shape a SAML Response must have before python3-saml is allowed to look at it.

python3-saml checks *where* signatures sit and that their first ``Reference`` points at
their parent, but not what a signature is made of, and xmlsec evaluates whatever
transforms a ``Reference`` names (XPath, XSLT, …) before it checks the signature value.
So, on the decoded bytes and before the library runs, every ``ds:Signature`` must be:

- ``SignedInfo``, ``SignatureValue`` and at most one ``KeyInfo``: no ``ds:Object``
  (a hiding place for wrapped assertions), nothing else;
- a ``SignedInfo`` with exactly one ``CanonicalizationMethod`` (exclusive c14n without
  comments), one ``SignatureMethod`` (RSA or ECDSA with SHA-256/384/512) and exactly one
  ``Reference``, whose URI is ``#`` + the ID of the signature's parent (the library reads
  only the *first* Reference and the first ``DigestMethod``; xmlsec verifies them all);
- transforms only enveloped-signature and exclusive c14n without comments, each once;
  digest SHA-256/384/512.

And the document as a whole: a ``samlp:Response`` root, no DOCTYPE, no comments,
processing instructions or entity references anywhere inside it (the library strips
comments while parsing, so a ``M10<!---->01`` reads as what was signed; refusing them
keeps any other reader honest too), no SAML element whose text is split by a child
element (``M10<x/>01``: the library reads only the text before it), no ID value used
twice, exactly one Assertion (plain
or encrypted) and it a child of the Response, and signatures only where a reader looks
for them: at most one on the Response and one on that Assertion, nowhere else. So a
Response signature (its Reference is the root's ID) covers the one Assertion there is.

``check_structure`` answers which of the two carry a signature (``Signed``): the shape
that picks python3-saml's settings for the message (``gateway.saml.sp``) and that
``sso-gateway explain`` names. The signatures are only *verified* later, by the library.

This is a second parse of the message, used only to refuse: nothing is ever read from
it. Identity comes from the library's getters on the document it validated.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.errors import LoginFailed

DS: Final = C.NS_DS
ENVELOPED: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
EXC_C14N: Final = "http://www.w3.org/2001/10/xml-exc-c14n#"
SIGNATURE_METHODS: Final = frozenset({
    C.RSA_SHA256, C.RSA_SHA384, C.RSA_SHA512,
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
})
DIGEST_METHODS: Final = frozenset({C.SHA256, C.SHA384, C.SHA512})
TRANSFORMS: Final = frozenset({ENVELOPED, EXC_C14N})
_SIGNATURE_CHILDREN: Final = {f"{{{DS}}}SignedInfo": (1, 1), f"{{{DS}}}SignatureValue": (1, 1),
                              f"{{{DS}}}KeyInfo": (0, 1)}
_SIGNED_INFO_CHILDREN: Final = {f"{{{DS}}}CanonicalizationMethod": (1, 1),
                                f"{{{DS}}}SignatureMethod": (1, 1),
                                f"{{{DS}}}Reference": (1, 1)}
_REFERENCE_CHILDREN: Final = {f"{{{DS}}}Transforms": (0, 1), f"{{{DS}}}DigestMethod": (1, 1),
                              f"{{{DS}}}DigestValue": (1, 1)}
MAX_RESPONSE_BASE64: Final = 256 * 1024
_DOCTYPE: Final = re.compile(rb"<!\s*DOCTYPE", re.IGNORECASE)
_RESPONSE: Final = f"{{{C.NS_SAMLP}}}Response"
_ASSERTION: Final = f"{{{C.NS_SAML}}}Assertion"
_ENCRYPTED_ASSERTION: Final = f"{{{C.NS_SAML}}}EncryptedAssertion"


@dataclass(frozen=True, slots=True)
class Signed:
    """Which parts of a Response carry a signature, as it arrived (not yet verified)."""

    response: bool
    assertion: bool | None  # None: the Assertion is encrypted, its signature unseen

    @property
    def shape(self) -> str:
        """The shape in words, as ``sso-gateway explain`` shows it."""
        if self.assertion is None:
            return ("response signed, assertion encrypted" if self.response
                    else "response not signed, assertion encrypted")
        return {(True, True): "response and assertion signed",
                (True, False): "response signed, assertion not signed",
                (False, True): "assertion signed, response not signed",
                (False, False): "neither response nor assertion signed"}[
                    (self.response, self.assertion)]


def parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           huge_tree=False, remove_comments=False, remove_pis=False)


def check_envelope(saml_response: str) -> tuple[str, bytes]:
    """Size, base64 and DOCTYPE checks before anything parses it: (base64, XML bytes)."""
    if len(saml_response) > MAX_RESPONSE_BASE64:
        raise LoginFailed(
            "too_large",
            f"The SAMLResponse is {len(saml_response)} characters, over the "
            f"{MAX_RESPONSE_BASE64} limit.",
        )
    compact = "".join(saml_response.split())  # some IdPs wrap the base64 at 76 columns
    try:
        xml = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise LoginFailed("malformed", "The SAMLResponse is not valid base64.") from None
    if not xml.strip():
        raise LoginFailed("malformed", "The SAMLResponse is empty.")
    if _DOCTYPE.search(xml):
        raise LoginFailed("malformed", "The SAMLResponse contains a DOCTYPE; refused unparsed.")
    return compact, xml


def check_structure(xml: bytes) -> Signed:
    """Refuse (``LoginFailed``) a Response whose shape python3-saml should never see;
    say which of the Response and its Assertion carry a signature."""
    try:
        root = etree.fromstring(xml, parser())
    except etree.XMLSyntaxError as exc:
        reason = f"The SAMLResponse is not well-formed XML ({_short(exc)})."
        raise LoginFailed("malformed", reason) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise LoginFailed("malformed", "The SAMLResponse has a document type declaration.")
    if root.tag != _RESPONSE:
        raise LoginFailed("malformed", "The SAMLResponse is not a samlp:Response.")
    for node in root.iter(etree.Comment, etree.ProcessingInstruction, etree.Entity):
        what = ("comment" if isinstance(node, etree._Comment) else
                "processing instruction" if isinstance(node, etree._ProcessingInstruction)
                else "entity reference")
        raise LoginFailed("malformed", f"The SAMLResponse has a {what} inside it.")
    for element in root.iter(f"{{{C.NS_SAML}}}*", f"{{{C.NS_SAMLP}}}*"):
        if len(element) and ((element.text or "").strip()
                             or any((child.tail or "").strip() for child in element)):
            name = etree.QName(element).localname
            raise LoginFailed("malformed", f"The SAMLResponse has a {name} whose text is "
                              "split by an element inside it.")
    ids = Counter(e.get("ID") for e in root.iter() if isinstance(e.tag, str) and e.get("ID"))
    if any(count > 1 for count in ids.values()):
        raise LoginFailed("malformed", "The SAMLResponse uses an ID value more than once.")
    assertions = list(root.iter(_ASSERTION, _ENCRYPTED_ASSERTION))
    if len(assertions) != 1:
        raise LoginFailed("malformed",
                          f"The SAMLResponse has {len(assertions)} Assertion elements, not 1.")
    assertion = assertions[0]
    if assertion.getparent() is not root:
        raise LoginFailed("malformed", "The SAMLResponse's Assertion is not a child of the "
                          "Response.")
    signatures = list(root.iter(f"{{{DS}}}Signature"))
    for signature in signatures:
        if signature.getparent() not in (root, assertion):
            raise LoginFailed("signature", "The SAMLResponse has a signature that is neither "
                              "the Response's nor its Assertion's.")
    on_root = sum(1 for s in signatures if s.getparent() is root)
    if on_root > 1 or len(signatures) - on_root > 1:
        raise LoginFailed("signature", "The SAMLResponse has an element signed more than once.")
    for signature in signatures:
        check_signature(signature)
    return Signed(response=on_root == 1,
                  assertion=None if assertion.tag == _ENCRYPTED_ASSERTION
                  else len(signatures) > on_root)


def check_signature(signature: Any) -> None:
    parent = signature.getparent()
    where = "a signature" if parent is None else f"the signature of {etree.QName(parent).localname}"
    _children(signature, _SIGNATURE_CHILDREN, where)
    signed_info = signature.find(f"{{{DS}}}SignedInfo")
    if signature.index(signed_info) != 0:
        raise LoginFailed("signature", f"In {where}, SignedInfo is not the first child.")
    _children(signed_info, _SIGNED_INFO_CHILDREN, f"{where} (SignedInfo)")
    c14n = signed_info.find(f"{{{DS}}}CanonicalizationMethod").get("Algorithm")
    if c14n != EXC_C14N:
        raise LoginFailed("signature", f"{where} uses canonicalization {_short(c14n)}; "
                          "only exclusive c14n without comments is accepted.")
    method = signed_info.find(f"{{{DS}}}SignatureMethod").get("Algorithm")
    if method not in SIGNATURE_METHODS:
        raise LoginFailed("signature", f"{where} uses signature method {_short(method)}.")
    reference = signed_info.find(f"{{{DS}}}Reference")
    parent_id = parent.get("ID") if parent is not None else None
    if not parent_id or reference.get("URI") != "#" + parent_id:
        raise LoginFailed("signature",
                          f"{where} does not reference exactly the element it sits in.")
    _children(reference, _REFERENCE_CHILDREN, f"{where} (Reference)")
    transforms = reference.find(f"{{{DS}}}Transforms")
    algorithms: list[str | None] = []
    if transforms is not None:
        for transform in transforms:
            if transform.tag != f"{{{DS}}}Transform":
                raise LoginFailed("signature", f"{where} has a foreign element in Transforms.")
            algorithms.append(transform.get("Algorithm"))
    bad = [a for a in algorithms if a not in TRANSFORMS]
    if bad or len(set(algorithms)) != len(algorithms):
        shown = ", ".join(_short(a) for a in bad) or "a repeated transform"
        raise LoginFailed("signature", f"{where} uses the transform {shown}; only "
                          "enveloped-signature and exclusive c14n without comments are accepted.")
    digest = reference.find(f"{{{DS}}}DigestMethod").get("Algorithm")
    if digest not in DIGEST_METHODS:
        raise LoginFailed("signature", f"{where} uses digest method {_short(digest)}.")


def _children(element: Any, allowed: dict[str, tuple[int, int]], where: str) -> None:
    counts = Counter(child.tag for child in element)
    for tag in counts:
        if tag not in allowed:
            name = etree.QName(tag).localname if isinstance(tag, str) else str(tag)
            raise LoginFailed("signature", f"{where} contains an unexpected {_short(name)}.")
    for tag, (low, high) in allowed.items():
        if not low <= counts.get(tag, 0) <= high:
            raise LoginFailed("signature", f"{where} has {counts.get(tag, 0)} "
                              f"{etree.QName(tag).localname} elements.")


def _short(value: object) -> str:
    text = str(value).encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= 120 else text[:120] + "…"
