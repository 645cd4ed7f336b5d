"""``dcs-migration-exporter status``: one line per task in a terminal, for the person on call.

Two sources, one format:

- ``--url http://host:9713`` reads a running exporter's ``/api/v1/tasks`` (basic auth from
  ``DCS_EXPORTER_USERNAME`` and ``DCS_EXPORTER_PASSWORD`` or ``--password-file``, never argv);
- ``--config.file PATH`` polls the cloud once per refresh through the exporter's own client.

Both go through :func:`exporter.landing.task_snapshot`, so the terminal, the landing page and the
JSON feed agree. ``--watch`` redraws every ``--interval``; the ETA of the full phase then comes from
the progress rate between the oldest and newest reading seen (the exporter's own estimate, or
``–``, before that). ``--output json`` prints the same data for scripts, one document per refresh.

Exit status: 0 when every task's last poll succeeded, 1 when one did not, 2 when the status could
not be read at all.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, get_args
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from exporter import landing
from exporter.config import Config, ConfigError, load_config, parse_duration
from exporter.landing import DASH, Sample, Trend, TrendKind, format_count, format_duration
from exporter.logs import LEVELS, setup_logging
from exporter.state import ExporterState

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:9713"
USERNAME_ENV = "DCS_EXPORTER_USERNAME"
PASSWORD_ENV = "DCS_EXPORTER_PASSWORD"
BAR_WIDTH = 20
ETA_WINDOW_SECONDS = 900.0
EXIT_OK, EXIT_DOWN, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 130
_TREND_KINDS: dict[str, TrendKind] = {kind: kind for kind in get_args(TrendKind)}


class StatusError(Exception):
    """The status could not be read; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# One task, as read from a snapshot


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def printable(text: str) -> str:
    """``text`` with control characters replaced: names from the cloud must not drive the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


@dataclass(frozen=True)
class TaskLine:
    """What the terminal shows of one task; built from a snapshot entry of ``/api/v1/tasks``."""

    task_id: str
    name: str
    health: str
    status: str | None = None
    progress: float | None = None
    offset: float | None = None
    trend: Trend = field(default_factory=lambda: Trend("unknown"))
    last_success_time: float | None = None
    last_reason: str | None = None
    consecutive_failures: int = 0
    server_eta: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)  # the entry without "display"

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> TaskLine:
        """Read one entry defensively: a field of the wrong type is unknown, not an error."""
        task_id = _text(entry.get("task_id")) or "?"
        kind = entry.get("offset_trend")
        trend = Trend(
            _TREND_KINDS.get(kind, "unknown") if isinstance(kind, str) else "unknown",
            _number(entry.get("offset_rate")),
            _number(entry.get("offset_held_seconds")),
        )
        failures = entry.get("consecutive_failures")
        return cls(
            task_id=task_id,
            name=_text(entry.get("name")) or task_id,
            health=_text(entry.get("health")) or "pending",
            status=_text(entry.get("status")),
            progress=_number(entry.get("progress")),
            offset=_number(entry.get("offset")),
            trend=trend,
            last_success_time=_number(entry.get("last_success_time")),
            last_reason=_text(entry.get("last_reason")),
            consecutive_failures=failures if isinstance(failures, int) else 0,
            server_eta=_number(entry.get("full_eta_seconds")),
            data={key: value for key, value in entry.items() if key != "display"},
        )


def parse_document(document: Any) -> list[TaskLine]:
    """The tasks of an ``/api/v1/tasks`` document."""
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), list):
        raise StatusError("the answer is not an /api/v1/tasks document (is this the exporter?)")
    return [TaskLine.from_json(entry) for entry in document["tasks"] if isinstance(entry, dict)]


# --------------------------------------------------------------------------------------------------
# ETA from successive readings


class EtaTracker:
    """Progress readings per task, keyed by poll time, to estimate the full phase's ETA."""

    def __init__(self, window: float = ETA_WINDOW_SECONDS, max_samples: int = 256) -> None:
        self.window = window
        self._samples: dict[str, deque[Sample]] = {}
        self._max = max_samples

    def add(self, tasks: Sequence[TaskLine]) -> None:
        """Record each task's reading if it comes from a poll not seen yet."""
        for task in tasks:
            if task.last_success_time is None or task.progress is None:
                continue
            ring = self._samples.setdefault(task.task_id, deque(maxlen=self._max))
            if ring and task.last_success_time <= ring[-1].at:
                continue
            ring.append(Sample(task.last_success_time, task.offset, task.progress))
            while ring[0].at < task.last_success_time - self.window:
                ring.popleft()

    def eta(self, task: TaskLine) -> float | None:
        """Seconds to 100 % from the oldest and newest reading; else the source's own estimate."""
        ring = self._samples.get(task.task_id)
        if ring and len(ring) >= 2:
            estimate = landing.full_eta(ring[0], ring[-1])
            if estimate is not None:
                return estimate
        if task.progress is not None and task.progress >= 1.0:
            return 0.0
        return task.server_eta


