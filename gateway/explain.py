"""A refused login, as kept in the store for 30 days, and what to tell the admin about it.

``Telemetry.login_failed`` keeps every ``LoginFailed`` as a ``Failure`` record
(``keep_failure``) under ``failure:<reference>`` (the code the member saw);
``sso-gateway explain CODE`` and the admin console's failure view read it back
(``find_failure``) and turn it into advice: which check failed, the values it compared
(``details``) and what to do about it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field

from gateway.sessions.store import Namespace, RecordStore

FAILURE_TTL = 30 * 86400  # seconds a failure stays explainable

#: For each ``LoginFailed.kind``: what failed, and what to do.
ADVICE: dict[str, tuple[str, str]] = {
    "signature": ("Bad signature: the Response or Assertion was not signed by a certificate "
                  "in the IdP's metadata.",
                  "Compare the certificate fingerprints below. If the IdP changed its key, "
                  "update its metadata (idp_metadata/ or the metadata URL); otherwise the "
                  "answer was tampered with."),
    "not_yet_valid": ("Clock skew: the assertion is not valid yet by our clock.",
                      "Check NTP on the IdP and on the gateway; the measured offset is below. "
                      "[idp] clock_skew (at most 300 s) sets how much is tolerated."),
    "expired": ("Expired or clock skew: the assertion's validity had ended by our clock.",
                "If the offset is small the member took too long or the answer was held "
                "back; if it is large, check NTP on the IdP and the gateway."),
    "audience": ("Audience mismatch: the assertion was issued for another service provider.",
                 "Register this gateway's SP entity ID (the expected value) at the IdP, or "
                 "fix [sp] entity_id."),
    "destination": ("Destination mismatch: the Response was addressed to another URL.",
                    "The IdP must post to our ACS URL (expected value): check public_url "
                    "and the ACS URL registered at the IdP."),
    "unknown_idp": ("Unknown IdP: the entity ID is not one of the configured IdPs.",
                    "Add its metadata (sso-gateway idp add) or fix the link / discovery "
                    "service that named it."),
    "in_response_to": ("InResponseTo unknown or expired: the login request this answers is "
                       "not pending (used already, expired, or never ours).",
                       "Usually the member took longer than [idp] login_timeout at the IdP, "
                       "or pressed Back and resent the answer. Signing in again works."),
    "login_state": ("Lost RelayState: the browser that posted the answer did not start the "
                    "login (binding cookie missing).",
                    "Cookies blocked, a privacy extension, or the login finished in another "
                    "browser. Check that the IdP returns RelayState unchanged."),
    "unsolicited": ("Unsolicited Response: the IdP sent an answer without a request of ours, "
                    "and IdP-initiated sign-in is off for that IdP.",
                    "Start the login at the gateway, or enable it for the IdP with "
                    "[[idps]] allow_unsolicited = true."),
    "replay": ("Replay: this Assertion was used before.",
               "A resent or replayed answer; nothing to fix unless it repeats."),
    "attributes": ("Missing or unusable attributes.",
                   "Ask the IdP to release the attributes the gateway maps (member ID, "
                   "status…) to this SP, or map its names in [[idps]] attributes."),
    "issuer": ("Wrong issuer: the answer came from another IdP than the one asked.",
               "The login was started for one IdP and answered by another."),
    "encryption": ("Not encrypted: this IdP must encrypt its assertions "
                   "([[idps]] require_encryption).",
                   "Turn on assertion encryption at the IdP (it has our encryption "
                   "certificate in the SP metadata)."),
    "decryption": ("The encrypted assertion could not be decrypted with any SP key.",
                   "The IdP encrypted to a certificate we no longer hold (or not yet): "
                   "give it the current SP metadata from /saml/metadata."),
    "subject_confirmation": ("The assertion's subject confirmation did not match this login.",
                             "See the technical reason."),
    "malformed": ("The answer was not a well-formed SAML Response.", "See the technical reason."),
    "too_large": ("The answer was larger than the gateway accepts.", "See the technical reason."),
}

#: Failures of a kind whose reason says more: (kind, words in the reason) → what failed,
#: and what to do, instead of the kind's general advice.
SPECIFIC: list[tuple[str, tuple[str, ...], tuple[str, str]]] = [
    ("signature", ("assertion", "not signed"),
     ("Assertion not signed: the IdP signed the Response but not the Assertion in it; the "
      "gateway requires a signed Assertion (a signed Response alone is not accepted, for "
      "any IdP).",
      "The IdP must sign its assertions for this SP. Shibboleth IdP: signAssertions=\"true\" "
      "in the relying-party override for the gateway's entity ID; SimpleSAMLphp: "
      "'saml20.sign.assertion' => true in saml20-sp-remote for it; ADFS, Entra ID and "
      "others: sign the assertion (or 'response and assertion'). The certificate "
      "fingerprints below are only informative here.")),
    ("attributes", ("no member id",),
     ("No usable member ID: none of the attributes the gateway maps to the member ID "
      "arrived with a value.",
      "Compare the attribute names that arrived (released, below; names only, values are "
      "never kept) with the names the gateway expects (in the reason). Either ask the IdP "
      "to release the member ID attribute to this SP, or map the name it does send: "
      "[[idps]] attributes = { member_id = \"<released name>\" }.")),
]


def _specific(kind: str, reason: str) -> tuple[str, str] | None:
    reason = reason.lower()
    for known, words, texts in SPECIFIC:
        if known == kind and all(word in reason for word in words):
            return texts
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """One refused login as kept for the admin."""

    time: float
    reference: str
    kind: str
    reason: str
    idp: str
    request_id: str
    client_ip: str
    details: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Failure:
        data = json.loads(text)
        details = data.get("details") or {}
        return cls(float(data["time"]), str(data["reference"]), str(data["kind"]),
                   str(data["reason"]), str(data.get("idp", "")),
                   str(data.get("request_id", "")), str(data.get("client_ip", "")),
                   {str(k): str(v) for k, v in details.items()})

    @property
    def summary(self) -> str:
        specific = _specific(self.kind, self.reason)
        return specific[0] if specific else ADVICE.get(self.kind, ("Login refused.", ""))[0]

    @property
    def advice(self) -> str:
        specific = _specific(self.kind, self.reason)
        return (specific[1] if specific
                else ADVICE.get(self.kind, ("", "See the technical reason."))[1])


def failure_key(reference: str) -> str:
    """The record key of a failure, from its reference as the member or admin typed it."""
    return Namespace.FAILURE + reference.strip().upper()[:32]


async def keep_failure(records: RecordStore, failure: Failure) -> None:
    """Keep ``failure`` for ``FAILURE_TTL`` seconds, for every replica and the CLI."""
    await records.put_record(failure_key(failure.reference), failure.to_json(), FAILURE_TTL)


async def find_failure(records: RecordStore, reference: str) -> Failure | None:
    """The kept failure with this reference, or ``None`` (unknown, mistyped, too old, or
    a record that cannot be read)."""
    raw = await records.get_record(failure_key(reference))
    if raw is None:
        return None
    try:
        return Failure.from_json(raw)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def explain(failure: Failure) -> list[str]:
    """The explanation as text lines (what ``sso-gateway explain`` prints)."""
    when = dt.datetime.fromtimestamp(failure.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"Reference {failure.reference} · {when}",
             f"Check failed: {failure.kind}",
             f"  {failure.summary}"]
    if failure.idp:
        lines.append(f"IdP: {failure.idp}")
    values = {k: v for k, v in failure.details.items() if (k, v) != ("idp", failure.idp)}
    if values:
        lines.append("Values:")
        width = max(len(k) for k in values)
        lines += [f"  {k.ljust(width)}  {v}" for k, v in values.items()]
    lines += [f"Reason: {failure.reason}", f"What to do: {failure.advice}"]
    if failure.request_id or failure.client_ip:
        lines.append(f"Request ID {failure.request_id or '-'} from {failure.client_ip or '-'}")
    return lines
