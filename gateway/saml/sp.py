"""The gateway as a SAML service provider: AuthnRequests, Response validation, SP metadata.

URLs come only from ``settings.public_url`` (never from the request's Host), and so does
the request data handed to python3-saml: it sees the ACS URL we advertise, whatever
the browser sent.

All methods are synchronous and thread-safe: every call builds its own ``Auth`` object;
only the per-IdP ``OneLogin_Saml2_Settings`` (read-only once built) are shared.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Error, OneLogin_Saml2_ValidationError

from gateway.config import Settings
from gateway.errors import ConfigError, LoginFailed
from gateway.protocol import SignedIn
from gateway.saml.clock import saml_time
from gateway.saml.failure_details import add_details
from gateway.saml.identifiers import PROTOCOL, checked, logout_handle
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.response import Auth, check_response, clean, kind_for
from gateway.saml.sp_keys import metadata_warnings, read_keypairs, sp_metadata
from gateway.saml.structure import Signed, check_envelope, check_structure, parser

log = logging.getLogger("gateway")
ACS_PATH = "/saml/acs"
SLS_PATH = "/saml/sls"
METADATA_PATH = "/saml/metadata"
#: Seconds a built SP metadata document with a ``validUntil`` is served before a rebuild.
METADATA_REBUILD = 3600.0
# By default we identify members by an attribute, not by NameID, so we let the IdP pick
# the format: asking for ``persistent`` makes IdPs that cannot issue one fail with
# InvalidNameIDPolicy. ``[[idps]] name_id_format`` asks one IdP for another format.
NAMEID_FORMAT = C.NAMEID_UNSPECIFIED


@dataclass(frozen=True)
class LoginRequest:
    url: str  # the IdP's SSO URL with the (signed) HTTP-Redirect query
    request_id: str  # keep it: finish_login needs it


@dataclass(frozen=True)
class LoginResult:
    """A validated Response: what it says about the user (``signed_in``: the released
    attributes as strings, the NameID and SessionIndex in its ``protocol_data``) and
    what the replay cache needs."""

    signed_in: SignedIn
    assertion_id: str
    not_on_or_after: float  # after this the assertion is refused anyway: replay-cache expiry
    response_id: str
    encrypted: bool = False  # the assertion arrived as an EncryptedAssertion


@dataclass(frozen=True)
class Peek:
    issuer: str  # unvalidated: chooses the IdP whose certificates must verify the Response
    in_response_to: str | None


@dataclass(frozen=True)
class Refusal:
    """An IdP's answer that is not a success: its StatusCode and second-level StatusCode
    (e.g. ``…:status:Responder`` / ``…:status:NoPassive``), read unvalidated (IdPs rarely
    sign a refusal), so only ever used to tell a refusal from a broken message."""

    issuer: str
    in_response_to: str | None
    code: str
    sub_code: str


class ServiceProvider:
    """One SP (this gateway) in front of the IdPs of a registry."""

    def __init__(
        self, settings: Settings, registry: IdPRegistry, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = settings
        self._registry = registry
        self._clock = clock
        self._max_issue_age = float(settings.idp.max_issue_age)
        self.entity_id = settings.sp_entity_id
        self.acs_url = settings.public_url + ACS_PATH
        self.sls_url = settings.public_url + SLS_PATH
        self.metadata_url = settings.public_url + METADATA_PATH
        parts = urlsplit(settings.public_url)
        self._https = "on" if parts.scheme == "https" else "off"
        # The port goes into http_host: python3-saml deprecates ``server_port``.
        self._host = parts.netloc.rpartition("@")[2]
        self._skew = float(settings.idp.clock_skew)
        self._keys = read_keypairs(settings)  # current first; the next one during a rollover
        self._lock = threading.Lock()
        self._cache: dict[tuple[IdP, int, bool], OneLogin_Saml2_Settings] = {}
        self._metadata: tuple[float, str] | None = None  # (built at, XML)
        self._sp_only = self._build(None)
        for idp in registry.all():  # a bad IdP block fails at startup, not at first login
            self.settings_for(idp)
        for options in settings.idps:  # a typo would silently drop require_encryption & co
            if options.entity_id not in registry:
                log.warning("[[idps]] entity_id %r matches no loaded IdP", options.entity_id)

    # Public API ----------------------------------------------------------------------

    def start_login(self, idp: IdP, relay_state: str, *, authn_context: Sequence[str] = (),
                    force_authn: bool = False, is_passive: bool = False) -> LoginRequest:
        """An AuthnRequest for ``idp`` as an HTTP-Redirect URL, and its ID.

        ``authn_context``: a RequestedAuthnContext with these classes and Comparison
        ``exact`` (the IdP uses one of them; settings are built for this request only);
        ``force_authn``: ForceAuthn (authenticate again even with an IdP session);
        ``is_passive``: IsPassive (no interaction: NoPassive if the IdP must ask)."""
        settings = (self._build(idp, authn_context=tuple(authn_context)) if authn_context
                    else self.settings_for(idp))
        auth = Auth(self._request_data("/saml/login"), settings)
        url = auth.login(return_to=relay_state, force_authn=force_authn, is_passive=is_passive)
        return LoginRequest(url=url, request_id=auth.get_last_request_id())

    def finish_login(self, saml_response: str, *, request_id: str, idp: IdP) -> LoginResult:
        """Validate a POSTed ``SAMLResponse`` answering ``request_id``; raise ``LoginFailed``."""
        if not request_id:
            raise ValueError("request_id is required: without it the library skips InResponseTo")
        return self._finish(saml_response, request_id, idp)

    def finish_unsolicited(self, saml_response: str, *, idp: IdP) -> LoginResult:
        """Validate an IdP-initiated ``SAMLResponse`` (no request of ours): only for an IdP
        that opted in, and then InResponseTo must be absent everywhere."""
        if not self.allows_unsolicited(idp):
            raise LoginFailed(
                "unsolicited", f"IdP {clean(idp.entity_id)} sent a Response without a login "
                "request from us, and IdP-initiated sign-in is not enabled for it.",
                {"idp": idp.entity_id, "allow_unsolicited": "false"})
        return self._finish(saml_response, None, idp)

    def allows_unsolicited(self, idp: IdP) -> bool:
        return bool(self._config.idp_options(idp.entity_id).allow_unsolicited)

    def peek(self, saml_response: str) -> Peek:
        """The Response's Issuer and InResponseTo, read *before* validation: only to pick
        the path (solicited or IdP-initiated) and the IdP whose certificates must then
        verify it; every value is checked again on the validated document."""
        _, xml = check_envelope(saml_response)
        check_structure(xml)
        root = etree.fromstring(xml, parser())
        issuer = root.find("saml:Issuer", C.NSMAP)
        text = "".join(issuer.itertext()).strip() if issuer is not None else ""
        return Peek(issuer=text, in_response_to=root.get("InResponseTo"))

    def refusal(self, saml_response: str) -> Refusal | None:
        """The IdP's refusal in a Response whose status is not Success, else ``None``
        (a success, or not a readable Response). Raises ``LoginFailed`` for an envelope
        that is refused unread (size, encoding, DOCTYPE)."""
        _, xml = check_envelope(saml_response)
        try:
            root = etree.fromstring(xml, parser())
        except etree.XMLSyntaxError:
            return None
        code = root.find("samlp:Status/samlp:StatusCode", C.NSMAP)
        if root.tag != f"{{{C.NS_SAMLP}}}Response" or code is None:
            return None
        if code.get("Value") == C.STATUS_SUCCESS:
            return None
        sub = code.find("samlp:StatusCode", C.NSMAP)
        issuer = root.find("saml:Issuer", C.NSMAP)
        return Refusal(issuer="".join(issuer.itertext()).strip() if issuer is not None else "",
                       in_response_to=root.get("InResponseTo"), code=code.get("Value") or "",
                       sub_code=sub.get("Value") or "" if sub is not None else "")

    def _finish(self, saml_response: str, request_id: str | None, idp: IdP) -> LoginResult:
        encoded, xml = check_envelope(saml_response)
        auth: Auth | None = None
        signed: Signed | None = None
        try:
            signed = check_structure(xml)
            by_response = self.signed_by_response(idp, signed)
            auth = Auth(self._request_data(ACS_PATH, {"SAMLResponse": encoded}),
                        self.settings_for(idp, by_response=by_response))
            auth.decryption_alternatives = [
                self.settings_for(idp, index, by_response=by_response)
                for index in range(1, len(self._keys))]
            return self._validate(auth, request_id, idp, by_response)
        except LoginFailed as exc:
            add_details(exc, xml=xml, response=auth.response if auth else None, idp=idp,
                        sp_entity_id=self.entity_id, acs_url=self.acs_url,
                        request_id=request_id, now=self._clock(), signed=signed,
                        signed_response=self._config.idp_options(idp.entity_id).signed_response)
            raise

    def signed_by_response(self, idp: IdP, signed: Signed) -> bool:
        """Whether the Response signature is what must cover this message's Assertion:
        the Response is signed, the Assertion is not (or is encrypted, its own signature
        unseen), and ``signed_response = "accept"`` for the IdP. Otherwise the Assertion
        itself must carry a valid signature, as ever."""
        return (signed.response and not signed.assertion
                and self._config.idp_options(idp.entity_id).signed_response == "accept")

    def _validate(self, auth: Auth, request_id: str | None, idp: IdP,
                  by_response: bool) -> LoginResult:
        where = f"The SAML response from IdP {clean(idp.entity_id)}"
        attributes: dict[str, list[str]] = {}
        try:
            auth.process_response(request_id=request_id)
            failed = bool(auth.get_errors())
            if not failed:
                # Reading the values can raise too (NameID, duplicate attribute names).
                attributes = _string_values(auth.get_attributes())
        except LoginFailed:
            raise  # from the decryption step (shape of the decrypted assertion, no key)
        except OneLogin_Saml2_ValidationError as exc:
            raise LoginFailed(kind_for(exc.code), f"{where} was refused: {clean(exc)}") from exc
        except Exception as exc:  # unparseable XML, undecryptable assertion, …
            raise LoginFailed(
                "malformed", f"{where} could not be processed ({type(exc).__name__}: {clean(exc)})."
            ) from exc
        if failed:
            code = auth.response.error_code if auth.response is not None else None
            reason = clean(auth.get_last_error_reason() or ", ".join(auth.get_errors()))
            raise LoginFailed(kind_for(code), f"{where} was refused by python3-saml: {reason}")

        assertion = check_response(
            auth,
            request_id=request_id,
            idp_entity_id=idp.entity_id,
            sp_entity_id=self.entity_id,
            acs_url=self.acs_url,
            now=self._clock(),
            max_issue_age=self._max_issue_age,
            skew=self._skew,
            by_response=by_response,
        )
        try:
            not_on_or_after = self._not_on_or_after(auth, assertion, where)
            statement = assertion.find("saml:AuthnStatement", C.NSMAP)
            instant = statement.get("AuthnInstant") if statement is not None else None
            authn_instant = saml_time(instant)
        except LoginFailed:
            raise
        except Exception as exc:
            reason = f"{where} has an unreadable time ({clean(exc)})."
            raise LoginFailed("malformed", reason) from exc
        context = (statement.find("saml:AuthnContext/saml:AuthnContextClassRef", C.NSMAP)
                   if statement is not None else None)
        session_end = auth.get_session_expiration()
        name_id = auth.get_nameid() or ""
        try:
            data = {"name_id": checked("NameID", name_id),
                    "name_id_format": checked("NameID Format", auth.get_nameid_format() or ""),
                    "session_index": checked("SessionIndex", auth.get_session_index() or "")}
            authn_context = checked("AuthnContextClassRef",
                                    "".join(context.itertext()).strip()
                                    if context is not None else "")
        except LoginFailed as exc:
            raise LoginFailed(exc.kind, f"The assertion from IdP {idp.entity_id!r}: "
                                        f"{exc.reason}") from None
        signed_in = SignedIn(
            idp=idp.entity_id,
            protocol=PROTOCOL,
            released=attributes,
            authn_context=authn_context,
            authn_instant=authn_instant if authn_instant is not None else self._clock(),
            session_not_on_or_after=float(session_end) if session_end else None,
            logout_handle=logout_handle(idp.entity_id, name_id),
            protocol_data=data,
            scopes=idp.scopes,
            persistent_id=name_id if data["name_id_format"] == C.NAMEID_PERSISTENT else "",
        )
        return LoginResult(
            signed_in=signed_in,
            assertion_id=auth.get_last_assertion_id(),
            not_on_or_after=not_on_or_after,
            response_id=auth.get_last_message_id() or "",
            encrypted=bool(auth.response is not None and auth.response.encrypted),
        )

    def metadata(self) -> str:
        """SP metadata XML (every SP certificate, for signing and encryption), checked
        against the metadata schema when it is built.

        Without ``[sp] metadata_valid_for`` it has no ``validUntil`` and is built once.
        With it, ``validUntil`` is counted from when the document was built, and the
        document is rebuilt every ``METADATA_REBUILD`` seconds, so a gateway that runs
        for months never serves metadata that has expired or is about to."""
        sp = self._config.sp
        now = self._clock()
        with self._lock:
            if self._metadata is not None and (
                    sp.metadata_valid_for is None or now - self._metadata[0] < METADATA_REBUILD):
                return self._metadata[1]
        valid_until = None if sp.metadata_valid_for is None else now + sp.metadata_valid_for
        xml = sp_metadata(self._sp_only, [pair.cert_pem for pair in self._keys],
                          valid_until=valid_until, cache_duration=sp.metadata_cache_duration,
                          config=self._config, key_pem=self._keys[0].key_pem)
        with self._lock:
            self._metadata = (now, xml)
        return xml

    def metadata_warnings(self) -> list[str]:
        """Warnings about the SP metadata lifetime settings, for ``sso-gateway check``."""
        return metadata_warnings(self._config.sp)

    def settings_for(self, idp: IdP, key: int = 0, *,
                     by_response: bool = False) -> OneLogin_Saml2_Settings:
        """The python3-saml settings for one IdP, built once and cached. ``key`` picks the
        SP key pair (0 = current, which signs; 1 = next, during a rollover).
        ``by_response``: for a message whose Response signature must cover its Assertion
        (``signed_by_response``): the library then requires that signature instead of the
        Assertion's (and still verifies an Assertion signature that is there)."""
        with self._lock:
            cached = self._cache.get((idp, key, by_response))
            if cached is None:
                cached = self._build(idp, key, by_response=by_response)
                self._cache[(idp, key, by_response)] = cached
            return cached

    def forget(self, idp: IdP) -> None:
        """Drop the cached settings of one IdP version (its metadata was replaced)."""
        with self._lock:
            for key in range(len(self._keys)):
                for by_response in (False, True):
                    self._cache.pop((idp, key, by_response), None)

    # Internals -----------------------------------------------------------------------

    def _build(self, idp: IdP | None, key: int = 0, *, by_response: bool = False,
               authn_context: tuple[str, ...] = ()) -> OneLogin_Saml2_Settings:
        pair = self._keys[key]
        encrypted = idp is not None and self._config.idp_options(idp.entity_id).require_encryption
        data: dict[str, Any] = {
            "strict": True,
            "debug": False,
            "sp": {
                "entityId": self.entity_id,
                "assertionConsumerService": {"url": self.acs_url, "binding": C.BINDING_HTTP_POST},
                "singleLogoutService": {"url": self.sls_url, "binding": C.BINDING_HTTP_REDIRECT},
                "NameIDFormat": (NAMEID_FORMAT if idp is None else
                                 self._config.idp_options(idp.entity_id).name_id_format),
                "x509cert": pair.cert_pem,
                "privateKey": pair.key_pem,
            },
            "security": {
                "authnRequestsSigned": self._config.sp.sign_authn_requests,
                # The SP metadata (built without an IdP) asks IdPs to sign assertions.
                "wantAssertionsSigned": not by_response,
                "wantMessagesSigned": by_response,
                "rejectDeprecatedAlgorithm": True,
                "signatureAlgorithm": C.RSA_SHA256,
                "digestAlgorithm": C.SHA256,
                "wantNameId": True,
                "allowRepeatAttributeName": False,
                "wantAttributeStatement": False,
                "requestedAuthnContext": list(authn_context) or False,
                "requestedAuthnContextComparison": "exact",
                "logoutRequestSigned": True,
                "logoutResponseSigned": True,
                "wantAssertionsEncrypted": encrypted,
                "wantNameIdEncrypted": False,
            },
        }
        if idp is not None:
            _check_trust(idp)
            # The library formats certificates in place: give it a copy.
            data["idp"] = copy.deepcopy(dict(idp.settings))
        try:
            return OneLogin_Saml2_Settings(data, sp_validation_only=idp is None)
        except OneLogin_Saml2_Error as exc:
            who = "the SP" if idp is None else f"IdP {idp.entity_id!r} ({idp.source})"
            raise ConfigError([f"python3-saml rejects the settings for {who}: {exc}"]) from exc

    def _request_data(self, path: str, post: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "https": self._https,
            "http_host": self._host,
            "script_name": path,
            "get_data": {},
            "post_data": post or {},
        }

    def _not_on_or_after(self, auth: Auth, assertion: Any, where: str) -> float:
        """When the library would refuse this assertion anyway: the earlier of the
        SubjectConfirmationData NotOnOrAfter and the Conditions NotOnOrAfter (plus the
        library's clock-drift allowance)."""
        limits: list[float] = []
        scd = auth.get_last_assertion_not_on_or_after()
        if scd:
            limits.append(float(scd))
        conditions = assertion.find("saml:Conditions", C.NSMAP)
        cond = saml_time(conditions.get("NotOnOrAfter") if conditions is not None else None)
        if cond is not None:
            limits.append(cond + C.ALLOWED_CLOCK_DRIFT)
        if not limits:
            raise LoginFailed("malformed", f"{where} has an Assertion without NotOnOrAfter.")
        limit = min(limits)
        if limit <= self._clock():
            raise LoginFailed("expired", f"{where} carries an assertion that has expired.")
        return limit


