"""Federation scale: load a signed aggregate of 5,000 IdPs, against one IdP.

    .venv/bin/python -m bench.aggregate [--idps 5000]

Generates a signed ``md:EntitiesDescriptor`` (as a federation publishes it: mdui
UI information, a signing certificate, Redirect SSO and SLO per IdP, plus one unusable entity
in a hundred: POST-only SSO or no signing certificate), puts it where the gateway keeps
the cached copy of a ``[[metadata]]`` URL, and in a fresh process per size measures
what a starting gateway does with it: ``MetadataRefresher.start`` (signature check,
parse, python3-saml settings per IdP, swap into the registry). RSS is read from
``/proc/self/status`` before and after, in the same process; the figure reported is
the growth at N IdPs minus the growth at one IdP.

Then, in the same process, what discovery costs at that size (``saml.discovery``): the
search index build, the slowest of a few searches (median of 21 runs), the sign-in
page's size (empty and with 20 results) and render time, what the whole list would
weigh, and the DiscoFeed's build time and size (plain and gzip). Every IdP carries
mdui keywords, a description, an information URL, a logo, a domain hint and a scope.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.config import MetadataSource
from gateway.demo.stack import prepare
from gateway.keys import generate_self_signed, pem_body

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.saml import IdPRegistry

TARGET_SECONDS = 2.0
TARGET_MB = 50.0
URL = "https://federation.example/aggregate.xml"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
SHIBMD = "urn:mace:shibboleth:metadata:1.0"


def _idp(i: int, cert: str, broken: str = "") -> str:
    """IdP number ``i`` as a federation lists it: mdui names in two languages, a
    description, keywords, an information URL and a logo, a domain hint, a scope."""
    host = f"idp{i}.university{i}.example"
    sso = C.BINDING_HTTP_POST if broken == "post" else C.BINDING_HTTP_REDIRECT
    key = "" if broken == "nocert" else (
        '<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>'
        f"{cert}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>")
    return (f'<md:EntityDescriptor entityID="https://{host}/idp/shibboleth">'
            '<md:IDPSSODescriptor protocolSupportEnumeration="'
            'urn:oasis:names:tc:SAML:2.0:protocol">'
            f'<md:Extensions><shibmd:Scope xmlns:shibmd="{SHIBMD}" regexp="false">'
            f"uni{i}.ac.example</shibmd:Scope>"
            f'<mdui:UIInfo xmlns:mdui="{MDUI}">'
            f'<mdui:DisplayName xml:lang="en">University number {i}</mdui:DisplayName>'
            f'<mdui:DisplayName xml:lang="de">Universität Nummer {i}</mdui:DisplayName>'
            f'<mdui:Description xml:lang="en">Staff and students of University {i}'
            "</mdui:Description>"
            f'<mdui:Keywords xml:lang="en">campus{i} research+library</mdui:Keywords>'
            f'<mdui:InformationURL xml:lang="en">https://university{i}.example/about'
            "</mdui:InformationURL>"
            f'<mdui:Logo height="60" width="80">https://university{i}.example/logo.png'
            "</mdui:Logo>"
            f'</mdui:UIInfo><mdui:DiscoHints xmlns:mdui="{MDUI}">'
            f"<mdui:DomainHint>university{i}.example</mdui:DomainHint></mdui:DiscoHints>"
            "</md:Extensions>"
            f"{key}"
            f'<md:SingleLogoutService Binding="{C.BINDING_HTTP_REDIRECT}" '
            f'Location="https://{host}/idp/profile/SAML2/Redirect/SLO"/>'
            f'<md:SingleSignOnService Binding="{sso}" '
            f'Location="https://{host}/idp/profile/SAML2/Redirect/SSO"/>'
            "</md:IDPSSODescriptor>"
            f"<md:Organization><md:OrganizationName xml:lang=\"en\">University {i}"
            f"</md:OrganizationName><md:OrganizationDisplayName xml:lang=\"en\">University {i}"
            f"</md:OrganizationDisplayName><md:OrganizationURL xml:lang=\"en\">"
            f"https://university{i}.example/</md:OrganizationURL></md:Organization>"
            "</md:EntityDescriptor>")


def entities(count: int, certs: int = 16) -> tuple[str, int]:
    """An unsigned aggregate of ``count`` IdPs (about one in a hundred unusable, signing
    certificates taken from ``certs`` generated ones) and how many are unusable."""
    bodies = [pem_body(generate_self_signed(f"idp signer {n}")[1]) for n in range(certs)]
    listed, broken = [], 0
    for i in range(count):
        kind = "" if count < 100 or i % 100 != 50 else ("post" if i % 200 == 50 else "nocert")
        broken += bool(kind)
        listed.append(_idp(i, bodies[i % len(bodies)], kind))
    xml = (f'<md:EntitiesDescriptor xmlns:md="{C.NS_MD}" xmlns:ds="{C.NS_DS}" '
           'Name="https://federation.example" cacheDuration="PT6H">'
           + "".join(listed) + "</md:EntitiesDescriptor>")
    return xml, broken


def aggregate(count: int, signer: tuple[str, str]) -> tuple[bytes, int]:
    """A signed aggregate of ``count`` IdPs (about one in a hundred unusable) and how many
    of them are unusable."""
    xml, broken = entities(count)
    signed = OneLogin_Saml2_Utils.add_sign(xml, signer[0], signer[1])
    return (signed if isinstance(signed, bytes) else signed.encode()), broken


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(workdir: Path) -> dict[str, float]:
    """In a fresh process: start the refresher on the cached aggregate, as ``serve`` does."""
    from gateway.saml import IdPRegistry, ServiceProvider
    from gateway.saml.metadata_source import MetadataRefresher

    demo = prepare(workdir / "demo")
    config = MetadataSource(url=URL, signing_cert=workdir / "fed.pem",
                            cache_dir=workdir / "cache")
    registry = IdPRegistry()
    sp = ServiceProvider(demo.settings, IdPRegistry())
    refresher = MetadataRefresher([config], registry, sp)
    refresher.sources[0].next_at = float("inf")
    gc.collect()
    before = _rss_mb()
    started = time.perf_counter()

    async def start() -> None:
        await refresher.start()
        await refresher.stop()

    asyncio.run(start())
    seconds = time.perf_counter() - started
    gc.collect()
    loaded = {"idps": len(registry), "skipped": registry.skipped_count(),
              "seconds": seconds, "rss_mb": _rss_mb() - before,
              "peak_mb": _rss_mb("VmHWM") - before}
    return {**loaded, **discovery(registry, demo.settings)}


def _timed(call: Callable[[], object], runs: int = 1) -> float:
    """The median seconds of ``runs`` calls."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def discovery(registry: IdPRegistry, settings: Settings) -> dict[str, float]:
    """What the sign-in page and the DiscoFeed cost with this registry: the search index
    build, the slowest query's median time, page sizes, the feed's build time and size."""
    from starlette.requests import Request

    from gateway.cookies import Cookies
    from gateway.saml import sign_in
    from gateway.saml.discovery import Discovery
    from gateway.web import render

    found = Discovery(registry)
    index_s = _timed(found.catalogue)
    catalogue = found.catalogue()
    n = len(catalogue) * 7 // 8
    queries = [f"university number {n}", f"campus{n}", f"alice@university{n}.example",
               f"uni{n}.ac.example", "nummer", "university", "no such organisation"]
    search_s = max(_timed(partial(catalogue.search, q, 20), 21) for q in queries)
    cookies = Cookies(secure=True, session_name="gw", session_lifetime=3600, stash_ttl=600)

    def page(query: str) -> int:
        scope = {"type": "http", "method": "GET", "path": sign_in.LOGIN_PATH, "headers": [],
                 "query_string": urlencode({"q": query, "next": "/"}).encode()}
        return len(sign_in.page(settings, cookies, registry, catalogue, Request(scope),
                                "/").body)

    everyone = [sign_in.entry(i, catalogue.text(i), True) for i in catalogue.idps]
    full = render("sign_in.html", entries=everyone, total=len(catalogue), next="/", q="",
                  last="", login_path=sign_in.LOGIN_PATH, full=True, more=0,
                  matched=len(everyone), max_query=100, searchable=True)[2]
    page_s = _timed(lambda: page("university"), 21)
    feed_s = _timed(catalogue.feed)
    feed = catalogue.feed()
    return {"index_s": index_s, "search_s": search_s, "page_s": page_s,
            "page_kb": page("") / 1e3, "results_page_kb": page("university") / 1e3,
            "full_list_kb": len(full) / 1e3, "feed_s": feed_s, "feed_mb": len(feed.body) / 1e6,
            "feed_gzip_mb": len(feed.gzipped) / 1e6}


