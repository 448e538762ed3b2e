"""The gateway's own endpoints, on Starlette. Each module is one group of routes.

Handlers get the assembled ``Gateway`` and hold no logic beyond HTTP: they parse the
request, call one flow or component, and render the answer. Login protocols bring
their own routes (``protocol.LoginProtocol.routes``), given ``services.GatewayServices``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

from gateway.routes import (
    account,
    admin,
    forward_auth,
    health,
    language,
    replay,
    sign_out,
    visitors,
)

if TYPE_CHECKING:
    from gateway.app import Gateway


def routes(gateway: Gateway) -> list[BaseRoute]:
    """The gateway's own routes (not the protocols')."""
    return [*sign_out.routes(gateway), *forward_auth.routes(gateway),
            *visitors.routes(gateway), *admin.routes(gateway), *account.routes(gateway),
            *replay.routes(gateway), *health.routes(gateway), *language.routes(gateway)]
