"""Access rules → a ``Decision`` for a canonical path and a ``Principal`` (or none).

Rules are compiled once; the first rule whose pattern matches decides, and a path no
rule matches takes the default rule (``[policy] default``, a member session unless
configured otherwise). Patterns are segment-wise: ``*`` is one segment, ``**`` any number
(including none) and ``{name}`` one segment, named; an ``owner`` rule compares its
owner parameter with the principal's ``subject``. Matching sees only the path, never the
query, and takes at most (pattern parts x path segments) comparisons: no backtracking.

Matching is exact unless the path goes to an upstream that reads paths more loosely
(``[[upstreams]] case_insensitive``, ``strip_suffixes``). For those, every way the
upstream may read the path is decided on, and all of them must allow: ``/Members/M1002/
notes.json`` is also ``/members/M1002/notes``. The caller names the upstream (the route
the path goes to); ``decide`` does no I/O.

A rule may also ask how and how recently the member authenticated at the IdP: an
authentication context class (``require.authn_context``, any one listed) and a maximum
age of the authentication (``max_auth_age``). A member who meets every other condition
but not these gets a ``step_up`` decision: sign in again, asking the IdP for exactly that.
The check is always against the rule and the session at request time, never against
what a sign-in asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import PARAMETER, Requirement, Rule, Settings, Upstream, pattern_segments
from gateway.principal import Principal

Access = Literal["public", "registered", "member", "owner"]

#: A path as segments (``/a/b/`` → ``["a", "b"]``), the unit patterns match in.
segments = pattern_segments


@dataclass(frozen=True, slots=True)
class Decision:
    """``allow``, ``login`` (a member sign-in is needed), ``register`` (an e-mail
    registration or a member sign-in is needed), ``step_up`` (the member must sign in
    again: ``authn_context`` names the classes of which one is needed, ``force`` asks for
    a fresh authentication) or ``deny``.

    ``failed`` names the failed condition on deny (``owner``, ``entitlement``,
    ``status``, ``idp``, ``attributes``) or step-up (``authn_context``, ``max_auth_age``)
    so the app can pick the right page; ``reason`` is for the log and the 403 body, and
    ``message`` is the rule's text for members. ``passive``: an allowed public page whose
    rule asks to try a passive sign-in for an anonymous visitor.
    """

    kind: Literal["allow", "login", "register", "step_up", "deny"]
    access: Access
    rule: str
    reason: str = ""
    failed: str = ""
    message: str = ""
    authn_context: tuple[str, ...] = ()
    force: bool = False
    passive: bool = False

    @property
    def gated(self) -> bool:
        return self.access != "public"


# -- Case folding ------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Letters whose simple case mapping is an ASCII letter but whose casefold() is not: Java's
# equalsIgnoreCase and .NET read dotless i (U+0131) and dotted capital I (U+0130) as "i"
# (casefold already maps long s, U+017F, and the Kelvin sign, U+212A, to "s" and "k").
_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i"})


def ascii_fold(text: str) -> str:
    """Case-insensitive as the narrowest servers read it: only A-Z are folded."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def unicode_fold(text: str) -> str:
    """Case-insensitive as the widest servers read it: full Unicode case folding, and
    every letter that some server reads as an ASCII letter folded to it."""
    return text.lower() if text.isascii() else text.translate(_TO_ASCII).casefold()


def _same(text: str) -> str:
    return text


# -- Patterns ----------------------------------------------------------------------------

_Block = tuple[str | None, ...]  # a run of one-segment parts; None matches any segment


