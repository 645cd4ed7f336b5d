"""Log formatting: logfmt (the Prometheus ecosystem's default) or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime

LEVELS = ("debug", "info", "warn", "error")
_LEVEL_NAMES = {"WARNING": "warn", "CRITICAL": "error"}


def _level_name(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelname, record.levelname.lower())


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
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
        return json.dumps(_fields(record), ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Send logs to stderr in the chosen format and level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": logging.WARNING}.get(level, level.upper()))
    # aiohttp's access log would print a line per scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
