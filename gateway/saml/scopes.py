"""The scopes an IdP's metadata vouches for (``shibmd:Scope``), read once per entity.

A scope is the part after the ``@`` of a scoped attribute value (``eduPersonPrincipalName``,
``subject-id``, …). An IdP lists the scopes it may assert in ``<shibmd:Scope>`` elements in
the Extensions of its IDPSSODescriptor or of its EntityDescriptor; ``regexp="true"`` makes
the text a regular expression that must match the whole scope. A scope is a domain, so
it is ASCII (an internationalised domain in its ``xn--`` form): a literal scope matches
with A-Z folded to a-z and nothing else folded (``casefold`` would read the long s,
U+017F, as ``s`` and the Kelvin sign, U+212A, as ``k``), a regular expression matches in ASCII mode,
and a value's scope that is not ASCII matches nothing. A scope that is not ASCII, a
regular expression that does not compile, or one unreasonably long makes that one scope
unusable: its reason is logged and kept for ``sso-gateway idp list``, and values in it are
dropped like any value out of scope.

The check itself (which values are scoped, what is dropped) is the identity rules'
(``gateway.identities``): they see ``Scope`` only through ``matches``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gateway.metadata")
SHIBMD_NS = "urn:mace:shibboleth:metadata:1.0"
_SCOPE_PATHS = (f"md:IDPSSODescriptor/md:Extensions/{{{SHIBMD_NS}}}Scope",
                f"md:Extensions/{{{SHIBMD_NS}}}Scope")
#: Longer texts are not scopes (a DNS name is at most 253 characters).
MAX_SCOPE_LENGTH = 512


@dataclass(frozen=True)
class Scope:
    """One ``shibmd:Scope``: its text, whether it is a regular expression, and (for a
    regular expression that does not compile) why it is unusable."""

    text: str
    regexp: bool = False
    problem: str = ""
    _pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def read(cls, text: str, regexp: bool) -> Scope:
        """A scope from metadata text; never raises (a bad one carries its ``problem``)."""
        text = text.strip()
        if not text:
            return cls(text, regexp, "the scope is empty")
        if len(text) > MAX_SCOPE_LENGTH:
            return cls(text[:80] + "…", regexp,
                       f"the scope is longer than {MAX_SCOPE_LENGTH} characters")
        if not text.isascii():
            return cls(text, regexp, "the scope is not ASCII (a domain; an internationalised "
                                     "one is written in its xn-- form)")
        if not regexp:
            return cls(text)
        try:
            pattern = re.compile(text, re.ASCII)
        except (re.error, RecursionError, OverflowError) as exc:
            return cls(text, True, f"the regular expression does not compile ({exc})")
        return cls(text, True, "", pattern)

    def matches(self, scope: str) -> bool:
        """Whether a value's scope (the part after ``@``) is this one."""
        if self.problem or not scope.isascii():
            return False
        if self._pattern is not None:
            return self._pattern.fullmatch(scope) is not None
        return scope.lower() == self.text.lower()  # both ASCII: only A-Z are folded

    def __str__(self) -> str:
        return f"{self.text} (regexp)" if self.regexp else self.text


def read_scopes(entity: Any, where: str, namespaces: dict[str, str]) -> tuple[Scope, ...]:
    """The ``shibmd:Scope`` elements of an EntityDescriptor (its IDPSSODescriptor's first,
    then its own), each once; an unusable one is logged with ``where`` and kept."""
    found: list[Scope] = []
    for path in _SCOPE_PATHS:
        for node in entity.iterfind(path, namespaces):
            regexp = (node.get("regexp") or "").strip().lower() in {"true", "1"}
            scope = Scope.read("".join(node.itertext()), regexp)
            if scope.problem:
                log.warning("%s: shibmd:Scope %r is unusable, values in it are dropped: %s",
                            where, scope.text, scope.problem)
            if scope not in found:
                found.append(scope)
    return tuple(found)
