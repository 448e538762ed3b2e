"""Sessions: signed cookies, the store seams and their backends, and the session manager."""

from gateway.sessions.cookies import CookieSigner
from gateway.sessions.manager import (
    SessionManager,
    SessionRecord,
    best_effort_failed,
    on_best_effort_failure,
)
from gateway.sessions.store import (
    Backend,
    KeyStore,
    Namespace,
    RecordStore,
    Registration,
    SessionStore,
    StoredSession,
    Stores,
    open_store,
)

__all__ = ["Backend", "CookieSigner", "KeyStore", "Namespace", "RecordStore", "Registration",
           "SessionManager", "SessionRecord", "SessionStore", "StoredSession", "Stores",
           "best_effort_failed", "on_best_effort_failure", "open_store"]
