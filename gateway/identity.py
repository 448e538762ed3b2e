"""What upstreams receive about the user: identity headers.

Header names come from config and are compiled once. Values are UTF-8 and
percent-encoded outside printable ASCII, so a value can never carry CR/LF or
raw non-latin-1 bytes into a header; ``%`` and ``,`` are encoded too, so a
list (entitlements, comma-separated) splits unambiguously and a consumer can
decode every value with one ``unquote``.
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.config import IdentityHeaders
from gateway.principal import Principal

# Printable ASCII minus '%' and ',' stays as it is.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")

# Client headers in these families are always dropped, whatever the config names.
RESERVED_PREFIXES = ("x-member-", "x-gateway-")


def encode_value(value: str) -> bytes:
    return quote(value, safe=_SAFE).encode("ascii")


def normalise_name(name: str) -> str:
    """Header names as the strip list compares them: lower-case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


class IdentityHeaderSet:
    """Builds the gateway's identity headers for a principal."""

    def __init__(self, names: IdentityHeaders) -> None:
        self._fields = tuple(
            (field, header.lower().encode("ascii"))
            for field, header in names.model_dump().items()
        )
        self.names = frozenset(normalise_name(h) for _, h in names.model_dump().items())

    def headers(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        out = []
        for field, header in self._fields:
            if field == "entitlements":
                value = b",".join(encode_value(e) for e in principal.entitlements)
            else:
                value = encode_value(str(getattr(principal, field)))
            out.append((header, value))
        return out
