"""The gateway's own endpoints, on Starlette. Each module is one group of routes.

Handlers get the assembled ``Gateway`` (components: sessions, policy, login flow,
tokens…) and hold no logic of their own beyond HTTP: parsing, answering, cookies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

from gateway.routes import account, admin, forward_auth, health, replay, saml, visitors

if TYPE_CHECKING:
    from gateway.app import Gateway


def routes(gateway: Gateway) -> list[BaseRoute]:
    return [*saml.routes(gateway), *forward_auth.routes(gateway), *visitors.routes(gateway),
            *admin.routes(gateway), *account.routes(gateway),
            *replay.routes(gateway), *health.routes(gateway)]