# --------------------------------------------------------------------------------------------------
# Formatting


def progress_bar(ratio: float | None, width: int = BAR_WIDTH, *, unicode: bool = True) -> str:
    """``[█████░░░░░]``; all blank when unknown."""
    full, empty = ("█", "░") if unicode else ("#", ".")
    if ratio is None:
        return "[" + " " * width + "]"
    filled = max(0, min(width, int(ratio * width)))  # floor: 99.9 % is not a full bar
    return "[" + full * filled + empty * (width - filled) + "]"


def health_text(task: TaskLine) -> str:
    """``up``, ``down: timeout ×3``, ``pending``, ``gone``."""
    if task.health == "down":
        return f"down: {task.last_reason or 'error'} ×{task.consecutive_failures}"
    return task.health


def eta_text(eta: float | None, progress: float | None) -> str:
    """``2h 41m``, ``done``, or ``–``."""
    if progress is not None and progress >= 1.0:
        return "done"
    if eta is None:
        return DASH
    return format_duration(eta)


def format_lines(
    tasks: Sequence[TaskLine], tracker: EtaTracker, *, unicode: bool = True
) -> list[str]:
    """A header and one line per task: name, bar, percent, offset and trend, ETA, health."""
    rows = []
    for task in tasks:
        percent = DASH if task.progress is None else f"{task.progress * 100:.0f} %"
        rows.append(
            (
                printable(task.name),
                f"{progress_bar(task.progress, unicode=unicode)} {percent:>5}",
                format_count(task.offset),
                task.trend.label,
                eta_text(tracker.eta(task), task.progress),
                printable(health_text(task)),
            )
        )
    header = ("TASK", "FULL SYNC", "OFFSET", "TREND", "ETA", "HEALTH")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].ljust(widths[3]),
            row[4].ljust(widths[4]),
            row[5],
        ]
        lines.append("  ".join(cells).rstrip())
    if not rows:
        lines.append("(no tasks)")
    text = "\n".join(lines)
    return text.splitlines() if unicode else _ascii(text).splitlines()


def _ascii(text: str) -> str:
    """For terminals that cannot show the Unicode of the normal output."""
    for fancy, plain in (("–", "-"), ("→", "->"), ("↓", "v"), ("↑", "^"), ("×", "x")):
        text = text.replace(fancy, plain)
    return text.encode("ascii", "replace").decode()


def json_document(source: str, tasks: Sequence[TaskLine], tracker: EtaTracker) -> dict[str, Any]:
    """What ``--output json`` prints: the feed's fields, with this command's ETA."""
    entries = []
    for task in tasks:
        entry = dict(task.data)
        eta = tracker.eta(task)
        entry["full_eta_seconds"] = None if eta is None else round(eta, 1)
        entries.append(entry)
    return {"source": source, "generated_at": time.time(), "tasks": entries}


def exit_code(tasks: Sequence[TaskLine]) -> int:
    """0 when every task is up, else 1."""
    return EXIT_OK if all(task.health == "up" for task in tasks) else EXIT_DOWN


# --------------------------------------------------------------------------------------------------
# Sources


