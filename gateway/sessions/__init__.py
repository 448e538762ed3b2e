"""Sessions: signed cookies, the ``Store`` protocol and its backends, and the session manager."""

from gateway.sessions.cookies import CookieSigner
from gateway.sessions.manager import SessionManager
from gateway.sessions.store import SessionRecord, Store, open_store

__all__ = ["CookieSigner", "SessionManager", "SessionRecord", "Store", "open_store"]
