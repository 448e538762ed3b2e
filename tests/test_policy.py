"""Access rules: first match wins, default member, owner and require conditions; matching in
bounded steps, named owner parameters, per-upstream case and suffix readings (issue 14, 7)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Rule, Upstream
from gateway.policy import Decision, Pattern, Policy, segments, unicode_fold
from gateway.principal import Principal

MEMBER = "urn:mace:example.org:entitlement:member"
ADMIN = "urn:mace:example.org:entitlement:admin"

RULES = [
    Rule(path="/public/**", access="public"),
    Rule(path="/issues/**", access="member",
         require={"entitlement": MEMBER, "status": "active"}, message="Renew to read."),
    Rule(path="/members/{member_id}/notes/**", access="owner"),
    Rule(path="/_gateway/admin/**", access="member", require={"entitlement": ADMIN}),
    Rule(path="/only/*/one", access="public"),
]


def person(member_id: str = "M1", status: str = "active", *ents: str,
           subject: str | None = None, **attributes: tuple[str, ...]) -> Principal:
    return Principal(subject=member_id if subject is None else subject, idp="https://idp",
                     attributes={"member_id": (member_id,), "status": (status,),
                                 "entitlements": ents or (MEMBER,), **attributes})


@pytest.fixture
def policy() -> Policy:
    return Policy(RULES)


@pytest.mark.parametrize(("path", "kind"), [
    ("/public", "allow"), ("/public/", "allow"), ("/public/a/b/c", "allow"),
    ("/publicity", "login"), ("/issues/1", "login"), ("/", "login"), ("/anything", "login"),
    ("/only/x/one", "allow"), ("/only/x/y/one", "login"), ("/only/one", "login"),
])
def test_anonymous(policy: Policy, path: str, kind: str) -> None:
    assert policy.decide(path, None).kind == kind


def test_member_rules(policy: Policy) -> None:
    alice = person()
    assert policy.decide("/issues/2023-03/pages/14", alice).kind == "allow"
    assert policy.decide("/elsewhere", alice).kind == "allow"  # default: any member
    lapsed = policy.decide("/issues/2023-03/pages/14", person(status="lapsed"))
    assert (lapsed.kind, lapsed.failed, lapsed.message) == ("deny", "status", "Renew to read.")
    assert lapsed.reason == "membership status is lapsed, needs active"
    no_ent = policy.decide("/issues/x", person("M1", "active", "urn:other"))
    assert (no_ent.kind, no_ent.failed) == ("deny", "entitlement")
    assert policy.decide("/_gateway/admin/x", alice).kind == "deny"
    assert policy.decide("/_gateway/admin/x", person("M3", "active", MEMBER, ADMIN)).kind \
        == "allow"


def test_owner_rule(policy: Policy) -> None:
    alice = person("M1001")
    assert policy.decide("/members/M1001/notes", alice).kind == "allow"
    assert policy.decide("/members/M1001/notes/4/edit", alice).kind == "allow"
    other = policy.decide("/members/M1004/notes", alice)
    assert (other.kind, other.failed) == ("deny", "owner")
    assert policy.decide("/members/M1004/notes", None).kind == "login"


def test_owner_rule_compares_the_subject_not_the_asserted_number(policy: Policy) -> None:
    """A member of a scoped IdP asserting M1001 is not the owner of M1001's notes."""
    scoped = person("M1001", subject="https://idp-b.example.org/idp!M1001")
    denied = policy.decide("/members/M1001/notes", scoped)
    assert (denied.kind, denied.failed) == ("deny", "owner")


def test_require_attributes() -> None:
    policy = Policy([
        Rule(path="/staff/**", access="member",
             require={"attributes": {"affiliation": ["staff", "faculty"]}}, message="Staff."),
        Rule(path="/both/**", access="member",
             require={"attributes": {"affiliation": "staff", "idp": ["https://idp"]}}),
    ])
    staff = person(affiliation=("member", "staff"))
    assert policy.decide("/staff/x", staff).kind == "allow"
    assert policy.decide("/both/x", staff).kind == "allow"
    member = person(affiliation=("member",))
    denied = policy.decide("/staff/x", member)
    assert (denied.kind, denied.failed, denied.message) == ("deny", "attributes", "Staff.")
    assert denied.reason == "attribute affiliation is not staff or faculty"
    assert policy.decide("/staff/x", person()).failed == "attributes"  # not released at all
    elsewhere = Principal(subject="M1", idp="https://other",
                          attributes={"affiliation": ("staff",)})
    assert policy.decide("/both/x", elsewhere).failed == "attributes"


