"""Every cookie the gateway sets, clears and reads, built once from the config.

* the session cookie (``__Host-gw_session`` on https): the signed, opaque session ID;
  ``Path=/``, ``HttpOnly``, ``SameSite=Lax``, ``Secure`` on https;
* the login binding (``__Secure-gw-login-<state>``): ties a pending sign-in to the
  browser that started it. It must survive the IdP's cross-site POST, so on https it
  is ``SameSite=None; Secure``; it is scoped to the login protocol's path;
* the remembered IdP choice (``__Secure-gw_idp``): an entity ID, for a year;
* the kept-form cookie (``__Secure-gw-stash``): binds a form kept across a sign-in to
  the browser that posted it, scoped to the replay path;
* the passive-sign-in marker (``__Secure-gw_passive``): a passive sign-in was tried in
  this browser lately, so a public page does not try it again (``PASSIVE_RETRY_AFTER``);
* the page language (``__Secure-gw_lang``): the language chosen with the pages' language
  switch (a language code; only offered ones are believed), for a year.

Reading uses one rule everywhere (hot path and routes alike): the first cookie of a
name wins. A ``Set-Cookie`` value is a ``str``; ``header`` gives the ASGI pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

REMEMBER_IDP_FOR = 365 * 86400
STASH_PATH = "/_gateway/replay"
#: Seconds after a passive sign-in attempt before a page tries one again in that browser.
PASSIVE_RETRY_AFTER = 3600
REMEMBER_LANGUAGE_FOR = 365 * 86400


class Cookies:
    """Cookie names and attributes for one gateway, compiled at startup."""

    def __init__(self, *, secure: bool, session_name: str, session_lifetime: int,
                 stash_ttl: int) -> None:
        self.secure = secure
        self.session_name = ("__Host-" if secure else "") + session_name
        self._session_prefix = (self.session_name + "=").encode("latin-1")
        self._session_lifetime = session_lifetime
        self._stash_ttl = stash_ttl
        self._secure_prefix = "__Secure-" if secure else ""
        self.login_prefix = self._secure_prefix + "gw-login-"
        self.idp_name = self._secure_prefix + "gw_idp"
        self.stash_name = self._secure_prefix + "gw-stash"
        self.passive_name = self._secure_prefix + "gw_passive"
        self.lang_name = self._secure_prefix + "gw_lang"
        #: Every cookie name (or name prefix) that is the gateway's own: never sent upstream.
        self.own_names = (self.session_name, self.login_prefix, self.idp_name, self.stash_name,
                          self.passive_name, self.lang_name)

    # -- setting and clearing ---------------------------------------------------------

    def _build(self, name: str, value: str, *, path: str, max_age: int,
               same_site: str = "Lax") -> str:
        parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly",
                 f"SameSite={same_site}"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def session(self, value: str) -> str:
        """Set the session cookie to a signed session ID."""
        return self._build(self.session_name, value, path="/",
                           max_age=self._session_lifetime)

    def clear_session(self) -> str:
        return self._build(self.session_name, "", path="/", max_age=0)

    def login_binding(self, state: str, value: str, *, path: str, max_age: int) -> str:
        """Bind a pending sign-in (``state``) to this browser; ``max_age=0`` clears it."""
        return self._build(self.login_prefix + state, value, path=path, max_age=max_age,
                           same_site="None" if self.secure else "Lax")

    def remember_idp(self, entity_id: str, *, path: str) -> str:
        return self._build(self.idp_name, quote(entity_id, safe=""), path=path,
                           max_age=REMEMBER_IDP_FOR)

    def stash(self, value: str) -> str:
        return self._build(self.stash_name, value, path=STASH_PATH, max_age=self._stash_ttl)

    def clear_stash(self) -> str:
        return self._build(self.stash_name, "", path=STASH_PATH, max_age=0)

    def passive_tried(self) -> str:
        """Mark this browser: a passive sign-in was just tried (set before it starts, so
        even a sign-in that never comes back cannot make the page try again)."""
        return self._build(self.passive_name, "1", path="/", max_age=PASSIVE_RETRY_AFTER)

    def language(self, lang: str) -> str:
        """Remember the page language chosen with the language switch."""
        return self._build(self.lang_name, lang, path="/", max_age=REMEMBER_LANGUAGE_FOR)

    # -- reading ------------------------------------------------------------------------

    def session_value(self, header: bytes) -> str | None:
        """The session cookie from a raw ``Cookie`` header (the hot path's reader)."""
        if not header or self._session_prefix not in header:
            return None
        for part in header.split(b";"):
            part = part.strip()
            if part.startswith(self._session_prefix):
                return part[len(self._session_prefix):].decode("latin-1")
        return None

    @staticmethod
    def read(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
        """The first cookie called ``name`` in a request's ``Cookie`` headers."""
        wanted = name.encode("latin-1") + b"="
        for key, value in headers:
            if key != b"cookie":
                continue
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(wanted):
                    return part[len(wanted):].decode("latin-1")
        return None

    def remembered_idp(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The remembered entity ID (unchecked: the caller checks it is configured)."""
        return unquote(self.read(headers, self.idp_name) or "")[:1024]


def header(value: str) -> tuple[bytes, bytes]:
    """A ``Set-Cookie`` value as an ASGI header pair."""
    return (b"set-cookie", value.encode("latin-1"))


__all__ = ["PASSIVE_RETRY_AFTER", "REMEMBER_IDP_FOR", "REMEMBER_LANGUAGE_FOR", "STASH_PATH",
           "Cookies", "header"]
