"""SAML as one of the gateway's login protocols (``gateway.protocol.LoginProtocol``).

``SamlProtocol`` builds the SAML engine from the configuration (IdP registry, service
provider, Single Logout, metadata refresh), serves its routes under ``/saml/`` and
answers the gateway's questions about the sign-ins it made: whose they are, where the
IdP's logout lives, and the LogoutRequest that ends the IdP session after the gateway
ended its own. A LogoutRequest sent is kept as pending (``Namespace.LOGOUT``) until the
IdP's LogoutResponse answers it at ``/saml/sls``. For an IdP whose Single Logout is
HTTP-POST only, the signed form is kept for a minute under a random one-time token and
the browser is sent to ``/saml/slo/post/<token>``, the page that posts it to the IdP.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from gateway.config import Settings
from gateway.errors import StoreError
from gateway.principal import Principal
from gateway.protocol import SignInServices
from gateway.saml import routes as saml_routes
from gateway.saml.identifiers import PROTOCOL
from gateway.saml.mdq import MdqResolver
from gateway.saml.metadata_source import MetadataRefresher
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.sign_in import LOGIN_PATH
from gateway.saml.slo import PENDING_TTL, Outgoing, SingleLogout
from gateway.saml.sp import ServiceProvider
from gateway.sessions import KeyStore, Namespace

log = logging.getLogger("gateway")
#: The page that posts a kept LogoutRequest to an IdP whose Single Logout is POST-only.
POST_FORM_PATH = "/saml/slo/post/"
POST_FORM_KEY = f"{Namespace.LOGOUT}post:"  # + the one-time token
POST_FORM_TTL = 60.0


class SamlProtocol:
    """SAML 2.0 Web Browser SSO and Single Logout, with the gateway as the SP.

    Loading the IdP metadata and the SP keys happens here, so a bad configuration fails
    when the app is created (``ConfigError``), not at the first login.
    """

    name = PROTOCOL
    sign_in_path = LOGIN_PATH
    sign_out_path = "/saml/logout"

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = IdPRegistry.load_dir(settings.idp.metadata_dir)
        self.sp = ServiceProvider(settings, self.registry, clock)
        self.slo = SingleLogout(self.sp, self.registry, clock)
        self.refresher: MetadataRefresher | None = None
        # IdPs fetched on first use from [[metadata]] mdq services (empty without any).
        self.mdq = MdqResolver(settings.metadata, self.registry, self.sp, clock)
        self._keys: KeyStore | None = None

    @property
    def metadata_xml(self) -> str:
        """The SP metadata served at /saml/metadata (checked by schema when built; rebuilt
        while running when it carries a ``validUntil``)."""
        return self.sp.metadata()

    def routes(self, services: SignInServices) -> Sequence[BaseRoute]:
        """The ``/saml/*`` endpoints; binds the protocol to the gateway's key store."""
        self._keys = services.keys
        return saml_routes.routes(self, services)

    async def start(self) -> None:
        """Install cached and fresh ``[[metadata]]`` IdPs, then refresh in background."""
        urls = [m for m in self.settings.metadata if m.url]
        self.refresher = MetadataRefresher(urls, self.registry, self.sp, self.clock)
        await self.refresher.start()
        await self.mdq.start()
        self.sp.metadata()  # built and checked now: a bad document fails the start

    async def stop(self) -> None:
        if self.refresher is not None:
            await self.refresher.stop()
        await self.mdq.stop()

    def owns(self, principal: Principal) -> bool:
        # A member session upgraded from 0.1.0 names no protocol: SAML was the only one.
        legacy = not principal.protocol and "name_id" in principal.protocol_data
        return principal.protocol == PROTOCOL or (legacy and principal.is_member)

    def logout_origin(self, principal: Principal) -> str | None:
        idp = self._slo_idp(principal)
        if idp is None:
            return None
        parts = urlsplit(idp.slo_url or idp.slo_post_url)
        return f"{parts.scheme}://{parts.netloc}"

    async def start_logout(self, principal: Principal) -> str | None:
        """Where the browser goes to end ``principal``'s IdP session: the IdP's SLO URL
        with a signed LogoutRequest (HTTP-Redirect), or the page that posts it (HTTP-POST)."""
        idp = self._slo_idp(principal)
        if idp is None or self._keys is None:
            return None
        try:
            started = await run_in_threadpool(self.slo.start, idp, principal)
            await self._keys.add_once(Namespace.LOGOUT + started.request_id, idp.entity_id,
                                      PENDING_TTL)
            url = started.message.url
            if started.message.is_post:
                token = secrets.token_urlsafe(18)
                form = json.dumps({"url": url, "fields": started.message.fields})
                await self._keys.add_once(POST_FORM_KEY + token, form, POST_FORM_TTL)
                url = f"{self.settings.public_url}{POST_FORM_PATH}{token}"
        except StoreError as exc:
            log.error("could not keep a LogoutRequest for IdP %s: %s", idp.entity_id,
                      exc.reason)
            return None
        except Exception:  # the local session is gone already; the IdP leg is best effort
            log.exception("could not build a LogoutRequest for IdP %s", idp.entity_id)
            return None
        log.info("logout sent to IdP %s (%s)", idp.entity_id,
                 "HTTP-POST" if started.message.is_post else "HTTP-Redirect")
        return url

    async def take_logout_form(self, token: str) -> Outgoing | None:
        """The LogoutRequest form kept for ``token`` by ``start_logout`` (once), else None."""
        if self._keys is None:
            return None
        raw = await self._keys.take(POST_FORM_KEY + token[:32])
        if raw is None:
            return None
        kept = json.loads(raw)
        return Outgoing(kept["url"], tuple((str(k), str(v)) for k, v in kept["fields"]))

    def _slo_idp(self, principal: Principal) -> IdP | None:
        """The IdP to send a LogoutRequest to: a member's, if it has an SLO endpoint."""
        if (not principal.is_member or not self.owns(principal)
                or principal.idp not in self.registry):
            return None
        idp = self.registry.get(principal.idp)
        return idp if idp.slo_url or idp.slo_post_url else None
