"""Log lines: one JSON object per line in ``serve``, readable text in ``demo``.

Every record may carry structured ``fields`` (``log.info("request", extra={"fields":
{...}})``); both formats print them, JSON as keys of the object, text as ``key=value``.
The request being served is a ``RequestContext`` in a context variable, so every line
written while serving it — by any module, in any thread the request runs code in —
carries its request ID without passing it around.

A request ID comes from ``X-Request-Id`` only when the request arrived from a trusted
proxy; otherwise it is created here. Either way it is a short token of safe characters,
so it can go into logs, headers and pages as it is.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

MAX_REQUEST_ID = 64
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")


class RequestContext:
    """What the log lines and telemetry of one request share; filled as the request goes."""

    __slots__ = ("client", "idp", "member_id", "owner", "path", "request_id", "session",
                 "started", "status", "upstream", "upstream_started")

    def __init__(self, request_id: str, started: float, client: str = "",
                 owner: object = None) -> None:
        self.request_id = request_id
        self.started = started
        self.client = client
        self.owner = owner  # the Telemetry of the gateway serving this request
        self.status = 0
        self.path = ""
        self.upstream = ""
        self.upstream_started = 0.0
        self.session = ""  # session_hash of the session key, never the key or cookie
        self.member_id = ""
        self.idp = ""


CURRENT: ContextVar[RequestContext | None] = ContextVar("gateway_request", default=None)


def current() -> RequestContext | None:
    return CURRENT.get()


def current_request_id() -> str:
    ctx = CURRENT.get()
    return ctx.request_id if ctx is not None else ""


class _RandomIds:
    """Request IDs: 8 random bytes as hex, taken from ``os.urandom`` 4 KiB at a time (one
    system call for 512 IDs, not one each); a forked child starts its own supply."""

    SUPPLY = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0
        self._lock = threading.Lock()  # servers in threads (tests) share the supply

    def reset(self) -> None:
        self._bytes, self._at = b"", 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            at = self._at
            if at + 8 > len(self._bytes):
                self._bytes, at = os.urandom(self.SUPPLY), 0
            self._at = at + 8
            return self._bytes[at:at + 8].hex()


_ids = _RandomIds()
os.register_at_fork(after_in_child=_ids.reset)


def new_request_id() -> str:
    """A new request ID: 16 hex digits."""
    return _ids.next()


def clean_request_id(value: bytes) -> str | None:
    """A client-supplied ID if it is short and made of safe characters, else ``None``."""
    if not value or len(value) > MAX_REQUEST_ID:
        return None
    text = value.decode("latin-1")
    return text if _ID_CHARS.issuperset(text) else None


@functools.lru_cache(maxsize=4096)
def session_hash(key: str) -> str:
    """A short, stable tag for a session in logs: it neither is nor reveals the cookie,
    the store key, or the handle the sessions pages use to end a session."""
    return hashlib.sha256(b"log:" + key.encode()).hexdigest()[:12]


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_BASE_KEYS = frozenset({"time", "level", "logger", "message", "request_id", "exception"})


def _json_value(value: object) -> str:
    """``value`` as ``json.dumps`` writes it (``ensure_ascii``, ``default=str``)."""
    if type(value) is str:
        return _json_str(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, default=str)


class _Clock:
    """The ``time`` of a JSON line (UTC, milliseconds), its seconds formatted once a
    second; the cache is one tuple, so threads sharing it never mix two seconds."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached = (-1, "")

    def stamp(self, now: float) -> str:
        second = int(now)
        micro = round((now - second) * 1_000_000)  # as datetime rounds it
        if micro == 1_000_000:
            second, micro = second + 1, 0
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, dt.datetime.fromtimestamp(second, dt.UTC)
                                     .strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{cached[1]}.{micro // 1000:03d}Z"


class AccessLog:
    """The per-request ``gateway.access`` line, written without ``logging`` where it can be.

    ``logging`` costs ≈ 18 µs a line (a ``LogRecord``, the handler chain, ``json.dumps``):
    a tenth of a proxied request. When the only way out for ``gateway.access`` is the JSON
    handler ``configure_logging`` installed (as ``sso-gateway serve`` runs), the line is
    written to that handler's stream directly, the same line ``JsonFormatter`` makes.
    Anything else (the text format, a handler or filter someone added, tests capturing
    records) gets the record through ``logging`` as before."""

    def __init__(self, name: str = "gateway.access") -> None:
        self.logger = logging.getLogger(name)
        self._clock = _Clock()

    def write(self, message: str, fields: dict[str, object], request_id: str) -> None:
        """One line: ``message`` with ``fields``, tagged with ``request_id``."""
        handler = _json_handler
        if handler is None or not self._direct(handler) or not _BASE_KEYS.isdisjoint(fields):
            self.logger.info(message, extra={"fields": fields, "request_id": request_id})
            return
        parts = [f'{{"time":"{self._clock.stamp(time.time())}","level":"info",'
                 f'"logger":{_json_str(self.logger.name)},"message":{_json_str(message)}']
        if request_id:
            parts.append(f',"request_id":{_json_str(request_id)}')
        for key, value in fields.items():
            parts.append(f",{_json_str(key)}:{_json_value(value)}")
        parts.append("}\n")
        line = "".join(parts)
        with handler.lock:  # type: ignore[union-attr]
            try:
                handler.stream.write(line)
                handler.stream.flush()
            except Exception:
                handler.handleError(logging.makeLogRecord({"msg": line}))

    def _direct(self, handler: logging.Handler) -> bool:
        """Would ``logging`` hand this logger's INFO records to ``handler`` alone, as is?"""
        logger: logging.Logger | None = self.logger
        if self.logger.filters or not self.logger.isEnabledFor(logging.INFO):
            return False
        if handler.filters or handler.level > logging.INFO:
            return False
        while logger is not None:
            if logger is logging.root:
                return len(logger.handlers) == 1 and logger.handlers[0] is handler
            if logger.handlers or not logger.propagate:
                return False
            logger = logger.parent
        return False


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, **fields}`` on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._clock.stamp(record.created),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``LEVEL logger message key=value … [request_id]`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", None))
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            text += f" [{request_id}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StdStream(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stdout``/``sys.stderr`` is at the time."""

    def __init__(self, name: str = "stderr") -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self) -> Any:
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


# The root handler ``configure_logging`` installed for JSON lines (``AccessLog`` writes to
# its stream directly while it is the only one), or None.
_json_handler: StdStream | None = None


def configure_logging(fmt: str, level: int = logging.INFO) -> None:
    """The process's log output: one handler on the root logger, in ``fmt`` (json|text)."""
    global _json_handler
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = StdStream("stderr")
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    _json_handler = handler if fmt == "json" else None
