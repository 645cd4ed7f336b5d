"""Tests for exporter.logs: one record is one line, whatever text it carries."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import aiohttp

from exporter.logs import JsonFormatter, LogfmtFormatter, setup_logging
from exporter.simulator import CannedResponse
from tests.support import TASK_A, SimServer
from tests.test_poller import make_rig

NASTY = 'bad "value" = x\r\nts=0 level=error msg=forged\x1b[2J\u2028tail\x85end\\'


def fields(line: str) -> list[tuple[str, str]]:
    """The key=value pairs of a logfmt line (values quoted with backslash escapes, or bare)."""
    return re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]+)', line)


def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    """A log record as the logging module makes it."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("exporter.test", logging.WARNING, __file__, 1, message, (), exc_info)


def test_logfmt_keeps_hostile_text_on_one_line() -> None:
    """CR, LF, escape sequences and Unicode line separators are escaped, quotes too."""
    line = LogfmtFormatter().format(record(NASTY))
    assert line.splitlines() == [line]
    assert "\x1b" not in line and "\r" not in line
    assert [key for key, _ in fields(line)] == ["ts", "level", "logger", "msg"]  # none forged
    assert '\\"value\\"' in line and "\\r\\n" in line and "\\u001b" in line


def test_logfmt_bare_and_quoted_values() -> None:
    """Plain values stay bare; a message with spaces is quoted."""
    line = LogfmtFormatter().format(record("plain"))
    assert " level=warn logger=exporter.test msg=plain" in line
    assert 'msg="two words"' in LogfmtFormatter().format(record("two words"))


def test_traceback_goes_into_err_on_the_same_line() -> None:
    """A logged exception is one line with an err field holding the traceback."""
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        error = exc
    line = LogfmtFormatter().format(record("failed", error))
    assert line.splitlines() == [line]
    assert 'err="Traceback' in line and "RuntimeError: boom" in line


def test_json_lines_round_trip_and_stay_single_lines() -> None:
    """The JSON form decodes back to the exact message and has no raw line separators."""
    line = JsonFormatter().format(record(NASTY))
    assert line.splitlines() == [line]
    assert json.loads(line)["msg"] == NASTY


def test_setup_logging_levels(capsys: object) -> None:
    """--log.level warn hides info, and the root handler writes logfmt to stderr."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("warn", "logfmt")
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, LogfmtFormatter)
        assert root.handlers[0].stream is sys.stderr  # type: ignore[attr-defined]
        setup_logging("debug", "json")
        assert root.level == logging.DEBUG
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_an_api_error_message_cannot_forge_a_log_line(sim_server: SimServer) -> None:
    """An error_msg with CR/LF and a fake record, logged by the real poller, is one logfmt line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("exporter")
    logger.addHandler(handler)
    try:
        async with aiohttp.ClientSession() as session:
            rig = make_rig(sim_server, session, (TASK_A,))
            sim_server.sim.push(
                TASK_A,
                CannedResponse(status=500, body={"error_code": "DCS.5000", "error_msg": NASTY}),
            )
            await rig.round()
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    failures = [line for line in lines if "poll failed" in line]
    assert len(failures) == 1
    assert not any(line.startswith("ts=0") for line in lines)
    assert [key for key, _ in fields(failures[0])] == ["ts", "level", "logger", "msg"]


def _aiohttp_server_record(error: Exception) -> logging.LogRecord:
    """The record aiohttp's server logs for a request it could not handle."""
    try:
        raise error
    except Exception:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        exc_info,
    )


def test_malformed_requests_do_not_log_tracebacks() -> None:
    """A header over 8 KB is dropped from an info log and shortened to one debug line at debug;
    a real handler error keeps its traceback."""
    from aiohttp.http_exceptions import LineTooLong

    from exporter.logs import MalformedRequestFilter

    server_log = logging.getLogger("aiohttp.server")
    old_level = server_log.level
    flt = MalformedRequestFilter()
    try:
        server_log.setLevel(logging.INFO)
        assert not flt.filter(_aiohttp_server_record(LineTooLong("a" * 9000, "8190")))
        server_log.setLevel(logging.DEBUG)
        record = _aiohttp_server_record(LineTooLong("a" * 9000, "8190"))
        assert flt.filter(record)
        assert (record.levelno, record.exc_info) == (logging.DEBUG, None)
        assert record.getMessage().startswith("Error handling request from 127.0.0.1: LineTooLong")
        assert len(record.getMessage()) < 200
        bug = _aiohttp_server_record(RuntimeError("a handler bug"))
        assert flt.filter(bug)
        assert bug.levelno == logging.ERROR and bug.exc_info is not None
    finally:
        server_log.setLevel(old_level)
