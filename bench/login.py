"""The login path: one real login through the dev IdP, and ACS throughput.

``real_login`` drives the browser's steps with httpx (as ``tests/browser.py`` does).
``acs_throughput`` measures the gateway's share alone: it opens N pending logins
(``/saml/login``), mints one fresh, validly signed Response per login with the dev
IdP's key, then posts them all at once to ``/saml/acs``, each once.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit

import aiohttp
import httpx
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from bench.servers import Proc
from gateway.demo.stack import DemoStack
from gateway.devidp.response import (
    build_response,
    new_id,
    parse_authn_request,
    parse_redirect_query,
)
from gateway.devidp.users import DEMO_USERS, NAMEID_PERSISTENT, persistent_name_id

_INPUT = re.compile(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', re.S)
_FORM = re.compile(r'<form[^>]*action="([^"]+)"', re.S)
MEMBER = DEMO_USERS[0]  # alice, an active member


def real_login(stack: DemoStack, path: str) -> str:
    """Sign ``alice`` in through the dev IdP; returns the session cookie (``name=value``)."""
    base = stack.gateway_url
    with httpx.Client(timeout=20) as http:
        first = http.get(base + path)
        assert first.status_code == 302, first.status_code
        start = http.get(f"{base}/saml/login?idp={quote(stack.idp.entity_id, safe='')}"
                         f"&next={quote(path, safe='')}")
        assert start.status_code == 302, start.text
        done = _at_idp(http, http.get(start.headers["location"]))
        assert done.status_code == 302, done.text
        name = stack.settings.session.cookie_name
        return f"{name}={http.cookies[name]}"


def mellon_login(base: str, path: str) -> str:
    """Sign ``alice`` in at Apache with mod_auth_mellon through its dev IdP; returns the
    mellon session cookie (``name=value``)."""
    with httpx.Client(timeout=20) as http:
        first = http.get(base + path)
        assert first.status_code in (302, 303), first.status_code
        page = http.get(first.headers["location"], follow_redirects=True)  # via /mellon/login
        done = _at_idp(http, page)
        assert done.status_code in (302, 303), done.text
        cookie = "mellon-cookie"
        ok = http.get(base + path, cookies={cookie: http.cookies[cookie]})
        assert ok.status_code == 200, ok.status_code
        return f"{cookie}={http.cookies[cookie]}"


def _at_idp(http: httpx.Client, page: httpx.Response) -> httpx.Response:
    """``alice`` signs in on the dev IdP's page; its Response is posted to the SP."""
    assert page.status_code == 200, (page.status_code, page.text[:500])
    fields = _fields(page.text)
    fields.update(username=MEMBER.username, password="demo")
    fields.pop("use_session", None)
    posted = http.post(urljoin(str(page.url), _action(page.text)), data=fields)
    answer = _fields(posted.text)
    return http.post(_action(posted.text), data={"SAMLResponse": answer["SAMLResponse"],
                                                 "RelayState": answer["RelayState"]})


@dataclass
class Pending:
    relay_state: str
    request_id: str
    cookie: str  # the login binding cookie, name=value


async def _start_logins(stack: DemoStack, count: int, path: str) -> list[Pending]:
    url = (f"{stack.gateway_url}/saml/login?idp={quote(stack.idp.entity_id, safe='')}"
           f"&next={quote(path, safe='')}")
    limit = asyncio.Semaphore(16)

    async def one(http: aiohttp.ClientSession) -> Pending:
        async with limit, http.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, resp.status
            query = parse_redirect_query(urlsplit(resp.headers["location"]).query)
            cookie = resp.headers["set-cookie"].split(";", 1)[0]
        request = parse_authn_request(unquote(query["SAMLRequest"]))
        return Pending(unquote(query["RelayState"]), request.id, cookie)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))


def _mint(stack: DemoStack, pending: Pending) -> str:
    idp = stack.idp
    now = time.time()
    xml = build_response(
        idp_entity_id=idp.entity_id, key_pem=idp.key_pem, cert_pem=idp.cert_pem,
        acs_url=idp.sp_acs_url, sp_entity_id=idp.sp_entity_id,
        in_response_to=pending.request_id,
        name_id=persistent_name_id(idp.entity_id, MEMBER.username),
        name_id_format=NAMEID_PERSISTENT, attributes=MEMBER.attributes,
        session_index=new_id(), now=now, session_not_on_or_after=now + 8 * 3600,
    )
    return str(OneLogin_Saml2_Utils.b64encode(xml))


async def _post_all(stack: DemoStack, work: list[tuple[Pending, str]],
                    concurrency: int) -> tuple[float, int]:
    url = stack.gateway_url + "/saml/acs"
    queue = list(reversed(work))
    failures = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        while queue:
            pending, response = queue.pop()
            form = {"SAMLResponse": response, "RelayState": pending.relay_state}
            async with http.post(url, data=form, headers={"Cookie": pending.cookie},
                                 allow_redirects=False) as resp:
                await resp.read()
                failures += resp.status != 302

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - started, failures


def acs_throughput(stack: DemoStack, gateway: Proc, count: int, path: str,
                   concurrency: int = 16) -> dict[str, float]:
    cpu0 = gateway.cpu_seconds()
    pending = asyncio.run(_start_logins(stack, count, path))
    cpu1 = gateway.cpu_seconds()
    work = [(p, _mint(stack, p)) for p in pending]
    cpu2 = gateway.cpu_seconds()
    elapsed, failures = asyncio.run(_post_all(stack, work, concurrency))
    cpu3 = gateway.cpu_seconds()
    if failures:
        raise RuntimeError(f"{failures} of {count} ACS posts were refused; see the gateway log")
    return {
        "logins": count,
        "concurrency": concurrency,
        "acs_per_s": round(count / elapsed, 1),
        "acs_cpu_ms": round((cpu3 - cpu2) * 1000 / count, 2),
        "start_cpu_ms": round((cpu1 - cpu0) * 1000 / count, 2),
    }


def _fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in _INPUT.findall(page)}


def _action(page: str) -> str:
    match = _FORM.search(page)
    assert match, "no form on the page"
    return html.unescape(match.group(1))
