"""SAML Single Logout for the gateway as an SP: LogoutRequests out and in, LogoutResponses.

python3-saml builds and signs the messages; what it leaves open is closed here:

- it accepts an *unsigned* logout message unless ``wantMessagesSigned`` (which would also
  demand signed Responses at the ACS): a signature is required here, always;
- it verifies only the HTTP-Redirect (query) signature, so a POSTed message's enveloped
  signature would go unchecked: ``gateway.saml.logout_message`` verifies it;
- it inflates without a limit and silently falls back to plain base64 when inflating
  fails: ``logout_message`` decodes (a Redirect message must inflate, within a limit);
- it accepts a missing Issuer, a missing Destination or one that merely starts with our
  URL, and a LogoutResponse without InResponseTo: each must be present and exact here;
- it checks NotOnOrAfter against the wall clock and never looks at IssueInstant: here
  both are checked against the gateway's clock.

The checks run cheapest first, so a bogus message costs little: ``examine`` decodes
(within size limits), parses, and checks Issuer, Destination, IssueInstant and
NotOnOrAfter; the caller then looks the message's ID up (a replayed LogoutRequest, a
LogoutResponse that answers nothing pending) and only then does ``accept_request`` /
``accept_response`` verify the signature and ask the library.

The Redirect signature is checked on the query string exactly as it arrived
(``validate_signature_from_qs``): re-encoding would break senders that encode
differently (ADFS's lower-case hex). Every function is synchronous: run it in a thread.

Outgoing messages use the IdP's HTTP-Redirect SingleLogoutService when it has one, else
its HTTP-POST one (``IdP.slo_post_url``): the message then carries an enveloped XML
signature (RSA-SHA256, exclusive c14n) and goes out as a form (``Outgoing.fields``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.logout_request import OneLogin_Saml2_Logout_Request
from onelogin.saml2.logout_response import OneLogin_Saml2_Logout_Response
from onelogin.saml2.utils import OneLogin_Saml2_Utils, OneLogin_Saml2_ValidationError

from gateway.errors import LogoutFailed, UnknownIdP
from gateway.principal import Principal
from gateway.saml.identifiers import PROTOCOL, logout_handle
from gateway.saml.logout_message import (
    REQUEST,
    RESPONSE,
    SIGNATURE,
    Message,
    check_enveloped_signature,
    decode,
    parse,
    read_post,
    read_redirect,
)
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.response import clean, kind_for, saml_time
from gateway.saml.sp import ServiceProvider

__all__ = ["MAX_MESSAGE_AGE", "PENDING_TTL", "REQUEST", "RESPONSE", "Examined", "IdPLogout",
           "LogoutAnswer", "LogoutStart", "Message", "Outgoing", "SingleLogout", "read_post",
           "read_redirect"]

MAX_MESSAGE_AGE = 300.0  # seconds since IssueInstant; the library's clock drift on top
PENDING_TTL = 300.0  # how long an SP-initiated logout waits for its LogoutResponse
REDIRECT_SIG_ALGS = frozenset({C.RSA_SHA256, C.RSA_SHA384, C.RSA_SHA512})
_TAGS = {REQUEST: f"{{{C.NS_SAMLP}}}LogoutRequest", RESPONSE: f"{{{C.NS_SAMLP}}}LogoutResponse"}
_ISSUER = f"{{{C.NS_SAML}}}Issuer"


@dataclass(frozen=True)
class Outgoing:
    """A signed logout message on its way to an IdP: for HTTP-Redirect the URL with the
    signed query (``fields`` empty); for HTTP-POST the form's action and its fields."""

    url: str
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def is_post(self) -> bool:
        return bool(self.fields)


@dataclass(frozen=True)
class LogoutStart:
    message: Outgoing  # a LogoutRequest, by the IdP's binding
    request_id: str  # store it: the LogoutResponse must answer exactly this