class Source(Protocol):
    """Where the tasks come from."""

    name: str

    async def fetch(self) -> list[TaskLine]:
        """The tasks now; raises StatusError when they cannot be read."""

    async def close(self) -> None:
        """Release connections."""


def exporter_base_url(url: str) -> str:
    """The exporter's base URL from what a user typed: ``host:9713``, ``http://host:9713/metrics``.

    Credentials written into the URL are dropped here (see ``url_credentials``), so that no
    message ever shows them; a query or fragment is dropped too.
    """
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/")
    for page in ("/api/v1/tasks", "/metrics"):
        path = path.removesuffix(page)
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def url_credentials(url: str) -> str | None:
    """A basic ``Authorization`` value from ``user:password@`` in the URL, if it has them."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.username is None:
        return None
    return basic_header(unquote(parts.username), unquote(parts.password or ""))


class UrlSource:
    """A running exporter's ``/api/v1/tasks``."""

    def __init__(
        self,
        url: str,
        *,
        authorization: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.name = exporter_base_url(url)
        self._timeout = timeout
        self._endpoint = f"{self.name}/api/v1/tasks"
        self._headers = {"Accept": "application/json"}
        authorization = authorization or url_credentials(url)
        if authorization is not None:
            self._headers["Authorization"] = authorization
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True
        )

    async def fetch(self) -> list[TaskLine]:
        """GET the feed and parse it."""
        try:
            async with self._session.get(
                self._endpoint,
                ssl=self._ssl,
                headers=self._headers,
            ) as response:
                if response.status == 401:
                    hint = "wrong" if "Authorization" in self._headers else "missing"
                    raise StatusError(
                        f"{self._endpoint}: 401, credentials {hint}; set {USERNAME_ENV} and "
                        f"{PASSWORD_ENV} (or --password-file)"
                    )
                if response.status != 200:
                    raise StatusError(f"{self._endpoint}: HTTP {response.status}")
                document = await response.json(content_type=None)
        except TimeoutError as error:
            raise StatusError(
                f"{self._endpoint}: no answer within {self._timeout:g}s (is the exporter running?)"
            ) from error
        except aiohttp.ClientError as error:
            raise StatusError(f"{self._endpoint}: {type(error).__name__}: {error}") from error
        except ValueError as error:
            raise StatusError(f"{self._endpoint}: not JSON: {error}") from error
        return parse_document(document)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._session.close()


class CloudSource:
    """Polls the cloud directly through the exporter's client, once per fetch."""

    def __init__(self, config: Config, name: str) -> None:
        from exporter.daemon import build_poller
        from exporter.session import open_session

        self.name = name
        self.state = ExporterState()
        self._history = landing.History()
        self._session = open_session(config)
        self._pollers = [
            build_poller(config, self._session, self.state, target=target, owned=())
            for target in config.targets
        ]

    async def fetch(self) -> list[TaskLine]:
        """Poll every task of every target now and read the result like the feed."""
        await asyncio.gather(*(poller.poll_all_once() for poller in self._pollers))
        document = landing.snapshot(self.state, self._history, time.time())
        return parse_document(json.loads(json.dumps(document)))

    async def close(self) -> None:
        """Stop polls in flight and close the HTTP session."""
        for poller in self._pollers:
            await poller.stop()
        await self._session.close()


# --------------------------------------------------------------------------------------------------
# Command line


