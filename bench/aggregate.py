"""Federation scale: load a signed aggregate of 5,000 IdPs, against one IdP.

    .venv/bin/python -m bench.aggregate [--idps 5000]

Generates a signed ``md:EntitiesDescriptor`` (as a federation publishes it: mdui
names, a signing certificate, Redirect SSO and SLO per IdP, plus one unusable entity
in a hundred: POST-only SSO or no signing certificate), puts it where the gateway keeps
the cached copy of a ``[[metadata]]`` URL, and in a fresh process per size measures
what a starting gateway does with it: ``MetadataRefresher.start`` (signature check,
parse, python3-saml settings per IdP, swap into the registry). RSS is read from
``/proc/self/status`` before and after, in the same process; the figure reported is
the growth at N IdPs minus the growth at one IdP.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.config import MetadataSource
from gateway.demo.stack import prepare
from gateway.keys import generate_self_signed, pem_body

TARGET_SECONDS = 2.0
TARGET_MB = 50.0
URL = "https://federation.example/aggregate.xml"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"


def _idp(i: int, cert: str, broken: str = "") -> str:
    sso = C.BINDING_HTTP_POST if broken == "post" else C.BINDING_HTTP_REDIRECT
    key = "" if broken == "nocert" else (
        '<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>'
        f"{cert}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>")
    return (f'<md:EntityDescriptor entityID="https://idp{i}.university{i}.example/idp/shibboleth">'
            '<md:IDPSSODescriptor protocolSupportEnumeration="'
            'urn:oasis:names:tc:SAML:2.0:protocol">'
            f'<md:Extensions><mdui:UIInfo xmlns:mdui="{MDUI}">'
            f'<mdui:DisplayName xml:lang="en">University number {i}</mdui:DisplayName>'
            f'<mdui:DisplayName xml:lang="de">Universität Nummer {i}</mdui:DisplayName>'
            "</mdui:UIInfo></md:Extensions>"
            f"{key}"
            f'<md:SingleLogoutService Binding="{C.BINDING_HTTP_REDIRECT}" '
            f'Location="https://idp{i}.university{i}.example/idp/profile/SAML2/Redirect/SLO"/>'
            f'<md:SingleSignOnService Binding="{sso}" '
            f'Location="https://idp{i}.university{i}.example/idp/profile/SAML2/Redirect/SSO"/>'
            "</md:IDPSSODescriptor>"
            f"<md:Organization><md:OrganizationName xml:lang=\"en\">University {i}"
            f"</md:OrganizationName><md:OrganizationDisplayName xml:lang=\"en\">University {i}"
            f"</md:OrganizationDisplayName><md:OrganizationURL xml:lang=\"en\">"
            f"https://university{i}.example/</md:OrganizationURL></md:Organization>"
            "</md:EntityDescriptor>")


def aggregate(count: int, signer: tuple[str, str]) -> tuple[bytes, int]:
    """A signed aggregate of ``count`` IdPs (about one in a hundred unusable) and how many
    of them are unusable."""
    certs = [pem_body(generate_self_signed(f"idp signer {n}")[1]) for n in range(16)]
    entities, broken = [], 0
    for i in range(count):
        kind = "" if count < 100 or i % 100 != 50 else ("post" if i % 200 == 50 else "nocert")
        broken += bool(kind)
        entities.append(_idp(i, certs[i % len(certs)], kind))
    xml = (f'<md:EntitiesDescriptor xmlns:md="{C.NS_MD}" xmlns:ds="{C.NS_DS}" '
           'Name="https://federation.example" cacheDuration="PT6H">'
           + "".join(entities) + "</md:EntitiesDescriptor>")
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
    return {"idps": len(registry), "skipped": registry.skipped_count(),
            "seconds": seconds, "rss_mb": _rss_mb() - before,
            "peak_mb": _rss_mb("VmHWM") - before}


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
    ok = many["seconds"] < TARGET_SECONDS and extra < TARGET_MB
    print(f"{args.idps} IdPs vs 1: {many['seconds']:.2f} s (target < {TARGET_SECONDS:g} s), "
          f"RSS +{extra:.1f} MB more (target < {TARGET_MB:g} MB): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
