"""Rate limits: one counter per action (and client) and time window, kept in the KeyStore.

Every limit the gateway enforces (sign-in starts, ACS posts, logouts, registrations,
kept forms, failure records) counts through ``over_limit``, so each counter is named
the same way (``Namespace.RATE`` + action + client key) and holds across replicas.

A client is counted by the network it can use, not by its exact address
(``client_key``): an IPv6 host or subscriber is given a whole /64 and may send from any
address in it, so its /64 is one client; an IPv4-mapped or 6to4 IPv6 address is the
IPv4 address it carries. Log lines and audit events keep the full address.
"""

from __future__ import annotations

import ipaddress

from gateway.sessions.store import KeyStore, Namespace

#: The prefix length an IPv6 client is counted by (the smallest subnet a host is given).
IPV6_CLIENT_PREFIX = 64


def client_key(client: str) -> str:
    """The name a client is counted by: an IPv6 address's /64 network, the IPv4 address
    of an IPv4-mapped or 6to4 IPv6 address, an IPv4 address as it is. Anything that is
    no IP address (``"unknown"``, an e-mail address) is returned unchanged."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    carried = address.ipv4_mapped or address.sixtofour
    if carried is not None:
        return str(carried)
    network = int(address) >> (128 - IPV6_CLIENT_PREFIX) << (128 - IPV6_CLIENT_PREFIX)
    return f"{ipaddress.IPv6Address(network)}/{IPV6_CLIENT_PREFIX}"


async def over_limit(keys: KeyStore, action: str, limit: int, window: float, *,
                     client: str = "") -> bool:
    """Count one more ``action`` (by ``client``, counted by its ``client_key``, or by
    everyone when it is "") in the current ``window`` seconds; ``True`` when that is more
    than ``limit``."""
    name = (f"{Namespace.RATE}{action}:{client_key(client)}" if client
            else f"{Namespace.RATE}{action}")
    return await keys.count(name, window) > limit