class Pattern:
    """A rule's path pattern, compiled for matching in bounded steps.

    The pattern is split at its ``**`` parts into blocks of one-segment parts. The first
    block must match at the start, the last at the end, and each block in between at its
    leftmost place after the previous one (the ``**`` around it absorb any gap; leftmost
    leaves the most room for the rest, so it is never wrong). Each candidate place costs
    at most the block's length in comparisons, so a match takes at most
    ``len(parts) * len(segments)`` comparisons, whatever the path.

    ``fold`` normalises the literal parts (the path is folded by the caller alike);
    ``owner`` names the parameter ``owner_value`` reads: it has a fixed place (counted from
    the start or from the end), so its value is never a choice among several matches.
    """

    __slots__ = ("_head", "_least", "_middle", "_owner_at", "_tail", "parts", "text")

    def __init__(self, text: str, *, owner: str = "", fold: Callable[[str], str] = _same):
        self.text = text
        self.parts = tuple(segments(text))
        blocks: list[list[str | None]] = [[]]
        owner_block = owner_index = -1
        for part in self.parts:
            if part == "**":
                blocks.append([])
                continue
            if "**" in part:
                raise ValueError(f"'**' must be a whole segment in {text!r}")
            if owner and part == "{" + owner + "}":
                owner_block, owner_index = len(blocks) - 1, len(blocks[-1])
            one = part == "*" or PARAMETER.fullmatch(part) is not None
            blocks[-1].append(None if one else fold(part))
        self._head: _Block = tuple(blocks[0])
        self._tail: _Block | None = tuple(blocks[-1]) if len(blocks) > 1 else None
        self._middle: tuple[_Block, ...] = tuple(tuple(b) for b in blocks[1:-1])
        self._least = sum(len(b) for b in blocks)  # the fewest segments it can match
        self._owner_at: int | None = None
        if owner:
            if owner_block < 0:
                raise ValueError(f"{text!r} has no parameter {{{owner}}}")
            if owner_block == 0:
                self._owner_at = owner_index
            elif owner_block == len(blocks) - 1:
                self._owner_at = owner_index - len(blocks[-1])  # from the end
            else:
                raise ValueError(f"the owner parameter {{{owner}}} in {text!r} has no "
                                 "fixed place")

    def match(self, segs: Sequence[str]) -> bool:
        """Whether the (already folded) path segments match."""
        return self._run(segs)[0]

    def steps(self, segs: Sequence[str]) -> int:
        """How many part-to-segment comparisons ``match`` makes for ``segs``."""
        return self._run(segs)[1]

    def owner_value(self, segs: Sequence[str]) -> str:
        """The owner parameter's segment in a path this pattern matched."""
        assert self._owner_at is not None, "not an owner pattern"
        return segs[self._owner_at]

    def _run(self, segs: Sequence[str]) -> tuple[bool, int]:
        n = len(segs)
        head, tail = self._head, self._tail
        if (n != self._least) if tail is None else (n < self._least):
            return False, 0
        steps = 0
        for i, part in enumerate(head):
            steps += 1
            if part is not None and part != segs[i]:
                return False, steps
        if tail is None:
            return True, steps
        end = n - len(tail)
        for j, part in enumerate(tail):
            steps += 1
            if part is not None and part != segs[end + j]:
                return False, steps
        at = len(head)
        for block in self._middle:
            size = len(block)
            start = at
            while True:
                if start + size > end:
                    return False, steps
                for k, part in enumerate(block):
                    steps += 1
                    if part is not None and part != segs[start + k]:
                        break
                else:
                    break  # the block matches at ``start``
                start += 1
            at = start + size
        return True, steps


# -- Rules and upstreams -----------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)  # one per rule: compared by identity
class _CompiledRule:
    exact: Pattern  # literal parts as written
    narrow: Pattern  # ASCII-folded (for case-insensitive upstreams)
    wide: Pattern  # Unicode-folded
    access: Access
    require: Requirement
    message: str
    authn_context: tuple[str, ...] = ()
    max_auth_age: int | None = None
    passive: bool = False

    @classmethod
    def of(cls, rule: Rule) -> _CompiledRule:
        owner = rule.owner_parameter
        return cls(Pattern(rule.path, owner=owner), Pattern(rule.path, owner=owner,
                                                              fold=ascii_fold),
                   Pattern(rule.path, owner=owner, fold=unicode_fold),
                   rule.access, rule.require, rule.message,
                   tuple(rule.require.authn_context), rule.max_auth_age, rule.passive)