def test_gated_flag(policy: Policy) -> None:
    assert not policy.decide("/public/x", None).gated
    assert policy.decide("/issues/x", person()).gated


def test_owner_rule_without_parameter_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"owner rule needs a \{parameter\} segment"):
        Rule(path="/members/**", access="owner")


def test_registered_rule() -> None:
    policy = Policy([Rule(path="/issues/free-2024/**", access="registered"),
                     Rule(path="/issues/**", access="member")])
    visitor = Principal(subject="R-1", idp="", kind="registered",
                        attributes={"status": ("registered",)})
    assert policy.decide("/issues/free-2024/pages/1", None).kind == "register"
    assert policy.decide("/issues/free-2024/pages/1", visitor).kind == "allow"
    assert policy.decide("/issues/free-2024/pages/1", person()).kind == "allow"
    member_only = policy.decide("/issues/2023-03/pages/1", visitor)
    assert (member_only.kind, member_only.reason) == ("login", "a member sign-in is needed")


# -- Matching in bounded steps (issue 14, item 7a) --------------------------------------------

def reference_match(parts: list[str], segs: list[str]) -> bool:
    """The patterns' meaning, by plain recursion (exponential; for small inputs only)."""
    if not parts:
        return not segs
    head, rest = parts[0], parts[1:]
    if head == "**":
        return any(reference_match(rest, segs[k:]) for k in range(len(segs) + 1))
    if not segs:
        return False
    one = head == "*" or (head.startswith("{") and head.endswith("}"))
    return (one or head == segs[0]) and reference_match(rest, segs[1:])


@pytest.mark.parametrize("pattern", [
    "/**/a/**/a/**/b", "/**/a/**/b/**/c", "/**/*/**/*/**/b", "/**/a/a/**/a/a/**/a/b",
    "/**/a/**/a/**/a/**/a/**/b", "/x/**/a/**/a/**/b/y",
    # the tail matches, so the middle blocks are searched along the whole path
    "/**/a/a/a/b/**/a/**/a", "/**/a/b/**/a/**/a", "/**/*/*/b/**/**/*",
    "/a/**/a/a/a/a/a/a/a/b/**/a",
])
def test_hostile_path_matches_in_bounded_steps(pattern: str) -> None:
    """A 4 KB path of 2,048 segments against rules with three or more ``**``: the number of
    part comparisons is at most (parts x segments), counted, not timed. (The backtracking
    matcher took 0.49 s of CPU with two ``**`` and 42 s with three.)"""
    path = "/a" * 2048
    assert len(path) == 4096
    compiled = Pattern(pattern)
    segs = segments(path)
    steps = compiled.steps(segs)
    assert not compiled.match(segs)
    assert 0 < steps <= len(compiled.parts) * len(segs)
    policy = Policy([Rule(path=pattern, access="public")])
    assert policy.decide(path, None).kind == "login"  # fell through to the default rule
    assert Pattern(pattern).match(segments("/a" * 2047 + "/b")) == pattern.endswith("/b")


def test_steps_grow_linearly_with_the_path() -> None:
    pattern = Pattern("/**/a/a/a/b/**/a/**/a")
    steps = [pattern.steps(["a"] * n) for n in (500, 1000, 2000)]
    assert steps[2] - steps[1] == 2 * (steps[1] - steps[0])  # a straight line, not a curve


_PARTS = st.sampled_from(["a", "b", "*", "**", "{p}"])


@settings(max_examples=600, deadline=None)
@given(parts=st.lists(_PARTS, max_size=7), segs=st.lists(st.sampled_from(["a", "b"]),
                                                         max_size=9))
