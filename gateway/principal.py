"""``Principal``: the one value that says who the user is."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the user is: a member (validated SAML login) or a registered visitor.

    ``entitlements`` is a tuple so the value stays hashable and immutable.
    Times are POSIX seconds. ``session_not_on_or_after`` is the IdP's
    ``SessionNotOnOrAfter`` (caps the gateway session), if it sent one.
    """

    member_id: str
    idp: str
    name_id: str
    email: str = ""
    display_name: str = ""
    entitlements: tuple[str, ...] = field(default_factory=tuple)
    status: str = ""
    name_id_format: str = ""
    session_index: str = ""
    authn_instant: float = 0.0
    session_not_on_or_after: float | None = None
    kind: str = "member"  # "member": a SAML login; "registered": a visitor who gave an e-mail

    @property
    def is_member(self) -> bool:
        return self.kind == "member"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["entitlements"] = list(self.entitlements)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Principal:
        values = dict(data)
        values["entitlements"] = tuple(values.get("entitlements") or ())
        return cls(**values)

    def attribute(self, name: str) -> tuple[str, ...]:
        """Values of a named attribute, as policy conditions see them."""
        if name == "entitlement":
            return self.entitlements
        value = getattr(self, name, None)
        if value is None or name not in self.__dataclass_fields__:
            return ()
        return (str(value),)