@dataclass(frozen=True, slots=True)
class Matching:
    """How one upstream reads a path: ``fold_case`` (``/Members`` is ``/members``) and
    ``suffixes`` it strips from the last segment (``.json``; ``.*`` for any)."""

    fold_case: bool = False
    suffixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, upstream: Upstream) -> Matching:
        suffixes = sorted({s.lower() for s in upstream.strip_suffixes}, key=len, reverse=True)
        return cls(upstream.case_insensitive, tuple(suffixes))

    @property
    def exact(self) -> bool:
        return not self.fold_case and not self.suffixes

    def stem(self, segment: str) -> str | None:
        """The last segment without its stripped suffix, or None when there is none."""
        if ".*" in self.suffixes:
            dot = segment.find(".")  # Spring's "name.*": everything after the first dot
            return segment[:dot] if dot > 0 else None
        for suffix in self.suffixes:
            size = len(suffix)
            if len(segment) > size and ascii_fold(segment[-size:]) == suffix:
                return segment[:-size]
        return None


EXACT = Matching()
# The rules selected per (path, upstream), remembered up to this many paths of at most
# this many characters (then forgotten all at once).
_SELECTED_LIMIT = 4096
_SELECTED_PATH_LIMIT = 512
_SEVERITY = {"allow": 0, "register": 1, "login": 2, "step_up": 3, "deny": 4}


