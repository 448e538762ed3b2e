"""The SP's key pairs and the SP metadata that publishes them.

Normally there is one key pair (``[sp] key_file``/``cert_file``). During a key rollover
``[sp] next_key_file``/``next_cert_file`` name a second one: the metadata then lists both
certificates, for signing and for encryption, so an IdP may encrypt to either while it
picks up the new metadata; the gateway decrypts with either key and keeps signing with
the current one. Completing the rollover means moving the next pair into
``key_file``/``cert_file`` and removing the ``next_*`` keys (``docs/idp-admin.md``).
"""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass, field
from os.path import dirname, join
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree
from onelogin.saml2 import xml_utils
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.metadata import OneLogin_Saml2_Metadata
from onelogin.saml2.settings import OneLogin_Saml2_Settings

from gateway.config import Settings, SPSettings
from gateway.errors import ConfigError

#: A metadata validity shorter than this (seconds) draws a warning from ``check``.
SHORT_VALIDITY = 30 * 86400

MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
MDATTR = "urn:oasis:names:tc:SAML:metadata:attribute"
REMD = "http://refeds.org/metadata"
REMD_SECURITY = "http://refeds.org/metadata/contactType/security"
ENTITY_CATEGORY = "http://macedir.org/entity-category"
ASSURANCE_CERTIFICATION = "urn:oasis:names:tc:SAML:attribute:assurance-certification"
SIRTFI = "https://refeds.org/sirtfi"
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"
_BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
_SCHEMA_DIR = join(dirname(xml_utils.__file__), "schemas")
#: The metadata schema with the extension schemas python3-saml ships (mdui, mdattr) loaded
#: too, so the ``lax`` wildcards of ``md:Extensions`` validate them. remd's
#: ``contactType`` is an attribute from another namespace (``##other``, lax; REFEDS
#: publishes no schema for it), and shibmd is not used in SP metadata.
_SCHEMAS = ("saml-schema-metadata-2.0.xsd", "sstc-saml-metadata-ui-v1.0.xsd",
            "sstc-metadata-attr.xsd")


@dataclass(frozen=True)
class KeyPair:
    key_pem: str = field(repr=False)
    cert_pem: str
    label: str  # "current" or "next"


def read_keypairs(settings: Settings) -> list[KeyPair]:
    """The current key pair, then the next one when a rollover is configured."""
    sp = settings.sp
    files = [("current", sp.key_file, sp.cert_file)]
    if sp.next_key_file is not None and sp.next_cert_file is not None:
        files.append(("next", sp.next_key_file, sp.next_cert_file))
    problems: list[str] = []
    pairs = [_read(label, key, cert, problems) for label, key, cert in files]
    if problems:
        raise ConfigError(problems)
    if len(pairs) == 2 and pairs[0].cert_pem.strip() == pairs[1].cert_pem.strip():
        raise ConfigError([f"{sp.next_cert_file}: the next SP certificate is the current one"])
    return pairs


