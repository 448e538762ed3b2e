"""Rate limits: one counter per action (and client) and time window, kept in the KeyStore.

Every limit the gateway enforces (sign-in starts, ACS posts, logouts, registrations,
kept forms, failure records) counts through ``over_limit``, so each counter is named
the same way (``Namespace.RATE`` + action + client) and holds across replicas.
"""

from __future__ import annotations

from gateway.sessions.store import KeyStore, Namespace


async def over_limit(keys: KeyStore, action: str, limit: int, window: float, *,
                     client: str = "") -> bool:
    """Count one more ``action`` (by ``client``, or by everyone when it is "") in the
    current ``window`` seconds; ``True`` when that is more than ``limit``."""
    name = f"{Namespace.RATE}{action}:{client}" if client else f"{Namespace.RATE}{action}"
    return await keys.count(name, window) > limit
