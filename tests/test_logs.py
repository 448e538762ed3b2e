"""Log lines and request IDs.

The access-log line written without ``logging`` is the line ``JsonFormatter`` makes.

``AccessLog`` writes straight to the JSON handler's stream only while that handler is the
only way out for ``gateway.access``; with any other handler, filter or format the record
goes through ``logging`` (so nothing that captures records misses one).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway import logs
from gateway.logs import AccessLog, JsonFormatter, new_request_id

FIELDS: list[dict[str, object]] = [
    {"method": "GET", "path": "/issues/1/pages/2", "status": 200, "duration_ms": 1.25,
     "upstream": "reader", "session": "0123456789ab"},
    {"method": "POST", "path": '/a"b\\c\n\x00\x7f/é/日本/\U0001f600', "status": 502,
     "duration_ms": 0.0, "member_id": "Müller \"M1\"", "cut": True},
    {"method": "GET", "path": "/", "status": 0, "duration_ms": 12345.67, "note": None,
     "ratio": float("nan"), "big": 10**20, "list": [1, "x"]},
]


@contextmanager
def serve_logging(monkeypatch: pytest.MonkeyPatch, fmt: str = "json") -> Iterator[io.StringIO]:
    """``configure_logging(fmt)`` as ``serve`` has it, its stream a buffer; pytest's own
    capture handlers are set aside while it is on."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        logs.configure_logging(fmt)
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
        monkeypatch.setattr(logs, "_json_handler", None)


def formatter_line(fields: dict[str, object], request_id: str) -> dict[str, object]:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None,
                               None)
    record.fields, record.request_id = fields, request_id
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


@pytest.mark.parametrize("fields", FIELDS)
def test_direct_line_is_the_formatters_line(monkeypatch: pytest.MonkeyPatch,
                                             fields: dict[str, object]) -> None:
    access = AccessLog()

    def through_logging(*args: object, **kwargs: object) -> None:
        raise AssertionError("the line went through logging")

    monkeypatch.setattr(access.logger, "info", through_logging)
    with serve_logging(monkeypatch) as stream:
        access.write("request", dict(fields), "rid-1")
    text = stream.getvalue()
    assert text.endswith("}\n") and text.count("\n") == 1 and text.isascii()
    written = json.loads(text)
    expected = formatter_line(dict(fields), "rid-1")
    assert written.keys() == expected.keys() and list(written) == list(expected)
    # Same text for every key but the time (each line reads the clock itself).
    for key in expected:
        if key != "time":
            assert json.dumps(written[key]) == json.dumps(expected[key]), key
    assert str(written["time"]).endswith("Z") and len(str(written["time"])) == 24


def test_any_other_handler_gets_the_record(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with serve_logging(monkeypatch) as stream:
        # pytest's capture handler on the root: the record must reach it, not the stream.
        logging.getLogger().addHandler(caplog.handler)
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            AccessLog().write("request", {"status": 200}, "rid-2")
    records = [r for r in caplog.records if r.name == "gateway.access"]
    assert [(r.getMessage(), r.fields, r.request_id) for r in records] == [  # type: ignore[attr-defined]
        ("request", {"status": 200}, "rid-2")]
    assert json.loads(stream.getvalue())["request_id"] == "rid-2"  # the JSON handler, too


def test_a_filter_or_quiet_level_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    access = logging.getLogger("gateway.access")
    with serve_logging(monkeypatch) as stream:
        dropped = logging.Filter("nothing-matches")
        access.addFilter(dropped)
        try:
            AccessLog().write("request", {"status": 200}, "rid-3")
        finally:
            access.removeFilter(dropped)
        access.setLevel(logging.WARNING)
        try:
            AccessLog().write("request", {"status": 200}, "rid-4")
        finally:
            access.setLevel(logging.NOTSET)
        AccessLog().write("request", {"status": 201}, "rid-5")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["rid-5"]


def test_text_format_goes_through_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_logging(monkeypatch, "text") as stream:
        AccessLog().write("request", {"status": 200, "path": "/x"}, "rid-6")
    assert stream.getvalue() == "INFO gateway.access request status=200 path=/x [rid-6]\n"


def test_request_ids_are_random_hex_and_not_shared_with_a_forked_child() -> None:
    ids = [new_request_id() for _ in range(3000)]  # several refills of the supply
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next IDs, to the parent
        os.close(read)
        os.write(write, " ".join(new_request_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)



@pytest.mark.parametrize("now", [0.0, 18203485.694999967, 1e9 + 0.0005, 1e9 + 0.9999996,
                                 1.7e9 + 0.9999999, 1796596111.9734468, 4e9 - 0.5])
def test_line_times_are_the_ones_datetime_writes(now: float) -> None:
    clock = logs._Clock()
    clock.stamp(now - 1)  # a cached second before it
    expected = (dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"))
    assert clock.stamp(now) == expected
