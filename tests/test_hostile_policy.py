"""Policy matching under attack, over real sockets (issue 14, item 7).

(a) a 4 KB path against a rule with three ``**`` is answered at once (the matcher's step
count is bounded in ``tests/test_policy.py``; here the gateway stays responsive);
(b) an owner rule with two parameters compares the one it names, and rules whose meaning
is ambiguous (partial-segment parameters, two parameters and no ``owner``) stop ``check``;
(c) an upstream configured ``case_insensitive`` / ``strip_suffixes`` is protected for the
paths it will serve (``/Members/M1002/notes``, ``/members/M1002/notes.json``); for an
exact upstream (the default) those are other paths and take the default rule; the
same holds for ``/auth/check``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.demo.stack import DemoStack, prepare
from tests.browser import client, login
from tests.conftest import Stack, seed_demo_keys

PAGE = "/issues/2023-03/pages/14"
JSON = {"accept": "application/json"}

HOSTILE_RULE = """
[[rules]]
path = "/**/a/**/a/**/b"
access = "public"
"""

TWO_PARAMETERS = """
[[rules]]
path = "/{org}/members/{member_id}/notes/**"
access = "owner"
owner = "member_id"
"""


def upstream_paths(stack: Stack) -> list[str]:
    return [r["path"] for r in stack.upstream.requests]


@pytest.mark.stack(extra_config=HOSTILE_RULE)
def test_hostile_path_against_three_double_stars_is_answered_at_once(stack: Stack) -> None:
    """Before: 42 s of CPU on the event loop for this one request; every other client
    waited. The client gives up after 15 s."""
    hostile = "/a" * 2048  # 4,096 bytes, the longest path the gateway accepts
    with httpx.Client(verify=stack.tls.client_context(), timeout=15) as http:
        answer = http.get(stack.url + hostile, headers=JSON)
        health = http.get(stack.url + "/healthz")
    assert answer.status_code == 401  # no rule but the default (member) matched
    assert answer.json()["error"] == "Sign-in required"
    assert health.status_code == 200
    assert stack.upstream.requests == []


@pytest.mark.stack(extra_config=TWO_PARAMETERS)
def test_owner_rule_with_two_parameters_compares_the_named_one(stack: Stack) -> None:
    """Before: the first parameter ({org}) was compared, so alice (M1001) opened M1002's
    notes as /M1001/members/M1002/notes."""
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        other = http.get(stack.url + "/M1001/members/M1002/notes", headers=JSON)
        other_deep = http.get(stack.url + "/M1001/members/M1002/notes/4", headers=JSON)
        own = http.get(stack.url + "/acme/members/M1001/notes")
    assert other.status_code == 403
    assert other.json()["reason"] == "path belongs to another member"
    assert other_deep.status_code == 403
    assert own.status_code == 200
    assert upstream_paths(stack) == ["/acme/members/M1001/notes"]


@pytest.mark.parametrize(("rule", "error"), [
    ('path = "/{org}/members/{member_id}/notes/**"\naccess = "owner"',
     "key rules[12]: this owner rule has several parameters (org, member_id): name the one "
     "that must equal the member's subject with owner = \"...\""),
    ('path = "/members/id-{member_id}/notes"\naccess = "owner"',
     "key rules[12].path ('/members/id-{member_id}/notes'): a parameter must be a whole "
     "segment: 'id-{member_id}' (write /{name}/, a name of letters, digits and '_')"),
    ('path = "/members/{member_id}.json"\naccess = "owner"',
     "key rules[12].path ('/members/{member_id}.json'): a parameter must be a whole "
     "segment: '{member_id}.json' (write /{name}/, a name of letters, digits and '_')"),
])
def test_check_refuses_rules_that_would_match_as_something_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str, error: str) -> None:
    """Before: `check` said OK, and the rule matched as a literal (or the wrong parameter)."""
    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path)
    config = demo.workdir / "gateway.toml"
    config.write_text(config.read_text() + f"\n[[rules]]\n{rule}\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {config}: {error}"]


def loose_reader(demo: DemoStack) -> None:
    """The upstream routes like IIS or Spring: any case, and ``.json`` as a format."""
    config = demo.workdir / "gateway.toml"
    text = config.read_text()
    loose = text.replace('prefix = "/"\n', 'prefix = "/"\ncase_insensitive = true\n'
                         'strip_suffixes = [".json"]\n', 1)
    assert loose != text
    config.write_text(loose)


@pytest.mark.stack(setup=loose_reader)
def test_case_insensitive_upstream_is_protected_for_the_paths_it_serves(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    refused = ["/Members/M1002/notes", "/members/M1002/notes.json",
               "/MEMBERS/M1002/NOTES.JSON", "/members/M1002/Notes/4"]
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        answers = {path: http.get(stack.url + path, headers=JSON) for path in refused}
        own = [http.get(stack.url + p) for p in ("/members/M1001/notes.json",
                                                  "/Members/M1001/Notes")]
    for path, answer in answers.items():
        assert answer.status_code == 403, path
        assert answer.json()["reason"] == "path belongs to another member", path
    assert [o.status_code for o in own] == [200, 200]
    with client(stack) as http:
        login(http, stack, PAGE, "bob")  # lapsed: /issues/** needs an active membership
        lapsed = http.get(stack.url + "/ISSUES/2023-03/pages/14", headers=JSON)
    assert lapsed.status_code == 403
    assert lapsed.json()["reason"] == "membership status is lapsed, needs active"
    assert upstream_paths(stack) == ["/members/M1001/notes.json", "/Members/M1001/Notes"]
    # `check` shows the default rule and how each upstream is matched
    assert main(["check", "--config", str(stack.demo.workdir / "gateway.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  rules       12 (+ default: member, for every path no rule matches)" in out
    assert "  matching    reader: case-insensitive, suffixes .json" in out


@pytest.mark.stack(setup=loose_reader)
def test_forward_auth_reads_the_path_as_its_upstream_does(stack: Stack) -> None:
    """/auth/check decides for the upstream that serves the checked path, with its
    matching options (front proxy: nginx, the default)."""
    host = stack.url.split("://", 1)[1]

    def check(http: httpx.Client, uri: str) -> httpx.Response:
        return http.get(stack.url + "/auth/check", headers={
            **JSON, "X-Original-Method": "GET", "X-Original-URI": uri,
            "X-Original-Host": host})

    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        refused = [check(http, uri) for uri in ("/Members/M1002/notes",
                                                 "/members/M1002/notes.JSON")]
        own = check(http, "/MEMBERS/M1001/notes.json")
    assert [r.status_code for r in refused] == [403, 403]
    assert own.status_code == 200
    assert own.headers["x-member-id"] == "M1001"


def test_exact_upstream_reads_other_spellings_as_other_paths(stack: Stack) -> None:
    """The default, documented in docs/access-rules.md: an exact upstream (a case-sensitive
    server without format suffixes) serves /Members/… as another path than /members/…,
    so the gateway decides on it as such: here the default rule (any member)."""
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        upper = http.get(stack.url + "/Members/M1002/notes")
        suffixed = http.get(stack.url + "/members/M1002/notes.json")
        exact = http.get(stack.url + "/members/M1002/notes", headers=JSON)
    assert (upper.status_code, suffixed.status_code, exact.status_code) == (200, 200, 403)
    assert upstream_paths(stack) == ["/Members/M1002/notes", "/members/M1002/notes.json"]