def test_matcher_means_what_the_patterns_always_meant(parts: list[str], segs: list[str]) -> None:
    """``*`` one segment, ``**`` any number including none, ``{name}`` one segment."""
    names = iter(f"{{p{i}}}" for i in range(len(parts)))
    parts = [next(names) if p == "{p}" else p for p in parts]
    pattern = Pattern("/" + "/".join(parts))
    assert pattern.match(segs) == reference_match(parts, segs), (parts, segs)
    assert pattern.steps(segs) <= len(parts) * max(len(segs), 1)


# -- Owner parameter named, partial parameters refused (item 7b) ------------------------------

def test_owner_rule_with_two_parameters_compares_the_named_one() -> None:
    policy = Policy([Rule(path="/{org}/members/{member_id}/notes/**", access="owner",
                          owner="member_id")])
    alice = person("M1001")
    other = policy.decide("/M1001/members/M1002/notes", alice)
    assert (other.kind, other.failed) == ("deny", "owner")
    assert policy.decide("/acme/members/M1001/notes", alice).kind == "allow"
    assert policy.decide("/M1001/members/M1001/notes/3", alice).kind == "allow"


def test_owner_parameter_may_sit_after_a_double_star() -> None:
    policy = Policy([Rule(path="/**/notes/{member_id}", access="owner")])
    alice = person("M1001")
    assert policy.decide("/a/b/notes/M1001", alice).kind == "allow"
    assert policy.decide("/a/notes/M1001/notes/M1002", alice).failed == "owner"


