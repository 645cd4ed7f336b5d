"""Log formatting: logfmt (the Prometheus ecosystem's default) or one JSON object per line."""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime

from aiohttp.http_exceptions import HttpProcessingError

LEVELS = ("debug", "info", "warn", "error")
_LEVEL_NAMES = {"WARNING": "warn", "CRITICAL": "error"}


def _level_name(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelname, record.levelname.lower())


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


# Characters that end or rewrite a line in some reader (terminals, splitlines, log shippers).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\u{ord(char):04x}"


def _logfmt_value(value: str) -> str:
    """A bare value when it is safe, else a quoted one with quotes and control characters escaped.

    Messages carry text from API answers; escaping keeps every record on exactly one line, so
    an answer cannot forge a log line of its own.
    """
    if value and not any(c in value for c in ' "=\\') and not _CONTROL.search(value):
        return value
    escaped = _CONTROL.sub(_escape_control, value.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


def _fields(record: logging.LogRecord) -> dict[str, str]:
    """The fields of one log line; a traceback goes into ``err`` so that it stays on that line."""
    fields = {
        "ts": _timestamp(record),
        "level": _level_name(record),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info:
        fields["err"] = "".join(traceback.format_exception(*record.exc_info)).strip()
    return fields


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=warn logger=exporter.poller msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line."""
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        line = json.dumps(_fields(record), ensure_ascii=False)
        # JSON escapes C0 controls itself; these three are valid raw but split lines elsewhere.
        return (
            line.replace("\x85", "\\u0085")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )


class MalformedRequestFilter(logging.Filter):
    """Turn aiohttp's error-level traceback for a malformed request into one debug line.

    A header over 8 KB or a broken request line already gets its 400; logged as an error with a
    traceback, it would let any client fill the log. Real handler errors are left alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop (or, at debug level, shorten) records about requests that could not be parsed."""
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        # Only the start: the parser's message quotes what the client sent.
        detail = str(error.message)[:80]
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {detail}"
        record.args = None
        record.exc_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def log_each_line(logger: logging.Logger, level: int, headline: str, text: str) -> None:
    """``headline``, then each line of ``text`` as a record of its own: one message with newlines
    would be a single logfmt line with escaped ``\\n`` (a list of config problems, say)."""
    logger.log(level, "%s", headline)
    for line in text.splitlines():
        logger.log(level, "%s", line)


def setup_logging(level: str, fmt: str) -> None:
    """Send logs to stderr in the chosen format and level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": logging.WARNING}.get(level, level.upper()))
    # aiohttp's access log would print a line per scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