@dataclass(frozen=True)
class IdPLogout:
    """A validated LogoutRequest from an IdP: whose sessions to end."""

    idp: IdP
    request_id: str
    name_id: str
    name_id_format: str
    session_indexes: tuple[str, ...]
    relay_state: str | None

    @property
    def handle(self) -> str:
        """The logout handle of the sessions this request may name."""
        return logout_handle(self.idp.entity_id, self.name_id)

    def ends(self, principal: Principal) -> bool:
        """Whether a session of ``principal`` ends: a SAML sign-in at this IdP with this
        NameID (a compatible format) and, when the request lists SessionIndexes, one of
        them."""
        data = principal.protocol_data
        if (principal.protocol != PROTOCOL or principal.idp != self.idp.entity_id
                or data.get("name_id") != self.name_id):
            return False
        formats = {self.name_id_format, data.get("name_id_format", "")} - {
            "", C.NAMEID_UNSPECIFIED}
        if len(formats) > 1:
            return False
        return not self.session_indexes or data.get("session_index") in self.session_indexes


@dataclass(frozen=True)
class Examined:
    """A logout message that passed the cheap checks; its signature is not verified yet,
    so nothing in it is trusted. ``message_id`` is its ``ID``; ``in_response_to`` is a
    LogoutResponse's ``InResponseTo`` (never empty for one)."""

    message: Message
    idp: IdP
    xml: bytes
    root: Any
    message_id: str
    in_response_to: str
    where: str

    @property
    def kind(self) -> str:
        """``SAMLRequest`` or ``SAMLResponse``."""
        return self.message.kind


@dataclass(frozen=True)
class LogoutAnswer:
    """A validated LogoutResponse: the IdP and the request ID it answers."""

    idp: IdP
    in_response_to: str