class Policy:
    """Compiled access rules; ``decide`` does no I/O.

    ``default`` is the access of a path no rule matches; ``upstreams`` give each upstream's
    ``Matching`` (by name), for ``decide(..., upstream=NAME)``; ``clock`` (POSIX seconds)
    measures the age of an authentication for ``max_auth_age``.
    """

    def __init__(self, rules: Sequence[Rule], *, default: Access = "member",
                 upstreams: Sequence[Upstream] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.default = Rule(path="/**", access=default)
        self._rules = [_CompiledRule.of(r) for r in (*rules, self.default)]
        self._ascii_rules = all(r.path.isascii() for r in rules)
        self._matching = {u.name: Matching.of(u) for u in upstreams}
        self._clock = clock
        self._selected: dict[tuple[str, str | None],
                             tuple[tuple[_CompiledRule, ...], list[str]]] = {}
        #: Every authentication context class some rule requires: the only ones a sign-in
        #: may ask the IdP for (a client cannot make the gateway request anything else).
        self.authn_contexts = frozenset(c for r in rules for c in r.require.authn_context)

    @classmethod
    def from_settings(cls, settings: Settings,
                      clock: Callable[[], float] = time.time) -> Policy:
        """The policy of a configuration: its rules, default and upstreams."""
        return cls(settings.rules, default=settings.policy.default,
                   upstreams=settings.upstreams, clock=clock)

    def matching(self, upstream: str) -> Matching:
        """How the rules read paths for ``upstream``."""
        try:
            return self._matching[upstream]
        except KeyError:
            raise KeyError(f"no upstream named {upstream!r}") from None

    def decide(self, path: str, principal: Principal | None, *,
               upstream: str | None = None) -> Decision:
        """The decision for ``path`` (canonical, without query) going to ``upstream`` (the
        name of the route it takes; None: matched exactly, as for the gateway's own
        pages). An unknown upstream name is a ``KeyError``."""
        selected = self._selected.get((path, upstream))
        if selected is None:
            selected = self._select(path, EXACT if upstream is None else self.matching(upstream))
            if len(path) <= _SELECTED_PATH_LIMIT:
                if len(self._selected) >= _SELECTED_LIMIT:
                    self._selected.clear()  # bounded: paths are the client's to choose
                self._selected[(path, upstream)] = selected
        rules, segs = selected
        if len(rules) == 1:
            return self._apply(rules[0], segs, principal)
        decisions = [self._apply(rule, segs, principal) for rule in rules]
        refused = [d for d in decisions if d.kind != "allow"]
        if refused:
            return max(refused, key=lambda d: _SEVERITY[d.kind])  # the first of the worst
        return next((d for d in decisions if d.gated), decisions[0])

    def _select(self, path: str, matching: Matching,
                ) -> tuple[tuple[_CompiledRule, ...], list[str]]:
        """The rules that decide ``path`` as ``matching`` reads it, and the segments they
        read it by (the path alone chooses them: ``decide`` remembers them per path)."""
        segs = segments(path)
        if matching.exact:
            for rule in self._rules:
                if rule.exact.match(segs):
                    return (rule,), segs
            raise AssertionError("the default rule matches every path")  # pragma: no cover
        readings = [segs]
        stem = matching.stem(segs[-1]) if segs and matching.suffixes else None
        if stem is not None:
            readings.append([*segs[:-1], stem])
        # A stripped suffix is a format, never part of an owner's identifier.
        return tuple(self._candidates(readings, matching.fold_case)), readings[-1]

    def _candidates(self, readings: list[list[str]], fold_case: bool) -> list[_CompiledRule]:
        """Every rule some reading of the path selects. Folded, the path may select any
        rule that matches it folded widely, up to the first that matches it folded
        narrowly (servers' case-insensitivity lies between the two)."""
        found: list[_CompiledRule] = []
        for reading in readings:
            if not fold_case:
                found.append(next(r for r in self._rules if r.exact.match(reading)))
                continue
            narrow = [ascii_fold(s) for s in reading]
            if self._ascii_rules and all(s.isascii() for s in reading):
                found.append(next(r for r in self._rules if r.narrow.match(narrow)))
                continue
            wide = [unicode_fold(s) for s in reading]
            for rule in self._rules:
                if rule.wide.match(wide):
                    found.append(rule)
                    if rule.narrow.match(narrow):
                        break
        return list(dict.fromkeys(found))  # each rule once, in order

    def _apply(self, rule: _CompiledRule, segs: Sequence[str],
               principal: Principal | None) -> Decision:
        name = rule.exact.text
        if rule.access == "public":
            return Decision("allow", "public", name, passive=rule.passive)
        if rule.access == "registered":
            if principal is None:
                return Decision("register", "registered", name, reason="no session")
            return Decision("allow", "registered", name)
        if principal is None:
            return Decision("login", rule.access, name, reason="no session")
        if not principal.is_member:
            return Decision("login", rule.access, name, reason="a member sign-in is needed")
        if rule.access == "owner" and rule.exact.owner_value(segs) != principal.subject:
            return Decision("deny", "owner", name, failed="owner", message=rule.message,
                            reason="path belongs to another member")
        failed = _unmet(rule.require, principal)
        if failed:
            condition, reason = failed
            return Decision("deny", rule.access, name, reason=reason, failed=condition,
                            message=rule.message)
        return self._fresh_enough(rule, principal) or Decision("allow", rule.access, name)

    def _fresh_enough(self, rule: _CompiledRule, principal: Principal) -> Decision | None:
        """A ``step_up`` when the member's authentication is not the kind or not as recent
        as ``rule`` needs, else None. Both are asked for in one sign-in."""
        context = (rule.authn_context
                   and principal.authn_context not in rule.authn_context)
        age = self._clock() - principal.authn_instant
        stale = rule.max_auth_age is not None and not -_AHEAD <= age <= rule.max_auth_age
        if not context and not stale:
            return None
        if context:
            failed = "authn_context"
            reason = (f"signed in with {principal.authn_context or 'no authentication context'}"
                      f", needs {' or '.join(rule.authn_context)}")
        else:
            failed = "max_auth_age"
            reason = (f"signed in {max(int(age), 0)} s ago, needs a sign-in within "
                      f"{rule.max_auth_age} s")
        return Decision("step_up", rule.access, rule.exact.text, reason=reason, failed=failed,
                        message=rule.message, authn_context=rule.authn_context,
                        force=stale)


# Seconds an AuthnInstant may lie in the future and still count as fresh (the IdP's clock
# may be ahead of ours; the SAML checks allow at most this much skew too).
_AHEAD = 300


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