def _read(label: str, key_file: Path, cert_file: Path, problems: list[str]) -> KeyPair:
    try:
        key_pem = key_file.read_text()
        cert_pem = cert_file.read_text()
    except OSError as exc:
        raise ConfigError(
            [f"{exc.filename}: cannot read SP key or certificate ({exc.strerror})"]
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        problems.append(f"{key_file}: not an unencrypted PEM private key")
        key = None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        problems.append(f"{cert_file}: not a PEM certificate")
        cert = None
    if key is not None and cert is not None:
        der = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if key.public_key().public_bytes(enc, der) != cert.public_key().public_bytes(enc, der):
            problems.append(f"{cert_file}: certificate does not match the key in {key_file}")
    return KeyPair(key_pem, cert_pem, label)


def sp_metadata(settings: OneLogin_Saml2_Settings, certs: list[str], *,
                valid_until: float | None = None, cache_duration: int | None = None,
                config: Settings | None = None, key_pem: str = "") -> str:
    """SP metadata XML with a signing and an encryption KeyDescriptor per certificate
    (current first), checked against the metadata schema.

    With ``config``, it also carries what federations ask for (``federation_metadata``),
    is signed with ``key_pem`` when ``[sp] sign_metadata`` is on, and is checked against
    the metadata schema together with its mdui and mdattr extension schemas.

    ``validUntil`` (POSIX seconds) and ``cacheDuration`` (seconds) are written only when
    given: python3-saml's own defaults (two days, one week) would make every IdP that
    imported the metadata once refuse the gateway two days later."""
    security = settings.get_security_data()
    xml = OneLogin_Saml2_Metadata.builder(
        settings.get_sp_data(),
        authnsign=security["authnRequestsSigned"],
        wsign=security["wantAssertionsSigned"],
        # "" tells the builder to leave the attribute out (None means its default).
        valid_until=int(valid_until) if valid_until is not None else "",
        cache_duration=cache_duration if cache_duration is not None else "",
    )
    # Each call inserts its two KeyDescriptors first: add the current certificate last.
    for cert in reversed(certs):
        xml = OneLogin_Saml2_Metadata.add_x509_key_descriptors(xml, cert, add_encryption=True)
    text = xml.decode() if isinstance(xml, bytes) else str(xml)
    errors = settings.validate_metadata(text)
    if errors:
        raise ConfigError([f"the generated SP metadata is invalid: {', '.join(errors)}"])
    if config is None:
        return text
    text = federation_metadata(text, config)
    if config.sp.sign_metadata and key_pem:
        signed = OneLogin_Saml2_Metadata.sign_metadata(text, key_pem, certs[0])
        text = signed.decode() if isinstance(signed, bytes) else str(signed)
    problems = schema_problems(text)
    if problems:
        raise ConfigError([f"the generated SP metadata is invalid: {p}" for p in problems])
    return text


def federation_metadata(xml: str, config: Settings) -> str:
    """The builder's metadata plus what federations ask for (``[sp.metadata]``): entity
    attributes, mdui:UIInfo, the SLO endpoint for the HTTP-POST binding too, an
    AttributeConsumingService from ``[attributes]``, Organization and ContactPersons.
    Elements go where the metadata schema orders them."""
    md = config.sp.metadata
    root = etree.fromstring(xml.encode())
    sp = root.find(f"{{{C.NS_MD}}}SPSSODescriptor")
    assert sp is not None

    def el(parent: Any, ns: str, name: str, text: str | None = None,
           **attrs: str) -> Any:
        node = etree.SubElement(parent, f"{{{ns}}}{name}", nsmap=_NSMAP.get(ns))
        for key, value in attrs.items():
            node.set(_XML_LANG if key == "lang" else key, value)
        if text is not None:
            node.text = text
        return node

    # EntityDescriptor/Extensions: entity categories and SIRTFI.
    attributes = [(ENTITY_CATEGORY, list(md.entity_categories))]
    attributes.append((ASSURANCE_CERTIFICATION, [SIRTFI] if md.sirtfi else []))
    if any(values for _, values in attributes):
        ext = etree.Element(f"{{{C.NS_MD}}}Extensions")
        root.insert(0, ext)
        entity_attributes = el(ext, MDATTR, "EntityAttributes")
        for name, values in attributes:
            if values:
                attribute = el(entity_attributes, C.NS_SAML, "Attribute", Name=name,
                               NameFormat=_URI)
                for value in values:
                    el(attribute, C.NS_SAML, "AttributeValue", value)

    # SPSSODescriptor/Extensions: mdui:UIInfo.
    if md.display_name or md.description or md.information_url or md.privacy_url or md.logos:
        ext = etree.Element(f"{{{C.NS_MD}}}Extensions")
        sp.insert(0, ext)
        ui = el(ext, MDUI, "UIInfo")
        for name, texts in (("DisplayName", md.display_name), ("Description", md.description)):
            for lang, text in texts.items():
                el(ui, MDUI, name, text, lang=lang)
        for logo in md.logos:
            extra = {"lang": logo.lang} if logo.lang else {}
            el(ui, MDUI, "Logo", logo.url, height=str(logo.height), width=str(logo.width),
               **extra)
        for name, urls in (("InformationURL", md.information_url),
                           ("PrivacyStatementURL", md.privacy_url)):
            for lang, url in urls.items():
                el(ui, MDUI, name, url, lang=lang)

    # The SLO endpoint for both bindings (the SLS answers Redirect and POST).
    slo = sp.find(f"{{{C.NS_MD}}}SingleLogoutService")
    if slo is not None and slo.get("Binding") == C.BINDING_HTTP_REDIRECT:
        post = etree.Element(f"{{{C.NS_MD}}}SingleLogoutService",
                             Binding=C.BINDING_HTTP_POST, Location=slo.get("Location") or "")
        slo.addnext(post)

    # AttributeConsumingService: every released name of [attributes].
    if md.request_attributes and config.attributes:
        service = el(sp, C.NS_MD, "AttributeConsumingService", index="1", isDefault="true")
        names = md.display_name or {"en": config.sp_entity_id}
        for lang, text in names.items():
            el(service, C.NS_MD, "ServiceName", text, lang=lang)
        for lang, text in md.description.items():
            el(service, C.NS_MD, "ServiceDescription", text, lang=lang)
        seen: set[str] = set()
        for attribute, released in config.attributes.items():
            for name in released:
                if name in seen:
                    continue
                seen.add(name)
                el(service, C.NS_MD, "RequestedAttribute", Name=name,
                   NameFormat=_URI if ":" in name else _BASIC,
                   isRequired="true" if attribute in md.required_attributes else "false")

    # Organization and ContactPersons follow the role descriptors.
    if md.organization_name:
        org = el(root, C.NS_MD, "Organization")
        for name, texts in (("OrganizationName", md.organization_name),
                            ("OrganizationDisplayName", md.organization_display_name),
                            ("OrganizationURL", md.organization_url)):
            for lang, text in texts.items():
                el(org, C.NS_MD, name, text, lang=lang)
    for contact in md.contacts:
        person = el(root, C.NS_MD, "ContactPerson",
                    contactType="other" if contact.type == "security" else contact.type)
        if contact.type == "security":
            person.set(f"{{{REMD}}}contactType", REMD_SECURITY)
        for name, text in (("Company", contact.company), ("GivenName", contact.given_name),
                           ("SurName", contact.surname)):
            if text:
                el(person, C.NS_MD, name, text)
        for email in contact.email:
            el(person, C.NS_MD, "EmailAddress",
               email if email.startswith("mailto:") else f"mailto:{email}")
        for phone in contact.telephone:
            el(person, C.NS_MD, "TelephoneNumber", phone)
    etree.cleanup_namespaces(root, top_nsmap=_NSMAP_TOP)
    return str(etree.tostring(root, encoding="unicode"))


_NSMAP: dict[str, dict[str | None, str]] = {
    MDUI: {"mdui": MDUI}, MDATTR: {"mdattr": MDATTR}, C.NS_SAML: {"saml": C.NS_SAML}}
_NSMAP_TOP: dict[str | None, str] = {
    "md": C.NS_MD, "mdui": MDUI, "mdattr": MDATTR, "saml": C.NS_SAML, "remd": REMD}


def schema_problems(xml: str) -> list[str]:
    """Why ``xml`` is not valid against the metadata schema and its mdui/mdattr
    extension schemas ([] when it is)."""
    schema = _metadata_schema()
    doc = etree.fromstring(xml.encode())
    if schema.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log][:10]