@pytest.mark.parametrize(("rule", "error"), [
    ({"path": "/{org}/members/{member_id}/notes/**", "access": "owner"},
     r"several parameters \(org, member_id\): name the one that must equal the member's "
     r"subject with owner = \"\.\.\.\""),
    ({"path": "/members/id-{member_id}/notes", "access": "owner"},
     r"a parameter must be a whole segment: 'id-\{member_id\}'"),
    ({"path": "/members/{member_id}.json", "access": "owner"},
     r"a parameter must be a whole segment: '\{member_id\}\.json'"),
    ({"path": "/members/{member-id}/notes", "access": "member"},
     r"a parameter must be a whole segment: '\{member-id\}'"),
    ({"path": "/{id}/x/{id}", "access": "owner"}, r"parameter \{id\} appears twice"),
    ({"path": "/members/{member_id}", "access": "owner", "owner": "subject"},
     r"owner = 'subject' is not a parameter of the path \(its parameters: member_id\)"),
    ({"path": "/members/{member_id}", "access": "member", "owner": "member_id"},
     r"owner is only for access = \"owner\""),
    ({"path": "/**/{member_id}/**", "access": "owner"},
     r"the owner parameter \{member_id\} must have a fixed place"),
    ({"path": "/files/*.pdf", "access": "public"},
     r"'\*' and '\*\*' must be a whole segment, not part of '\*\.pdf'"),
    ({"path": "/files/**x", "access": "public"},
     r"'\*' and '\*\*' must be a whole segment, not part of '\*\*x'"),
    ({"path": "/files//x", "access": "public"}, r"has an empty segment"),
])
def test_ambiguous_rules_are_config_errors(rule: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Rule.model_validate(rule)


def test_owner_parameter_defaults_to_the_only_one() -> None:
    assert Rule(path="/members/{member_id}/notes/**", access="owner").owner_parameter \
        == "member_id"
    assert Rule(path="/{org}/m/{member_id}", access="owner", owner="member_id").parameters \
        == ["org", "member_id"]


# -- Default rule and per-upstream matching (item 7c) -----------------------------------------

EXACT_AND_LOOSE = [
    Upstream(name="exact", prefix="/", url="http://127.0.0.1:1"),
    Upstream(name="iis", prefix="/iis", url="http://127.0.0.1:2", case_insensitive=True),
    Upstream(name="rails", prefix="/rails", url="http://127.0.0.1:3",
             strip_suffixes=[".json", ".xml"]),
    Upstream(name="spring", prefix="/spring", url="http://127.0.0.1:4", case_insensitive=True,
             strip_suffixes=[".*"]),
]


@pytest.fixture
def loose() -> Policy:
    return Policy(RULES, upstreams=EXACT_AND_LOOSE)


def test_the_default_rule_is_configurable() -> None:
    public = Policy([Rule(path="/issues/**", access="member")], default="public")
    assert public.decide("/anything", None) == Decision("allow", "public", "/**")
    assert public.decide("/issues/1", None).kind == "login"
    assert Policy([]).decide("/anything", None).kind == "login"  # member, as always
    registered = Policy([], default="registered").decide("/x", None)
    assert (registered.kind, registered.access) == ("register", "registered")


@pytest.mark.parametrize("path", ["/Members/M1002/notes", "/MEMBERS/M1002/NOTES/1",
                                  "/members/M1002/Notes"])
def test_exact_upstream_reads_other_cases_as_other_paths(loose: Policy, path: str) -> None:
    """The documented default: an exact upstream gets the default rule for these."""
    assert loose.decide(path, person("M1001"), upstream="exact").rule == "/**"
    assert loose.decide(path, person("M1001")).rule == "/**"  # no upstream: exact too


@pytest.mark.parametrize("path", ["/Members/M1002/notes", "/MEMBERS/M1002/NOTES/1",
                                  "/members/M1002/Notes", "/mEmBeRs/M1002/notes"])
def test_case_insensitive_upstream(loose: Policy, path: str) -> None:
    decision = loose.decide(path, person("M1001"), upstream="iis")
    assert (decision.kind, decision.failed) == ("deny", "owner")
    assert loose.decide("/MEMBERS/M1001/Notes", person("M1001"), upstream="iis").kind == "allow"
    # the owner segment itself is compared exactly: m1001 is not M1001's own spelling
    assert loose.decide("/members/m1001/notes", person("M1001"), upstream="iis").failed \
        == "owner"
    lapsed = loose.decide("/ISSUES/2023-03/pages/14", person(status="lapsed"), upstream="iis")
    assert (lapsed.kind, lapsed.failed) == ("deny", "status")
    assert loose.decide("/PUBLIC/about", None, upstream="iis").kind == "allow"


@pytest.mark.parametrize("spelling", ["\u0131ssues", "\u0130SSUES", "\u017fomething"])
def test_case_insensitive_reads_every_unicode_folding(loose: Policy, spelling: str) -> None:
    """Dotless i and dotted capital I are ``i`` to Java's equalsIgnoreCase, long s is ``s``:
    a path that may be read as ``/issues/…`` is decided as ``/issues/…`` too, and must pass
    both readings."""
    policy = Policy([Rule(path="/something/**", access="member",
                          require={"status": "active"}), *RULES], upstreams=EXACT_AND_LOOSE)
    lapsed = policy.decide(f"/{spelling}/x", person(status="lapsed"), upstream="iis")
    assert (lapsed.kind, lapsed.failed) == ("deny", "status")
    assert policy.decide(f"/{spelling}/x", person(status="lapsed"), upstream="exact").kind \
        == "allow"


def test_unicode_folding_covers_every_character_that_reads_as_ascii() -> None:
    for code in range(0x80, 0x110000):
        char = chr(code)
        for variant in (char.lower(), char.upper(), char.casefold()):
            if len(variant) == 1 and variant.isascii() and variant.isalpha():
                assert unicode_fold(char) == variant.lower(), hex(code)


@pytest.mark.parametrize(("path", "upstream"), [
    ("/members/M1002/notes.json", "rails"), ("/members/M1002/notes.XML", "rails"),
    ("/members/M1002/notes.anything", "spring"), ("/Members/M1002/Notes.Json", "spring"),
    ("/members/M1002/notes.json.xml", "spring"),
])
def test_suffix_aware_upstream(loose: Policy, path: str, upstream: str) -> None:
    decision = loose.decide(path, person("M1001"), upstream=upstream)
    assert (decision.kind, decision.failed) == ("deny", "owner")


def test_suffix_aware_upstream_keeps_what_is_meant(loose: Policy) -> None:
    alice = person("M1001")
    assert loose.decide("/members/M1001/notes.json", alice, upstream="rails").kind == "allow"
    assert loose.decide("/members/M1002/notes.html", alice, upstream="rails").rule == "/**"
    assert loose.decide("/members/M1002/notes.json", alice, upstream="exact").rule == "/**"
    # every reading must allow: /public/feed.json is /public/feed as well (both public) …
    assert loose.decide("/public/feed.json", None, upstream="rails").kind == "allow"
    # … and /only/x/one.json is both /only/x/one.json (default) and /only/x/one (public)
    assert loose.decide("/only/x/one.json", None, upstream="rails").kind == "login"


def test_owner_in_the_last_segment_of_a_suffix_aware_upstream() -> None:
    policy = Policy([Rule(path="/members/{member_id}", access="owner")],
                    upstreams=EXACT_AND_LOOSE)
    alice = person("M1001")
    assert policy.decide("/members/M1001.json", alice, upstream="rails").kind == "allow"
    assert policy.decide("/members/M1002.json", alice, upstream="rails").failed == "owner"
    assert policy.decide("/members/M1001.json", alice, upstream="exact").failed == "owner"


@pytest.mark.parametrize(("suffixes", "error"), [
    (["json"], r"'json' is not a suffix: write '\.json'"),
    ([".js/on"], r"'\.js/on' is not a suffix"),
    ([""], r"'' is not a suffix"),
])
def test_strip_suffixes_are_checked(suffixes: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Upstream(name="x", url="http://127.0.0.1:1", strip_suffixes=suffixes)


def test_unknown_upstream_is_a_programming_error(loose: Policy) -> None:
    with pytest.raises(KeyError, match="no upstream named 'nope'"):
        loose.decide("/x", None, upstream="nope")


def test_pattern_owner_must_be_a_parameter_with_a_fixed_place() -> None:
    with pytest.raises(ValueError, match=r"has no parameter \{member_id\}"):
        Pattern("/members/{id}", owner="member_id")
    with pytest.raises(ValueError, match="has no fixed place"):
        Pattern("/**/{member_id}/**", owner="member_id")
    assert Pattern("/a/**/{m}/b", owner="m").owner_value(["a", "x", "M1", "b"]) == "M1"
    assert Pattern("/{m}/**", owner="m").owner_value(["M1", "x"]) == "M1"


# -- Authentication context and freshness (issue 16) --------------------------------------

MFA = "https://refeds.org/profile/mfa"
PPT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
NOW = 1_800_000_000.0


def signed_in(context: str = PPT, age: float = 10.0, *ents: str) -> Principal:
    base = person("M1", "active", *ents)
    return Principal(subject=base.subject, idp=base.idp, attributes=base.attributes,
                     authn_context=context, authn_instant=NOW - age)


STEP_UP_RULES = [
    Rule(path="/mfa/**", access="member", require={"authn_context": [MFA, "urn:x:hardware"]}),
    Rule(path="/fresh/**", access="member", max_auth_age=600),
    Rule(path="/both/**", access="member", max_auth_age=600,
         require={"authn_context": MFA, "entitlement": ADMIN}),
    Rule(path="/Case/**", access="member", require={"authn_context": MFA}),
    Rule(path="/welcome", access="public", passive=True),
]


@pytest.fixture
def step_up_policy() -> Policy:
    return Policy(STEP_UP_RULES, upstreams=[Upstream(name="loose", prefix="/", url="http://u",
                                                     case_insensitive=True)],
                  clock=lambda: NOW)


def test_a_single_factor_session_must_step_up_for_an_mfa_rule(step_up_policy: Policy) -> None:
    decision = step_up_policy.decide("/mfa/page", signed_in(PPT))
    assert (decision.kind, decision.failed, decision.force) == ("step_up", "authn_context", False)
    assert decision.authn_context == (MFA, "urn:x:hardware")  # any one listed is enough
    assert decision.reason == f"signed in with {PPT}, needs {MFA} or urn:x:hardware"
    assert decision.gated
    assert step_up_policy.decide("/mfa/page", signed_in(MFA)).kind == "allow"
    assert step_up_policy.decide("/mfa/page", signed_in("urn:x:hardware")).kind == "allow"
    assert step_up_policy.decide("/mfa/page", signed_in("")).kind == "step_up"
    assert step_up_policy.decide("/mfa/page", None).kind == "login"  # anonymous: sign in


def test_an_old_authentication_must_be_renewed(step_up_policy: Policy) -> None:
    assert step_up_policy.decide("/fresh/x", signed_in(age=600)).kind == "allow"
    stale = step_up_policy.decide("/fresh/x", signed_in(age=601))
    assert (stale.kind, stale.failed, stale.force, stale.authn_context) == (
        "step_up", "max_auth_age", True, ())
    assert stale.reason == "signed in 601 s ago, needs a sign-in within 600 s"
    # An AuthnInstant a little in the future (IdP clock ahead) counts as now; far ahead
    # (or none at all: 0) the age is unknowable and a fresh sign-in is asked for.
    assert step_up_policy.decide("/fresh/x", signed_in(age=-200)).kind == "allow"
    assert step_up_policy.decide("/fresh/x", signed_in(age=-400)).kind == "step_up"
    assert step_up_policy.decide("/fresh/x", signed_in(age=NOW)).kind == "step_up"


def test_both_are_asked_for_in_one_step_up_but_a_deny_comes_first(
        step_up_policy: Policy) -> None:
    both = step_up_policy.decide("/both/x", signed_in(PPT, 9999, MEMBER, ADMIN))
    assert (both.kind, both.authn_context, both.force) == ("step_up", (MFA,), True)
    # A member whom no sign-in would let in is refused, not sent round the IdP.
    assert step_up_policy.decide("/both/x", signed_in(PPT, 9999)).kind == "deny"
    assert step_up_policy.decide("/both/x", signed_in(MFA, 10, MEMBER, ADMIN)).kind == "allow"


def test_step_up_counts_for_every_reading_of_a_loose_upstream(step_up_policy: Policy) -> None:
    # /CASE/x is /Case/x to a case-insensitive upstream: the MFA rule applies.
    decision = step_up_policy.decide("/CASE/x", signed_in(PPT), upstream="loose")
    assert (decision.kind, decision.rule) == ("step_up", "/Case/**")


def test_passive_is_a_flag_on_an_allowed_public_page(step_up_policy: Policy) -> None:
    decision = step_up_policy.decide("/welcome", None)
    assert (decision.kind, decision.passive, decision.gated) == ("allow", True, False)
    assert not step_up_policy.decide("/mfa/x", signed_in(MFA)).passive


def test_the_policy_lists_the_contexts_a_sign_in_may_ask_for(step_up_policy: Policy) -> None:
    assert step_up_policy.authn_contexts == {MFA, "urn:x:hardware"}


@pytest.mark.parametrize("rule", [
    {"path": "/p", "access": "public", "max_auth_age": 600},
    {"path": "/p", "access": "registered", "require": {"authn_context": MFA}},
    {"path": "/p", "access": "member", "passive": True},
    {"path": "/p", "access": "member", "max_auth_age": 30},
    {"path": "/p", "access": "member", "require": {"authn_context": "mfa"}},
    {"path": "/p", "access": "member", "require": {"authn_context": 'urn:x"/><x a="'}},
])
def test_sign_in_options_refused_where_they_cannot_work(rule: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Rule.model_validate(rule)


def test_remembered_rule_choice_still_decides_per_member_and_stays_bounded() -> None:
    from gateway import policy as policy_module

    folded = Policy(RULES, upstreams=[Upstream(name="app", url="http://127.0.0.1:1",
                                               case_insensitive=True,
                                               strip_suffixes=[".json"])])
    path = "/members/M1/notes/today"
    for _ in range(2):  # the second round is answered from what the first remembered
        assert folded.decide(path, person("M1")).kind == "allow"
        assert folded.decide(path, person("M2")).failed == "owner"
        assert folded.decide(path, None).kind == "login"
        # The same path for a case-insensitive upstream is its own entry, read its way.
        assert folded.decide("/Members/M1/Notes/x.json", person("M2")).kind == "allow"
        assert folded.decide("/Members/M1/Notes/x.json", person("M2"),
                             upstream="app").failed == "owner"
        assert folded.decide("/Members/M1/Notes/x.json", person("M1"),
                             upstream="app").kind == "allow"
    with pytest.raises(KeyError):
        folded.decide(path, person("M1"), upstream="nowhere")
    for i in range(policy_module._SELECTED_LIMIT + 10):
        folded.decide(f"/public/{i}", None)
    assert len(folded._selected) <= policy_module._SELECTED_LIMIT
    long = "/public/" + "x" * policy_module._SELECTED_PATH_LIMIT
    assert folded.decide(long, None).kind == "allow"
    assert (long, None) not in folded._selected