class SingleLogout:
    """Logout for the IdPs of one SP (this gateway)."""

    def __init__(self, sp: ServiceProvider, registry: IdPRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self._sp = sp
        self._registry = registry
        self._clock = clock
        self.sls_url = sp.sls_url

    def start(self, idp: IdP, principal: Principal) -> LogoutStart:
        """A signed LogoutRequest for the login behind ``principal``: HTTP-Redirect when
        the IdP offers it, else HTTP-POST."""
        settings = self._sp.settings_for(idp)
        data = principal.protocol_data
        # The library pastes SessionIndex into its XML template unescaped.
        name_id, session_index = data.get("name_id", ""), escape(data.get("session_index", ""))
        name_id_format = data.get("name_id_format") or None
        if not idp.slo_url:
            request = OneLogin_Saml2_Logout_Request(
                settings, name_id=name_id, session_index=session_index or None,
                name_id_format=name_id_format)
            return LogoutStart(_post(settings, REQUEST, request.get_xml()), str(request.id))
        auth = OneLogin_Saml2_Auth(_request_data(self.sls_url), settings)
        url = auth.logout(return_to="/", name_id=name_id, session_index=session_index or None,
                          name_id_format=name_id_format)
        return LogoutStart(Outgoing(url), auth.get_last_request_id())

    def examine(self, message: Message) -> Examined:
        """The cheap checks, before anything costly: decode (within the size limits), parse,
        one known Issuer, Destination, IssueInstant, NotOnOrAfter and, for a
        LogoutResponse, an InResponseTo. Raises ``LogoutFailed``."""
        kind = message.kind
        what = "LogoutRequest" if kind == REQUEST else "LogoutResponse"
        xml = decode(message.value, inflate=message.binding == "redirect")
        root = parse(xml, _TAGS[kind], what)
        issuers = root.findall(_ISSUER)
        entity_id = (issuers[0].text or "").strip() if len(issuers) == 1 else ""
        if not entity_id:
            raise LogoutFailed("issuer", f"The {what} has no single Issuer.")
        try:
            idp = self._registry.get(entity_id)
        except UnknownIdP:
            raise LogoutFailed("unknown_issuer",
                               f"The {what} comes from unknown IdP {clean(entity_id)}.") from None
        where = f"The {what} from IdP {clean(entity_id)}"
        if root.get("Destination") != self.sls_url:
            raise LogoutFailed("destination", f"{where} is addressed to "
                               f"{clean(root.get('Destination'))}, not {self.sls_url}.")
        issued = saml_time(root.get("IssueInstant"))
        now = self._clock()
        if issued is None or not (now - MAX_MESSAGE_AGE - C.ALLOWED_CLOCK_DRIFT <= issued
                                  <= now + C.ALLOWED_CLOCK_DRIFT):
            raise LogoutFailed("expired", f"{where} was issued too long ago or in the future.")
        expires = saml_time(root.get("NotOnOrAfter"))
        if expires is not None and expires <= now:
            raise LogoutFailed("expired", f"{where} has expired (NotOnOrAfter).")
        in_response_to = root.get("InResponseTo") or ""
        if kind == RESPONSE and not in_response_to:
            raise LogoutFailed("in_response_to", f"{where} has no InResponseTo.")
        return Examined(message, idp, xml, root, str(root.get("ID")), in_response_to, where)

    def accept_request(self, examined: Examined) -> IdPLogout:
        """Verify an examined LogoutRequest (signature, then the library's checks); raise
        ``LogoutFailed`` if anything is off."""
        if examined.kind != REQUEST:
            raise LogoutFailed("malformed", "Expected a LogoutRequest.")
        self._verify_signature(examined)
        idp, xml, root, where = examined.idp, examined.xml, examined.root, examined.where
        message = examined.message
        settings = self._sp.settings_for(idp)
        request = OneLogin_Saml2_Logout_Request(settings, OneLogin_Saml2_Utils.b64encode(xml))
        self._library_verdict(request, xml, where, lambda: request.is_valid(
            _request_data(self.sls_url, message.params), raise_exceptions=True))
        if root.find(f"{{{C.NS_SAML}}}EncryptedID") is not None:
            raise LogoutFailed("malformed", f"{where} has an encrypted NameID.")
        try:
            name_id = OneLogin_Saml2_Logout_Request.get_nameid_data(xml)
            indexes = OneLogin_Saml2_Logout_Request.get_session_indexes(xml)
        except Exception as exc:  # no NameID, an empty one
            raise LogoutFailed("malformed", f"{where} has no usable NameID ({clean(exc)}).") \
                from exc
        if not name_id.get("Value"):
            raise LogoutFailed("malformed", f"{where} has an empty NameID.")
        return IdPLogout(idp=idp, request_id=examined.message_id, name_id=name_id["Value"],
                         name_id_format=name_id.get("Format") or "",
                         session_indexes=tuple(str(i) for i in indexes),
                         relay_state=message.relay_state)

    def accept_response(self, examined: Examined) -> LogoutAnswer:
        """Verify an examined LogoutResponse. The caller must still consume its
        InResponseTo."""
        if examined.kind != RESPONSE:
            raise LogoutFailed("malformed", "Expected a LogoutResponse.")
        self._verify_signature(examined)
        idp, xml, where = examined.idp, examined.xml, examined.where
        settings = self._sp.settings_for(idp)
        response = OneLogin_Saml2_Logout_Response(settings, OneLogin_Saml2_Utils.b64encode(xml))
        self._library_verdict(response, xml, where, lambda: response.is_valid(
            _request_data(self.sls_url, examined.message.params),
            request_id=examined.in_response_to, raise_exceptions=True))
        status = response.get_status()
        if status != C.STATUS_SUCCESS:
            raise LogoutFailed("status", f"{where} has status {clean(status, 120)}.")
        return LogoutAnswer(idp=idp, in_response_to=examined.in_response_to)

    def answer(self, logout: IdPLogout) -> Outgoing | None:
        """The signed LogoutResponse (Success) to the IdP, by its SLO binding (Redirect,
        else POST); ``None`` when it has no SingleLogoutService."""
        settings = self._sp.settings_for(logout.idp)
        target = settings.get_idp_slo_response_url()
        if not target:
            return None
        builder = OneLogin_Saml2_Logout_Response(settings)
        builder.build(logout.request_id)
        if not logout.idp.slo_url:
            return _post(settings, RESPONSE, builder.get_xml(), logout.relay_state)
        params = {RESPONSE: builder.get_response()}
        if logout.relay_state is not None:
            params["RelayState"] = logout.relay_state
        auth = OneLogin_Saml2_Auth(_request_data(self.sls_url), settings)
        auth.add_response_signature(params, C.RSA_SHA256)
        return Outgoing(str(auth.redirect_to(target, params)))

    # Internals -----------------------------------------------------------------------

    def _verify_signature(self, examined: Examined) -> None:
        """The signature of the binding the message came by: the query's (Redirect), or
        the enveloped XML signature (POST)."""
        message, root, where = examined.message, examined.root, examined.where
        signatures = list(root.iter(SIGNATURE))
        if message.binding == "redirect":
            if signatures:
                raise LogoutFailed("signature", f"{where} has an XML signature in the Redirect "
                                   "binding, which signs the query instead.")
            self._check_query_signature(message, examined.idp, where)
        else:
            check_enveloped_signature(root, signatures, examined.idp, where)

    def _check_query_signature(self, message: Message, idp: IdP, where: str) -> None:
        params = message.params
        if "Signature" not in params or "SigAlg" not in params:
            raise LogoutFailed("unsigned", f"{where} is not signed.")
        if params["SigAlg"] not in REDIRECT_SIG_ALGS:
            raise LogoutFailed("signature", f"{where} uses SigAlg {clean(params['SigAlg'])}.")
        data = _request_data(self.sls_url, params, query_string=message.raw_query,
                             validate_signature_from_qs=True)
        auth = OneLogin_Saml2_Auth(data, self._sp.settings_for(idp))
        # Without a Signature the library answers True: the check above must come first.
        check = (auth.validate_request_signature if message.kind == REQUEST
                 else auth.validate_response_signature)
        if not check(params):
            raise LogoutFailed("signature", f"{where} has a signature that does not verify "
                               f"({clean(auth.get_last_error_reason())}).")

    @staticmethod
    def _library_verdict(obj: Any, xml: bytes, where: str, check: Callable[[], Any]) -> None:
        # The library decodes the base64 again (and would inflate it if it could): make sure
        # it reads exactly the bytes whose signature was verified.
        if obj.get_xml().encode() != xml:
            raise LogoutFailed("malformed", f"{where} decodes differently for the library.")
        try:
            check()
        except OneLogin_Saml2_ValidationError as exc:
            raise LogoutFailed(kind_for(exc.code), f"{where} was refused: {clean(exc)}") from exc
        except Exception as exc:
            raise LogoutFailed("malformed", f"{where} could not be processed "
                               f"({type(exc).__name__}: {clean(exc)}).") from exc


def _post(settings: Any, kind: str, xml: str, relay_state: str | None = None) -> Outgoing:
    """A logout message for the HTTP-POST binding: the enveloped signature (SP key,
    RSA-SHA256) in the XML, base64 in the form field ``kind``."""
    signed = OneLogin_Saml2_Utils.add_sign(xml, settings.get_sp_key(), settings.get_sp_cert(),
                                           sign_algorithm=C.RSA_SHA256,
                                           digest_algorithm=C.SHA256)
    fields = [(kind, OneLogin_Saml2_Utils.b64encode(signed))]
    if relay_state is not None:
        fields.append(("RelayState", relay_state))
    return Outgoing(settings.get_idp_data()["singleLogoutService"]["url"], tuple(fields))


def _request_data(url: str, get_data: dict[str, str] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The library's view of a request to ``url`` (from our configuration, never Host)."""
    parts = urlsplit(url)
    return {"https": "on" if parts.scheme == "https" else "off",
            "http_host": parts.netloc.rpartition("@")[2], "script_name": parts.path,
            "get_data": get_data or {}, "post_data": {}, **extra}
