"""The gateway's flows, framework-free: sign-in, sign-out and registration.

Each takes values (a ``SignedIn``, a session, a typed address) and returns values; the
routes around them parse requests and render answers. ``Flows`` is the set one gateway
uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.flows.registration import RegistrationFlow
from gateway.flows.sign_in import SignInFlow
from gateway.flows.sign_out import SignOutFlow

__all__ = ["Flows", "RegistrationFlow", "SignInFlow", "SignOutFlow"]


@dataclass(frozen=True, slots=True)
class Flows:
    """The flows of one gateway."""

    sign_in: SignInFlow
    sign_out: SignOutFlow
    registration: RegistrationFlow
