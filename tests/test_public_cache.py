"""``[[rules]] cache``: a public rule's Cache-Control, for anonymous answers whose
upstream set none. Gated answers, and every answer to a signed-in member, stay
``private, no-store``; a ``cache`` on a gated rule is refused by the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config_schema import Rule
from gateway.proxy_headers import ResponseRules
from tests.browser import client, login
from tests.conftest import TLSFiles, run_stack

CACHE = "public, max-age=300"
EXTRA = f'''
[[rules]]
path = "/open/**"
access = "public"
cache = "{CACHE}"
'''


def test_public_rule_cache_over_real_sockets(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, extra_config=EXTRA) as stack, client(stack) as http:
        anonymous = http.get(stack.url + "/open/page")
        assert anonymous.status_code == 200
        assert anonymous.headers.get_list("cache-control") == [CACHE]
        other_public = http.get(stack.url + "/public/page")  # a public rule without cache
        assert "cache-control" not in other_public.headers
        login(http, stack, "/issues/2023-03/pages/14", "alice")
        member = http.get(stack.url + "/open/page")  # identity headers went upstream
        assert member.headers.get_list("cache-control") == ["private, no-store"]
        gated = http.get(stack.url + "/issues/2023-03/pages/14")
        assert gated.headers.get_list("cache-control") == ["private, no-store"]


def test_the_upstreams_own_cache_control_wins() -> None:
    rules = ResponseRules(name="up", upstream_url="http://127.0.0.1:9000",
                          public_url="https://reader.example.org")
    own = [(b"Cache-Control", b"no-cache")]
    assert rules.apply(own, False, CACHE.encode())[0] == [(b"cache-control", b"no-cache")]
    assert rules.apply([], False, CACHE.encode())[0] == [(b"cache-control", CACHE.encode())]
    assert rules.apply([], True, CACHE.encode())[0][0] == (b"cache-control",
                                                            b"private, no-store")


@pytest.mark.parametrize("access", ["registered", "member", "owner"])
def test_cache_is_refused_on_gated_rules(access: str) -> None:
    with pytest.raises(ValidationError, match="only for access = \"public\""):
        Rule(path="/members/{member_id}/**", access=access, cache=CACHE)  # type: ignore[arg-type]


def test_cache_value_must_be_a_header_value() -> None:
    with pytest.raises(ValidationError, match="printable ASCII"):
        Rule(path="/open/**", access="public", cache="public\r\nSet-Cookie: a=1")
    assert Rule(path="/open/**", access="public", cache=f" {CACHE} ").cache == CACHE
