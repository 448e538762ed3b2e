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
                   "status…) to this SP, or map its names in [[idps]] attributes. A "
                   "subject-id or pairwise-id 'out of its scope' ends in a scope the IdP's "
                   "metadata does not list (shibmd:Scope): fix the IdP's metadata, or vouch "
                   "for the scope with [[idps]] scopes."),
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
    "step_up_refused": ("Step-up refused: the IdP could not sign the member in with the "
                        "authentication context (or fresh sign-in) the page's rule needs.",
                        "The member has no such factor at the IdP (e.g. no MFA enrolled), or "
                        "the IdP does not offer that context class: ask the IdP's admins, "
                        "or change the rule's require.authn_context."),
    "step_up_context": ("Step-up without the context: the IdP answered a request for an "
                        "authentication context class with another one.",
                        "The IdP ignores RequestedAuthnContext or names its MFA differently: "
                        "list its class in the rule's require.authn_context (any one is "
                        "enough), or have the IdP send https://refeds.org/profile/mfa."),
    "step_up_stale": ("Step-up not fresh: the gateway asked for a new authentication "
                      "(ForceAuthn) and the IdP reported an old one.",
                      "The IdP ignores ForceAuthn: configure it to honour it, or drop the "
                      "rule's max_auth_age."),
    "step_up_subject": ("Step-up as someone else: a member's step-up sign-in came back with "
                        "another person's identity; it was refused and the member's session "
                        "kept.",
                        "Someone else signed in at the IdP in the member's browser. Nothing "
                        "to fix unless it repeats; to switch person, sign out first."),
}

#: Failures of a kind whose reason says more: (kind, words in the reason) → what failed,
#: and what to do, instead of the kind's general advice.
SPECIFIC: list[tuple[str, tuple[str, ...], tuple[str, str]]] = [
    ("signature", ("assertion", "not signed"),  # kept before the shape was recorded
     ("Assertion not signed: the IdP did not sign the Assertion, and the gateway was not "
      "told to accept a signed Response instead.",
      "Have the IdP sign its assertions for this SP, or, if it signs the whole Response, "
      "set signed_response = \"accept\" for it ([[idps]] or [idp]).")),
    ("attributes", ("no member id",),
     ("No usable member ID: none of the attributes the gateway maps to the member ID "
      "arrived with a value.",
      "Compare the attribute names that arrived (released, below; names only, values are "
      "never kept) with the names the gateway expects (in the reason). Either ask the IdP "
      "to release the member ID attribute to this SP, or map the name it does send: "
      "[[idps]] attributes = { member_id = \"<released name>\" }.")),
]


SIGN_ASSERTIONS = ("Keycloak: client > Signature and Encryption > \"Sign assertions\" "
                   "on; Shibboleth IdP: signAssertions=\"true\" in the relying-party "
                   "override for the gateway's entity ID; SimpleSAMLphp: "
                   "'saml20.sign.assertion' => true; ADFS, Entra ID, Okta: sign the "
                   "assertion (or response and assertion).")


def _signature(details: dict[str, str]) -> tuple[str, str] | None:
    """What failed and what to do, from the signing shape that arrived and the
    ``signed_response`` setting that applied (failures kept since they are recorded)."""
    shape = details.get("signed", "")
    setting = details.get("signed_response", "")
    known = details.get("certificate_known") == "yes"
    if shape == "response signed, assertion not signed" and setting == "refuse":
        return (
            "Signing shape refused: the IdP signed the Response but not the Assertion in it "
            "(Keycloak's default), and signed_response = \"refuse\" applies to this IdP.",
            "The shape was refused, not the key" + (" (the certificate in the message is "
                                                    "the IdP's)" if known else "") +
            ". To accept this shape, set signed_response = \"accept\" in this IdP's "
            "[[idps]] entry (or in [idp] for every IdP): the Response signature must then "
            "verify and cover the one Assertion used, and every wrapping check still "
            "applies. Or have the IdP sign the assertion as well. " + SIGN_ASSERTIONS)
    if shape.startswith("neither"):
        return (
            "Nothing signed: neither the Response nor its Assertion carries a signature.",
            "The gateway accepts a signed Assertion, or a signed Response when "
            "signed_response = \"accept\" applies to the IdP (here: " + (setting or "?") +
            "). Turn signing on at the IdP. If it signs, this answer was forged or its "
            "signatures were stripped on the way.")
    if known:
        return (
            f"Bad signature: signed with the IdP's certificate ({shape}), but the signature "
            "does not verify or is of a form the gateway refuses.",
            "The certificate fingerprints match, so the IdP's key is not the problem: the "
            "signed content was changed after signing (tampered with, or rewritten by "
            "something between the IdP and the gateway), or the signature uses an algorithm "
            "or transform the gateway refuses (see the reason).")
    return None


def _specific(kind: str, reason: str,
              details: dict[str, str] | None = None) -> tuple[str, str] | None:
    if kind == "signature" and details and "signed" in details:
        return _signature(details)
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
        specific = _specific(self.kind, self.reason, self.details)
        return specific[0] if specific else ADVICE.get(self.kind, ("Login refused.", ""))[0]

    @property
    def advice(self) -> str:
        specific = _specific(self.kind, self.reason, self.details)
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