def _interval(text: str) -> float:
    seconds = parse_duration(text) if not text.replace(".", "", 1).isdigit() else float(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 5s or 1m")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``dcs-migration-exporter status``."""
    parser = argparse.ArgumentParser(
        prog="dcs-migration-exporter status",
        description="Show the migration tasks in the terminal, from a running exporter or the cloud.",
        epilog=f"Basic auth for --url: {USERNAME_ENV} and {PASSWORD_ENV} (or --password-file). "
        "Exit status: 0 all tasks up, 1 a task is not, 2 no status.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help=f"a running exporter (default {DEFAULT_URL})")
    source.add_argument(
        "--config.file",
        dest="config_file",
        metavar="PATH",
        help="poll the cloud directly with this exporter config",
    )
    parser.add_argument("--watch", action="store_true", help="redraw until interrupted")
    parser.add_argument(
        "--interval", type=_interval, default=5.0, metavar="DURATION", help="for --watch (5s)"
    )
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--username", default=None, help=f"basic auth user (or {USERNAME_ENV})")
    parser.add_argument(
        "--password-file", default=None, metavar="PATH", help=f"instead of {PASSWORD_ENV}"
    )
    parser.add_argument("--ca-file", default=None, metavar="PATH", help="CA for an https URL")
    parser.add_argument("--log.level", dest="log_level", default="error", choices=LEVELS)
    return parser


def basic_auth(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str | None:
    """An ``Authorization`` value from the environment or a file; None when no user is set."""
    user = args.username or environ.get(USERNAME_ENV)
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as error:
            raise StatusError(f"cannot read --password-file: {error}") from error
    else:
        password = environ.get(PASSWORD_ENV, "")
    if not user:
        if password:
            raise StatusError(f"a password is set but no user: set {USERNAME_ENV} or --username")
        return None
    return basic_header(user, password)


def basic_header(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"


def make_source(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Source:
    """The source the flags ask for; raises StatusError for a bad config or credentials."""
    if args.config_file:
        try:
            config = load_config(args.config_file)
        except ConfigError as error:
            raise StatusError(str(error)) from error
        return CloudSource(config, f"cloud ({args.config_file})")
    ssl_context = None
    if args.ca_file:
        try:
            ssl_context = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise StatusError(f"cannot use --ca-file: {error}") from error
    return UrlSource(
        args.url or DEFAULT_URL, authorization=basic_auth(args, environ), ssl_context=ssl_context
    )


def _supports_unicode(stream: TextIO) -> bool:
    encoding = getattr(stream, "encoding", None)
    if encoding is None:
        return True  # an in-memory text stream holds any character
    try:
        "█░–→↓↑×".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


async def run(
    args: argparse.Namespace,
    source: Source,
    out: TextIO,
    *,
    sleep: Callable[[float], Any] = asyncio.sleep,
    refreshes: int | None = None,
) -> int:
    """Show the status once, or every ``args.interval`` with ``--watch`` (``refreshes`` bounds it)."""
    tracker = EtaTracker()
    unicode = _supports_unicode(out)
    redraw = args.watch and args.output == "text" and out.isatty()
    code, done = EXIT_UNAVAILABLE, 0
    while True:
        try:
            tasks = await source.fetch()
        except StatusError as error:
            if not args.watch:
                print(f"status: {error}", file=sys.stderr)
                return EXIT_UNAVAILABLE
            tasks, code = [], EXIT_UNAVAILABLE
            problem = f"status: {error}"
        else:
            tracker.add(tasks)
            code, problem = exit_code(tasks), ""
        if args.output == "json":
            if not problem:
                out.write(json.dumps(json_document(source.name, tasks, tracker)) + "\n")
            else:
                print(problem, file=sys.stderr)
        else:
            lines = [problem] if problem else format_lines(tasks, tracker, unicode=unicode)
            if args.watch:
                stamp = time.strftime("%H:%M:%S")
                lines = [
                    f"{source.name} · every {format_duration(args.interval)} · {stamp}",
                    *lines,
                ]
            text = "\n".join(lines) + "\n"
            # Clear and redraw in place on a terminal; a pipe gets one block per refresh.
            out.write(("\x1b[H\x1b[J" + text) if redraw else (text + ("\n" if args.watch else "")))
        out.flush()
        done += 1
        if not args.watch or (refreshes is not None and done >= refreshes):
            return code
        await sleep(args.interval)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dcs-migration-exporter status``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "logfmt")

    async def go() -> int:
        try:
            source = make_source(args)
        except StatusError as error:
            print(f"status: {error}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        try:
            return await run(args, source, sys.stdout)
        finally:
            await source.close()

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        # Ctrl-C is how --watch ends; a one-shot status that was cut short has no answer.
        return EXIT_OK if args.watch else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`status --watch | head`): not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
