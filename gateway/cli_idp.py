"""``sso-gateway idp add · list · check``: the IdPs an admin has configured.

Part of the CLI (it prints). ``list`` and ``check`` read what a (re)starting gateway
would use: the files in ``idp_metadata/`` and, for each ``[[metadata]]`` URL, the copy
the gateway cached on disk, and the IdPs each MDQ service gave it so far (they never
download). ``add`` downloads when given a URL.

Exit codes: ``add`` 0 written, 1 refused or not confirmed; ``check`` 0 no warnings,
1 warnings (so a cron job or CI step can alert on it); 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import MetadataSource, Settings, load_settings
from gateway.saml import IdP, IdPRegistry, ServiceProvider, mdq
from gateway.saml import metadata_report as report
from gateway.saml.metadata_signature import MetadataRefused, verify_signed_metadata
from gateway.saml.metadata_source import Source, download
from gateway.saml.registry import idps_from_tree, parse_xml

ADD_TIMEOUT = 30.0
ADD_MAX_BYTES = 50 * 1024 * 1024
SKIPPED = "skipped: "  # the note of an aggregate entity left out as unusable


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=config_help)
    idp = sub.add_parser("idp", help="add, list and check IdP metadata")
    verbs = idp.add_subparsers(dest="idp_command", required=True)
    add = verbs.add_parser("add", parents=[common],
                           help="validate metadata (file or URL) and copy it into idp_metadata/")
    add.add_argument("source", metavar="FILE_OR_URL")
    add.add_argument("--yes", action="store_true", help="write without asking")
    add.add_argument("--name", help="file name in idp_metadata/ (default: from the entity ID)")
    add.add_argument("--signing-cert", type=Path,
                     help="PEM certificate the metadata's XML signature must verify against")
    verbs.add_parser("list", parents=[common], help="configured IdPs, certificates, state")
    verbs.add_parser("check", parents=[common],
                     help="warn about expiring certificates, SHA-1, missing SLO, http endpoints")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.idp_command == "add":
        return _add(settings, args.source, name=args.name, yes=args.yes,
                    signing_cert=args.signing_cert)
    rows, notes = _inventory(settings, time.time())
    if args.idp_command == "list":
        return _list(rows, notes, settings)
    return _check(rows, notes)


# -- the SP's own metadata (``sso-gateway metadata``) --------------------------------------


def sp_metadata(config: str | None, out: Path | None) -> int:
    """Print (or write to ``out``) the SP metadata the gateway serves at /saml/metadata,
    for registering the gateway with a federation or an IdP."""
    settings = load_settings(config)
    xml = ServiceProvider(settings, IdPRegistry()).metadata()
    if out is None:
        print(xml)
    else:
        out.write_text(xml + "\n")
        print(f"SP metadata of {settings.sp_entity_id} written to {out}")
    return 0


# -- add ---------------------------------------------------------------------------------


def _add(settings: Settings, source: str, *, name: str | None, yes: bool,
         signing_cert: Path | None) -> int:
    is_url = source.startswith(("http://", "https://"))
    try:
        data = (asyncio.run(download(source, ADD_TIMEOUT, ADD_MAX_BYTES)) if is_url
                else Path(source).read_bytes())
        if signing_cert is not None:
            root = verify_signed_metadata(data, signing_cert.read_text(), source)
        else:
            problems: list[str] = []
            root = parse_xml(data, source, problems)
            if root is None:
                raise MetadataRefused("; ".join(problems))
    except (OSError, MetadataRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    directory = settings.idp.metadata_dir
    problems = []
    first = idps_from_tree(root, directory / "new.xml", problems)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    target = directory / (name or _file_name(first[0].entity_id))
    if target.suffix != ".xml" or target.parent != directory:
        print(f"error: --name must be a plain file name ending in .xml, not {name!r}",
              file=sys.stderr)
        return 1
    idps = idps_from_tree(root, target, [])
    existing = IdPRegistry.load_dir(directory)
    clashes = [f"{i.entity_id} is already configured in {existing.get(i.entity_id).source}"
               for i in idps if i.entity_id in existing
               and existing.get(i.entity_id).source != target]
    for clash in clashes:
        print(f"error: {clash}", file=sys.stderr)
    if clashes:
        return 1

    now = time.time()
    print(f"{len(idps)} IdP{'s' if len(idps) != 1 else ''} in {source}"
          f"{' (signature verified)' if signing_cert else ''}:")
    for idp in idps:
        _describe(idp, now)
        for warning in report.idp_warnings(idp, now):
            print(f"  warning      {warning}")
    for warning in report.document_warnings(root):
        print(f"warning: {warning}")
    action = "replace" if target.exists() else "write"
    if not yes and not _confirm(f"{action.capitalize()} {target}? [y/N] "):
        print("Nothing written.")
        return 1
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    print(f"wrote {target}; restart the gateway (every replica) to use it")
    if is_url:
        print("It will not be refreshed: for metadata that changes, use a [[metadata]] URL.")
    return 0


def _file_name(entity_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", re.sub(r"^[a-z]+://", "", entity_id)).strip("-")
    return f"{slug[:80] or 'idp'}.xml"


def _confirm(question: str) -> bool:
    try:
        return input(question).strip().lower() in {"y", "yes"}
    except EOFError:
        return False


def _describe(idp: IdP, now: float) -> None:
    print(f"  entity ID    {idp.entity_id}")
    print(f"  name         {idp.display_name}")
    print(f"  SSO          {idp.sso_url}")
    post = f"{idp.slo_post_url} (HTTP-POST)" if idp.slo_post_url else ""
    print(f"  SLO          {idp.slo_url or post or '(none)'}")
    print(f"  scopes       {_scopes(idp)}")
    for cert in map(report.cert_info, idp.signing_certs):
        print(f"  signing cert {cert.describe(now)}")
        print(f"               {cert.subject}")
    if idp.valid_until is not None:
        print(f"  validUntil   {report.when(idp.valid_until)}")


# -- list and check ------------------------------------------------------------------------


@dataclass
class Row:
    idp: IdP
    last_refresh: str
    status: str
    document: Any  # the parsed metadata document it came from
    failing: str  # why the last refresh of its URL failed, else ""


def _inventory(settings: Settings, now: float) -> tuple[list[Row], list[str]]:
    """Every IdP a restarting gateway would load, and notes about URLs without one."""
    rows: list[Row] = []
    notes: list[str] = []
    for path in sorted(settings.idp.metadata_dir.glob("*.xml")):
        root = parse_xml(path.read_bytes(), str(path), notes)
        if root is None:
            continue
        modified = report.when(path.stat().st_mtime)
        skipped: list[str] = []
        for idp in idps_from_tree(root, path, notes, skipped=skipped):
            rows.append(Row(idp, f"file modified {modified}", _status(idp, now, ""), root, ""))
        notes += [f"{SKIPPED}{reason}" for reason in skipped]
    for config in settings.metadata:
        if config.mdq:
            rows += _mdq_rows(config, now)
            continue
        source = Source.open(config)
        state = source.state
        fetched = report.when(state.fetched_at) if state.fetched_at else "never"
        failing = f"last refresh failed: {state.error}" if state.error else ""
        try:
            data = source.cache_file.read_bytes()
            accepted = source.accept(data, now)
        except FileNotFoundError:
            notes.append(f"{config.url}: no cached copy yet (the gateway downloads it at "
                         f"start){'; ' + failing if failing else ''}")
            continue
        except (OSError, MetadataRefused) as exc:
            notes.append(f"{config.url}: cached copy not usable: {exc}")
            continue
        for idp in accepted.idps:
            rows.append(Row(idp, fetched, _status(idp, now, failing), accepted.root, failing))
        notes += [f"{SKIPPED}{reason}" for reason in accepted.skipped]
    return rows, notes


def _mdq_rows(config: MetadataSource, now: float) -> list[Row]:
    """The IdPs an MDQ service gave the gateway, as kept on disk (verified again)."""
    rows = []
    cert = config.signing_cert.read_text()
    for path in sorted(mdq.cache_dir(config).glob("*.xml")):
        try:
            data = path.read_bytes()
            root = verify_signed_metadata(data, cert, str(path))
            idp = mdq.accept(config, cert, data, (root.get("entityID") or "").strip(), now)[0]
        except (OSError, MetadataRefused):
            continue  # the gateway removes such a file when it starts
        fetched = f"fetched {report.when(path.stat().st_mtime)} (MDQ, on first use)"
        rows.append(Row(idp, fetched, _status(idp, now, ""), root, ""))
    return rows


def _status(idp: IdP, now: float, failing: str) -> str:
    if idp.valid_until is not None and idp.valid_until <= now:
        return "expired"
    states = [failing] if failing else []
    if report.expiring(idp, now):
        states.append("signing certificate expires within "
                      f"{report.EXPIRY_WARNING_DAYS} days")
    return "; ".join(states) or "ok"


def _scopes(idp: IdP, vouched: list[str] | None = None) -> str:
    """The scopes an IdP may assert: its metadata's, then those of ``[[idps]] scopes``."""
    shown = [f"{scope} (unusable: {scope.problem})" if scope.problem else str(scope)
             for scope in idp.scopes]
    shown += [f"{scope} ([[idps]] scopes)" for scope in vouched or ()]
    return ", ".join(shown) or "(none: every scoped attribute value it asserts is dropped)"


