"""Cached XML schemas for python3-saml's validation.

python3-saml parses and compiles its XSD files on every validation (about 1.3 ms for
the protocol schema here, a quarter of an ACS post's CPU). This swaps in a version of
``OneLogin_Saml2_XML.validate_xml`` that compiles each schema once per thread (lxml
schema objects are not shared between threads) and validates exactly as before.
"""

from __future__ import annotations

import threading
from os.path import dirname, join
from typing import Any

from lxml import etree
from onelogin.saml2 import xml_utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

_local = threading.local()
_SCHEMA_DIR = join(dirname(xml_utils.__file__), "schemas")


def _schema(name: str) -> etree.XMLSchema:
    cache: dict[str, etree.XMLSchema] = getattr(_local, "schemas", None) or {}
    _local.schemas = cache
    if name not in cache:
        with open(join(_SCHEMA_DIR, name)) as fh:
            cache[name] = etree.XMLSchema(etree.parse(fh))
    return cache[name]


def _validate_xml(xml: Any, schema: str, debug: bool = False) -> Any:
    try:
        xml = OneLogin_Saml2_XML.to_etree(xml)
    except Exception:  # the library's own contract: any load failure is this code
        return "unloaded_xml"
    if not _schema(schema).validate(xml):
        return "invalid_xml"
    return xml


def install() -> None:
    OneLogin_Saml2_XML.validate_xml = staticmethod(_validate_xml)
