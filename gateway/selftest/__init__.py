"""``sso-gateway selftest URL``: attack a live gateway the way an attacker would.

An admin runs it against a running gateway. With a throwaway key made at run time it
sends forged SAML responses to real pending logins (unsigned; self-signed with the
certificate in KeyInfo; with ``--idp-key``/``--idp-cert`` also a positive control,
signature wrapping, a replayed Assertion and a wrong Audience), spoofed identity
headers, path-encoding bypasses, open-redirect attempts and the hostile-input probes
that run from outside (forward-auth, the kept form, headers the upstream may trust,
oversized and ambiguous requests, the sign-in rate limit), and prints a table. With
``--config`` it uses the deployment's own attribute, header and cookie names.

Layout: ``forge``/``wrapping``/``attacks`` (the forging toolkit, shared with the attack
suite in ``tests/``), ``client`` (raw-path HTTP with a cookie jar, on ``http.client``,
and raw request heads), ``deployment`` (the names from the config file, read as data),
``flow`` (the login steps), ``cases``/``probes``/``forward_auth``/``hostile`` (the
checks), ``run`` (discovery, the run, the table). It is a client of the gateway and
imports nothing of its server side.
"""

from __future__ import annotations

from gateway.selftest.run import Options, Result, SelftestError, failed, render, run

__all__ = ["Options", "Result", "SelftestError", "failed", "render", "run"]