def _list(rows: list[Row], notes: list[str], settings: Settings) -> int:
    now = time.time()
    for row in sorted(rows, key=lambda r: (r.idp.display_name.casefold(), r.idp.entity_id)):
        idp = row.idp
        print(idp.entity_id)
        print(f"  name         {idp.display_name}")
        print(f"  source       {idp.origin}")
        print(f"  scopes       {_scopes(idp, settings.idp_options(idp.entity_id).scopes)}")
        for cert in map(report.cert_info, idp.signing_certs):
            print(f"  signing cert {cert.describe(now)}")
        print(f"  last refresh {row.last_refresh}")
        print(f"  status       {row.status}")
    for note in notes:
        print(f"note: {note}")
    if not rows:
        print("No IdPs configured.")
    return 0


def _check(rows: list[Row], notes: list[str]) -> int:
    now = time.time()
    # Skipped aggregate entities are the normal state of a federation feed: shown, but
    # not warnings (a cron job would alert for ever on entities no one here controls).
    for note in notes:
        if note.startswith(SKIPPED):
            print(f"note: {note}")
    warnings = [note for note in notes if not note.startswith(SKIPPED)]
    seen_documents: set[int] = set()
    for row in rows:
        warnings += [f"{row.idp.entity_id}: {w}" for w in report.idp_warnings(row.idp, now)]
        if row.failing:
            warnings.append(f"{row.idp.entity_id}: {row.failing}")
        if id(row.document) not in seen_documents:
            seen_documents.add(id(row.document))
            warnings += [f"{row.idp.origin}: {w}" for w in report.document_warnings(row.document)]
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"{len(rows)} IdP{'s' if len(rows) != 1 else ''} checked, "
          f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
    return 1 if warnings else 0
