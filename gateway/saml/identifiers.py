"""What SAML keeps of a sign-in for its own logout: the NameID, its format, the
SessionIndex, and the opaque logout handle that indexes the sessions.

The values come from a validated assertion and are kept byte-for-byte (an IdP compares
them exactly in its LogoutRequest), but they are checked like attribute values: no
control character or Unicode line/paragraph separator, at most ``MAX_LENGTH``
characters. The logout handle is a hash of the IdP and the NameID: every session one
LogoutRequest could name has the same handle, and the store never learns a NameID.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

from gateway.errors import LoginFailed

#: The protocol's name on principals, in logs and metrics.
PROTOCOL = "saml"
MAX_LENGTH = 1024
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})


def checked(name: str, value: str) -> str:
    """``value`` unchanged; raises ``LoginFailed('attributes', …)`` for a control
    character or an oversized value."""
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise LoginFailed(
                "attributes",
                f"Attribute {name!r} contains the control character U+{ord(ch):04X}; "
                "refusing the login.")
    if len(value) > MAX_LENGTH:
        raise LoginFailed("attributes", f"The {name} is longer than {MAX_LENGTH} characters.")
    return value


def logout_handle(idp_entity_id: str, name_id: str) -> str:
    """The sessions' logout handle for a NameID of an IdP (hex SHA-256)."""
    return hashlib.sha256(json.dumps([idp_entity_id, name_id]).encode()).hexdigest()