def measure(count: int, signer: tuple[str, str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "fed.pem").write_text(signer[1])
        data, _ = aggregate(count, signer)
        from gateway.saml.metadata_source import cache_paths

        config = MetadataSource(url=URL, signing_cert=work / "fed.pem", cache_dir=work / "cache")
        xml_path = cache_paths(config)[0]
        xml_path.parent.mkdir(parents=True)
        xml_path.write_bytes(data)
        out = subprocess.run([sys.executable, "-m", "bench.aggregate", "--child", str(work)],
                             check=True, capture_output=True, text=True).stdout
        result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        result["document_mb"] = len(data) / 1e6
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idps", type=int, default=5000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    signer = generate_self_signed("federation metadata signer")
    one, many = measure(1, signer), measure(args.idps, signer)
    extra = many["rss_mb"] - one["rss_mb"]
    for label, r in (("1 IdP", one), (f"{args.idps} IdPs", many)):
        print(f"{label:>10}: document {r['document_mb']:.2f} MB, loaded {r['idps']:.0f} IdPs, "
              f"skipped {r['skipped']:.0f}, start {r['seconds']:.2f} s, "
              f"RSS +{r['rss_mb']:.1f} MB (peak +{r['peak_mb']:.1f} MB while parsing)")
    for label, r in (("1 IdP", one), (f"{args.idps} IdPs", many)):
        print(f"{label:>10}: search index {r['index_s'] * 1e3:.0f} ms, slowest search "
              f"{r['search_s'] * 1e3:.2f} ms, sign-in page {r['page_kb']:.1f} kB "
              f"({r['results_page_kb']:.1f} kB with 20 results, in "
              f"{r['page_s'] * 1e3:.2f} ms; the whole list would be "
              f"{r['full_list_kb']:.0f} kB), DiscoFeed {r['feed_mb']:.2f} MB "
              f"({r['feed_gzip_mb']:.2f} MB gzip) built in {r['feed_s'] * 1e3:.0f} ms")
    ok = many["seconds"] < TARGET_SECONDS and extra < TARGET_MB
    print(f"{args.idps} IdPs vs 1: {many['seconds']:.2f} s (target < {TARGET_SECONDS:g} s), "
          f"RSS +{extra:.1f} MB more (target < {TARGET_MB:g} MB): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
