"""The dev IdP's SAML metadata (an EntityDescriptor with one IDPSSODescriptor)."""

from __future__ import annotations

from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.devidp.settings import DevIdPSettings
from gateway.devidp.users import NAMEID_PERSISTENT
from gateway.keys import pem_body

MEDIA_TYPE = "application/samlmetadata+xml"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"


def idp_metadata(settings: DevIdPSettings) -> str:
    """Metadata XML; element order follows the metadata schema."""
    md, ds = C.NS_MD, C.NS_DS
    root = etree.Element(
        f"{{{md}}}EntityDescriptor",
        nsmap={"md": md, "ds": ds},
        attrib={"entityID": settings.entity_id},
    )
    idp = etree.SubElement(
        root,
        f"{{{md}}}IDPSSODescriptor",
        attrib={
            "protocolSupportEnumeration": C.NS_SAMLP,
            "WantAuthnRequestsSigned": "true" if settings.require_signed_requests else "false",
        },
    )
    extensions = etree.SubElement(idp, f"{{{md}}}Extensions")
    ui_info = etree.SubElement(extensions, f"{{{MDUI}}}UIInfo", nsmap={"mdui": MDUI})
    name = etree.SubElement(ui_info, f"{{{MDUI}}}DisplayName")
    name.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    name.text = settings.display_name
    key_descriptor = etree.SubElement(idp, f"{{{md}}}KeyDescriptor", attrib={"use": "signing"})
    key_info = etree.SubElement(key_descriptor, f"{{{ds}}}KeyInfo")
    x509_data = etree.SubElement(key_info, f"{{{ds}}}X509Data")
    etree.SubElement(x509_data, f"{{{ds}}}X509Certificate").text = pem_body(settings.cert_pem)
    for binding in (C.BINDING_HTTP_REDIRECT, C.BINDING_HTTP_POST):
        etree.SubElement(
            idp,
            f"{{{md}}}SingleLogoutService",
            attrib={"Binding": binding, "Location": settings.slo_url},
        )
    etree.SubElement(idp, f"{{{md}}}NameIDFormat").text = NAMEID_PERSISTENT
    etree.SubElement(
        idp,
        f"{{{md}}}SingleSignOnService",
        attrib={"Binding": C.BINDING_HTTP_REDIRECT, "Location": settings.sso_url},
    )
    xml: str = etree.tostring(root, encoding="unicode", pretty_print=True)
    return xml
