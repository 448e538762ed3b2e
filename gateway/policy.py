"""Access rules → a ``Decision`` for a canonical path and a ``Principal`` (or none).

Rules are compiled once into matchers; the first rule whose pattern matches
decides, and a path no rule matches needs a member session. Patterns are
segment-wise: ``*`` is one segment, ``**`` any number (including none) and
``{name}`` one segment captured for ``owner`` rules: the (first) parameter must
equal the principal's ``subject``. Matching sees only the path, never the query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import Requirement, Rule
from gateway.principal import Principal

Access = Literal["public", "registered", "member", "owner"]


@dataclass(frozen=True, slots=True)
class Decision:
    """``allow``, ``login`` (a member sign-in is needed), ``register`` (an e-mail
    registration or a member sign-in is needed) or ``deny``.

    ``failed`` names the failed condition on deny (``owner``, ``entitlement``,
    ``status``, ``idp``, ``attributes``) so the app can pick the right page; ``reason`` is for
    the log and the 403 body, and ``message`` is the rule's text for members.
    """

    kind: Literal["allow", "login", "register", "deny"]
    access: Access
    rule: str
    reason: str = ""
    failed: str = ""
    message: str = ""

    @property
    def gated(self) -> bool:
        return self.access != "public"


class _Pattern:
    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.parts = tuple(_segments(pattern))
        for part in self.parts:
            if "**" in part and part != "**":
                raise ValueError(f"'**' must be a whole segment in {pattern!r}")

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        return params if self._match(0, segments, 0, params) else None

    def _match(self, pi: int, segs: Sequence[str], si: int, params: dict[str, str]) -> bool:
        parts = self.parts
        while pi < len(parts):
            part = parts[pi]
            if part == "**":
                return any(self._match(pi + 1, segs, k, params) for k in range(si, len(segs) + 1))
            if si >= len(segs):
                return False
            seg = segs[si]
            if part.startswith("{") and part.endswith("}"):
                params[part[1:-1]] = seg
            elif part != "*" and part != seg:
                return False
            pi += 1
            si += 1
        return si == len(segs)


def _segments(path: str) -> list[str]:
    segs = path.split("/")[1:]
    if segs and segs[-1] == "":
        segs.pop()  # a trailing slash does not make another segment
    return segs


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    pattern: _Pattern
    access: Access
    require: Requirement
    message: str


_DEFAULT = Rule(path="/**", access="member")


class Policy:
    """Compiled access rules; ``decide`` does no I/O."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = [
            _CompiledRule(_Pattern(r.path), r.access, r.require, r.message)
            for r in (*rules, _DEFAULT)
        ]

    def decide(self, path: str, principal: Principal | None) -> Decision:
        segments = _segments(path)
        for rule in self._rules:
            params = rule.pattern.match(segments)
            if params is not None:
                return self._apply(rule, params, principal)
        raise AssertionError("the default rule matches every path")  # pragma: no cover

    def _apply(
        self, rule: _CompiledRule, params: dict[str, str], principal: Principal | None
    ) -> Decision:
        name = rule.pattern.text
        if rule.access == "public":
            return Decision("allow", "public", name)
        if rule.access == "registered":
            if principal is None:
                return Decision("register", "registered", name, reason="no session")
            return Decision("allow", "registered", name)
        if principal is None:
            return Decision("login", rule.access, name, reason="no session")
        if not principal.is_member:
            return Decision("login", rule.access, name, reason="a member sign-in is needed")
        if rule.access == "owner":
            owner = next(iter(params.values()))
            if owner != principal.subject:
                return Decision("deny", "owner", name, failed="owner", message=rule.message,
                                reason="path belongs to another member")
        failed = _unmet(rule.require, principal)
        if failed:
            condition, reason = failed
            return Decision("deny", rule.access, name, reason=reason, failed=condition,
                            message=rule.message)
        return Decision("allow", rule.access, name)


def _unmet(require: Requirement, principal: Principal) -> tuple[str, str] | None:
    missing = [e for e in require.entitlement if e not in principal.entitlements]
    if missing:
        return "entitlement", f"missing entitlement {missing[0]}"
    if require.status and principal.status not in require.status:
        shown = principal.status or "none"
        return "status", f"membership status is {shown}, needs {' or '.join(require.status)}"
    if require.idp and principal.idp not in require.idp:
        return "idp", f"signed in at {principal.idp}, which this page does not accept"
    for name, accepted in require.attributes.items():
        if not set(principal.values(name)) & set(accepted):
            return "attributes", f"attribute {name} is not {' or '.join(accepted)}"
    return None