_compiled = threading.local()  # lxml schema objects are not shared between threads


def _metadata_schema() -> etree.XMLSchema:
    """The metadata schema with its extension schemas, compiled once per thread."""
    schema: etree.XMLSchema | None = getattr(_compiled, "schema", None)
    if schema is None:
        namespaces = {"saml-schema-metadata-2.0.xsd": C.NS_MD,
                      "sstc-saml-metadata-ui-v1.0.xsd": MDUI, "sstc-metadata-attr.xsd": MDATTR}
        imports = "".join(f'<xs:import namespace="{namespaces[name]}" '
                          f'schemaLocation="file://{join(_SCHEMA_DIR, name)}"/>'
                          for name in _SCHEMAS)
        wrapper = ('<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" '
                   f'targetNamespace="urn:sso-gateway:metadata-schemas">{imports}</xs:schema>')
        schema = _compiled.schema = etree.XMLSchema(etree.fromstring(wrapper.encode()))
    return schema


def metadata_warnings(sp: SPSettings) -> list[str]:
    """What ``check`` says about the SP metadata lifetime settings (``[sp]``)."""
    warnings = []
    valid_for, cache = sp.metadata_valid_for, sp.metadata_cache_duration
    if valid_for is not None and valid_for < SHORT_VALIDITY:
        warnings.append(
            f"sp.metadata_valid_for = {valid_for} s ({valid_for / 86400:.1f} days): an IdP that "
            "imports the SP metadata once refuses this gateway when that time has passed; "
            f"use {SHORT_VALIDITY // 86400} days or more, or leave it unset (no validUntil), "
            "unless every IdP refreshes the metadata from /saml/metadata")
    if valid_for is not None and cache is not None and cache > valid_for:
        warnings.append(f"sp.metadata_cache_duration ({cache} s) is longer than "
                        f"sp.metadata_valid_for ({valid_for} s): the metadata expires "
                        "before an IdP is told to fetch it again")
    return warnings


def fingerprint(cert: str) -> str:
    """SHA-256 fingerprint (colon-separated hex) of a PEM certificate or its base64 body."""
    body = "".join(line for line in cert.splitlines() if "-----" not in line)
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return "unreadable"
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
