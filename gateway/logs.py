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
import hashlib
import json
import logging
import secrets
import sys
from contextvars import ContextVar
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


def new_request_id() -> str:
    return secrets.token_hex(8)


def clean_request_id(value: bytes) -> str | None:
    """A client-supplied ID if it is short and made of safe characters, else ``None``."""
    if not value or len(value) > MAX_REQUEST_ID:
        return None
    text = value.decode("latin-1")
    return text if _ID_CHARS.issuperset(text) else None


def session_hash(key: str) -> str:
    """A short, stable tag for a session in logs: it neither is nor reveals the cookie,
    the store key, or the handle the sessions pages use to end a session."""
    return hashlib.sha256(b"log:" + key.encode()).hexdigest()[:12]


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, **fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
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


def configure_logging(fmt: str, level: int = logging.INFO) -> None:
    """The process's log output: one handler on the root logger, in ``fmt`` (json|text)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = StdStream("stderr")
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