def _check_trust(idp: IdP) -> None:
    """Signatures verify against the IdP's configured certificates and nothing else.

    python3-saml verifies with ``x509certMulti['signing']`` when it is set (ignoring
    ``x509cert`` and any fingerprint). Fingerprint mode (``certFingerprint`` without a
    certificate) makes it take the certificate from the message's own ``KeyInfo`` and
    trust it if the fingerprint matches: refused, like settings without signing certs.
    """
    settings = idp.settings
    signing = (settings.get("x509certMulti") or {}).get("signing") or []
    problems = []
    if settings.get("certFingerprint") or settings.get("certFingerprintAlgorithm"):
        problems.append("fingerprint mode is not allowed (signatures must verify against "
                        "configured certificates)")
    if not signing or not all(isinstance(c, str) and c.strip() for c in signing):
        problems.append("no signing certificates (x509certMulti.signing)")
    if problems:
        raise ConfigError([f"IdP {idp.entity_id!r} ({idp.source}): {p}" for p in problems])


def _string_values(attributes: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Attribute values as strings (a nested NameID value counts as its text)."""
    result: dict[str, list[str]] = {}
    for name, values in attributes.items():
        texts = []
        for value in values:
            if isinstance(value, dict):
                value = (value.get("NameID") or {}).get("value") or ""
            texts.append(str(value))
        result[name] = texts
    return result
