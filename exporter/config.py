"""Load the YAML config into frozen dataclasses, reporting every problem with its place.

The file's shape is the product's contract (DESIGN.md, ``config.example.yaml``). Secrets can come
from ``${VAR}`` or from a ``*_file`` key; files are read again whenever credentials are needed, so
a rotated secret is picked up without a restart.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from yaml.error import Mark
from yaml.nodes import MappingNode, Node, SequenceNode

from exporter.endpoints import default_endpoints, known_regions
from exporter.yamlnodes import (
    Problem,
    Problems,
    compose,
    describe,
    is_null,
    mapping_items,
    scalar,
    sequence_items,
    shorten,
    string,
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Whole-value patterns are used with fullmatch: ``$`` would also match before a final newline.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PROJECT_ID = re.compile(r"[0-9a-fA-F]{32}")
# An http(s) origin plus an optional path: no spaces, query, fragment or user:password@.
MIN_DURATION_SECONDS = 0.1
MAX_DURATION_SECONDS = 7 * 86400.0
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[^\s?#]*)?")

_AKSK_KEYS = frozenset(
    {"access_key", "secret_key", "secret_key_file", "security_token", "security_token_file"}
)
_PASSWORD_KEYS = frozenset({"username", "password", "password_file", "domain_name"})
_SECTION_KEYS: dict[str, frozenset[str]] = {
    "cloud": frozenset({"region", "project_id", "project_name", "dcs_endpoint", "iam_endpoint"}),
    "auth": _AKSK_KEYS | _PASSWORD_KEYS,
    "polling": frozenset(
        {
            "interval",
            "timeout",
            "concurrency",
            "details_interval",
            "stale_intervals",
            "max_requests_per_second",
            "token_refresh_margin",
        }
    ),
    "tasks[]": frozenset({"id", "name"}),
    "discovery": frozenset({"interval", "name_regex", "status", "migration_type"}),
}
_TOP_KEYS = frozenset({"cloud", "auth", "polling", "tasks", "discovery", "targets"})
# The keys of one entry of ``targets``: a name, then the per-project sections of the top level.
_TARGET_KEYS = frozenset({"name", "cloud", "auth", "tasks", "discovery"})
_PER_TARGET_SECTIONS = ("cloud", "auth", "tasks", "discovery")
# The name of the one target of a file without ``targets:`` (shown in logs and labels).
DEFAULT_TARGET_NAME = "default"


def _elsewhere(section: str) -> dict[str, str]:
    """Keys of the other sections (and the top level), each with where it belongs."""
    where = {key: "the top level" for key in _TOP_KEYS if key != section}
    for other, keys in _SECTION_KEYS.items():
        if other != section:
            label = "a list item under tasks" if other == "tasks[]" else other
            for key in keys:
                where.setdefault(key, label)  # a key of two sections: the first (interval: polling)
    return where


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists everything that is wrong, in file order."""

    def __init__(self, filename: str, problems: list[Problem]) -> None:
        self.filename = filename
        self.problems = sorted(problems, key=lambda p: (p.line, p.column))
        super().__init__("\n".join(p.render(filename) for p in self.problems))


@dataclass(frozen=True)
class Secret:
    """A secret given inline or as a file; the file is read on every ``read()``."""

    value: str | None = field(default=None, repr=False)
    file: str | None = None

    def read(self) -> str:
        """Return the secret, re-reading its file so that rotation needs no restart."""
        if self.file is not None:
            return Path(self.file).read_text(encoding="utf-8").strip()
        return self.value or ""


@dataclass(frozen=True)
class AkSkAuth:
    """Access key / secret key signing (SDK-HMAC-SHA256)."""

    access_key: str
    secret_key: Secret
    security_token: Secret | None = None


@dataclass(frozen=True)
class PasswordAuth:
    """An IAM user whose password buys a project-scoped token."""

    username: str
    password: Secret
    domain_name: str


Auth = AkSkAuth | PasswordAuth


@dataclass(frozen=True)
class CloudConfig:
    """Where the project lives."""

    region: str
    dcs_endpoint: str
    iam_endpoint: str
    project_id: str | None = None  # None: looked up through IAM by project_name
    project_name: str | None = None  # defaults to the region, the name of its main project


@dataclass(frozen=True)
class PollingConfig:
    """How often and how hard the cloud API is asked."""

    interval: float = 30.0
    timeout: float = 10.0
    concurrency: int = 8
    details_interval: float = 300.0  # task details (name, status) change rarely
    stale_intervals: int = 3  # failed polls after which the last good values are dropped
    max_requests_per_second: float = 10.0  # ceiling per project, shared by all its tasks
    token_refresh_margin: float = 3600.0


@dataclass(frozen=True)
class TaskConfig:
    """One migration task to watch."""

    id: str
    name: str | None = None


@dataclass(frozen=True)
class DiscoveryConfig:
    """Find tasks through the list API (exporter.discovery); empty filters match everything."""

    interval: float = 300.0  # tasks come and go over hours; the list is paged, so not too often
    name_regex: str | None = None  # searched in the task name
    statuses: tuple[str, ...] = ()  # as the list reports them: SUCCESS, FAILED, MIGRATING, ...
    migration_types: tuple[str, ...] = ()  # online_migration, backupfile_import


@dataclass(frozen=True)
class Target:
    """One project (in one region) with its credentials and tasks: an entry of ``targets``."""

    name: str  # unique; in logs, and the ``target`` label of per-target exporter metrics
    cloud: CloudConfig
    auth: Auth
    tasks: tuple[TaskConfig, ...]
    discovery: DiscoveryConfig | None = None  # None: only the listed tasks


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration.

    ``cloud``, ``auth``, ``tasks``, ``discovery`` and ``name`` are the first target: the only one
    of a file without ``targets:``. ``more_targets`` are the entries after the first; every
    multi-target consumer reads ``targets``, which is all of them in file order.
    """

    cloud: CloudConfig
    auth: Auth
    polling: PollingConfig
    tasks: tuple[TaskConfig, ...]
    discovery: DiscoveryConfig | None = None  # None: only the listed tasks
    name: str = DEFAULT_TARGET_NAME
    more_targets: tuple[Target, ...] = ()

    @property
    def targets(self) -> tuple[Target, ...]:
        """Every target, the first one built from the top-level fields."""
        first = Target(self.name, self.cloud, self.auth, self.tasks, self.discovery)
        return (first, *self.more_targets)

    @property
    def all_tasks(self) -> tuple[TaskConfig, ...]:
        """The configured tasks of every target (IDs are unique across targets)."""
        return tuple(task for target in self.targets for task in target.tasks)


def is_task_id(value: object) -> bool:
    """Whether ``value`` is a task ID: a string of 1 to 128 letters, digits and ``_.-``, no more."""
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def is_project_id(value: object) -> bool:
    """Whether ``value`` is a project ID as IAM issues them: 32 hex digits."""
    return isinstance(value, str) and _PROJECT_ID.fullmatch(value) is not None


def parse_duration(text: str) -> float | None:
    """Parse ``1h30m``, ``30s``, ``500ms``, ``2d`` into seconds; None if it is not a duration."""
    text = text.strip()
    if not text or _DURATION.sub("", text) != "":
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION.findall(text))


def load_config(path: str) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, [Problem("", 0, 0, f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = Problem("", line, column, "not UTF-8 text; save the file as UTF-8")
        raise ConfigError(path, [problem]) from None
    return parse_config(text, path)


def parse_config(text: str, filename: str = "config.yaml") -> Config:
    """Validate config text; raise ConfigError listing every problem."""
    root, syntax_problem = compose(text)
    if syntax_problem is not None:
        raise ConfigError(filename, [syntax_problem])
    problems = Problems()
    if root is None:  # an empty file, or only comments: report every missing section at 1:1
        start = Mark(filename, 0, 0, 0, "", 0)
        root = MappingNode("tag:yaml.org,2002:map", [], start, start)
    sections = mapping_items(root, "", _TOP_KEYS, problems, elsewhere=_elsewhere(""))
    if sections is None:
        raise ConfigError(filename, problems.items)
    polling = _read_polling(sections.get("polling"), problems)
    targets: list[Target | None]
    if "targets" in sections:
        targets = _read_targets(sections, root, problems)
    else:
        targets = [_read_target(DEFAULT_TARGET_NAME, sections, root, problems, taken={})]
    if problems.items or polling is None or not targets or None in targets:
        if not problems.items:  # a reader gave up without saying why: still never an empty error
            problems.add("", root, "invalid configuration")
        raise ConfigError(filename, problems.items)
    first, *more = (target for target in targets if target is not None)
    return Config(
        cloud=first.cloud,
        auth=first.auth,
        polling=polling,
        tasks=first.tasks,
        discovery=first.discovery,
        name=first.name,
        more_targets=tuple(more),
    )


class _Prefixed(Problems):
    """Problems whose paths are put under a prefix (``targets[1].``), collected into ``outer``."""

    def __init__(self, outer: Problems, prefix: str) -> None:
        super().__init__()
        self.items = outer.items  # shared: readers compare its length before and after
        self._prefix = prefix

    def add(self, path: str, node: Node | None, message: str) -> None:
        """Record a problem with the prefix in front of its path."""
        super().add(f"{self._prefix}.{path}" if path else self._prefix, node, message)


def _read_target(
    name: str,
    sections: dict[str, Node],
    parent: Node,
    problems: Problems,
    taken: dict[str, tuple[str, int]],
    path: str = "",
) -> Target | None:
    """Read the per-project sections of the top level, or of the entry of ``targets`` at ``path``.

    ``taken`` maps task IDs (lowercase) already read in earlier targets to where they were, so
    that a task listed under two targets is refused with both places named.
    """
    cloud = _read_cloud(sections.get("cloud"), parent, problems)
    auth = _read_auth(sections.get("auth"), parent, problems)
    discovery_node = sections.get("discovery")
    discovery = _read_discovery(discovery_node, problems) if discovery_node is not None else None
    tasks_node = sections.get("tasks")
    tasks: tuple[TaskConfig, ...] | None
    if discovery_node is not None and _no_tasks(tasks_node):
        tasks = ()  # discovery alone may supply every task
    else:
        where = f"{path}.tasks" if path else "tasks"
        tasks = _read_tasks(tasks_node, parent, problems, taken, where)
    if cloud is None or auth is None or tasks is None:
        return None
    return Target(name=name, cloud=cloud, auth=auth, tasks=tasks, discovery=discovery)


def _read_targets(sections: dict[str, Node], root: Node, problems: Problems) -> list[Target | None]:
    """Read the ``targets`` list: named entries with their own cloud, auth, tasks and discovery."""
    node = sections["targets"]
    targets_key = _key_node(root, "targets")
    targets_line = (targets_key or node).start_mark.line + 1
    for key in _PER_TARGET_SECTIONS:
        if key in sections:
            problems.add(
                key,
                _key_node(root, key),
                f"cannot be used together with targets (line {targets_line}); "
                f"put {key} inside each entry of targets",
            )
    if is_null(node) or (isinstance(node, SequenceNode) and not node.value):
        problems.add("targets", node, "must be a non-empty list of targets (each with a name)")
        return []
    targets: list[Target | None] = []
    names: dict[str, int] = {}
    taken: dict[str, tuple[str, int]] = {}
    for path, item in sequence_items(node, "targets", problems):
        if is_null(item):
            problems.add(path, item, "is empty; each target needs a name, cloud and auth")
            targets.append(None)
            continue
        items = mapping_items(
            item,
            path,
            _TARGET_KEYS,
            problems,
            elsewhere={"polling": "the top level; polling is shared by all targets"},
        )
        if items is None:
            targets.append(None)
            continue
        name = _required_string(items, "name", item, f"{path}.name", problems)
        if name is not None:
            name_line = items["name"].start_mark.line + 1
            if name in names:
                problems.add(
                    f"{path}.name",
                    items["name"],
                    f"duplicate target name {name!r} (first on line {names[name]}); "
                    "names must be unique",
                )
                name = None
            else:
                names[name] = name_line
        target = _read_target(name or "", items, item, _Prefixed(problems, path), taken, path)
        targets.append(target if name is not None else None)
    return targets


def _key_node(mapping: Node, key: str) -> Node | None:
    """The key node of ``key`` in a mapping node (to point at the key rather than its value)."""
    if isinstance(mapping, MappingNode):
        for key_node, _ in mapping.value:
            if str(key_node.value) == key:
                return key_node  # type: ignore[no-any-return]
    return None


def _no_tasks(node: Node | None) -> bool:
    """No tasks section, an empty one, or ``[]``."""
    return node is None or is_null(node) or (isinstance(node, SequenceNode) and not node.value)


def _string_list(node: Node, path: str, problems: Problems) -> tuple[str, ...] | None:
    """One string or a list of strings."""
    if not isinstance(node, SequenceNode):
        text = string(node, path, problems)
        return None if text is None else (text,)
    values = [
        string(item, item_path, problems)
        for item_path, item in sequence_items(node, path, problems)
    ]
    return None if any(value is None for value in values) else tuple(v for v in values if v)


def _read_discovery(node: Node, problems: Problems) -> DiscoveryConfig | None:
    """Read the discovery section; an empty one discovers every task of the project."""
    if is_null(node):
        return DiscoveryConfig()
    items = mapping_items(
        node, "discovery", _SECTION_KEYS["discovery"], problems, elsewhere=_elsewhere("discovery")
    )
    if items is None:
        return None
    before = len(problems.items)
    values = DiscoveryConfig()
    if "interval" in items:
        interval = _duration(items["interval"], "discovery.interval", problems)
        if interval is not None:
            values = replace(values, interval=interval)
    if "name_regex" in items:
        pattern = string(items["name_regex"], "discovery.name_regex", problems)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.add(
                    "discovery.name_regex", items["name_regex"], f"not a regular expression: {exc}"
                )
            else:
                values = replace(values, name_regex=pattern)
    if "status" in items:
        statuses = _string_list(items["status"], "discovery.status", problems)
        if statuses is not None:
            values = replace(values, statuses=statuses)
    if "migration_type" in items:
        types = _string_list(items["migration_type"], "discovery.migration_type", problems)
        if types is not None:
            values = replace(values, migration_types=types)
    return values if len(problems.items) == before else None


def _required(node: Node | None, parent: Node, path: str, problems: Problems) -> Node | None:
    """Return a node that must be present and non-null, reporting it otherwise."""
    if is_null(node):
        problems.add(path, node if node is not None else parent, "is required")
        return None
    return node


def _optional_string(node: Node | None, path: str, problems: Problems) -> str | None:
    """Read an optional string value; absent or null gives None."""
    if node is None or is_null(node):
        return None
    return string(node, path, problems)


def _required_string(
    items: dict[str, Node], key: str, parent: Node, path: str, problems: Problems
) -> str | None:
    """Read a string that must be present, non-null and non-empty."""
    node = _required(items.get(key), parent, path, problems)
    if node is None:
        return None
    text = string(node, path, problems)
    if text is not None and not text.strip():
        problems.add(path, node, "is empty")
        return None
    return text


def _url(node: Node | None, path: str, problems: Problems) -> str | None:
    """Read an optional http(s) base URL without a trailing slash."""
    text = _optional_string(node, path, problems)
    if text is None:
        return None
    if re.match(r"^https?://[^/\s]*@", text):
        problems.add(path, node, "must not contain a user name or password; put them under auth")
        return None
    if not _URL.fullmatch(text) or not _host_and_port_valid(text):
        problems.add(
            path,
            node,
            f"must be an http(s) URL such as https://dcs.example.com, not {shorten(text)!r}",
        )
        return None
    return text.rstrip("/")


def _host_and_port_valid(url: str) -> bool:
    """The host and port parse (an IPv6 host needs both brackets; a port fits in 16 bits)."""
    try:
        parts = urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        return False


def _read_cloud(node: Node | None, root: Node, problems: Problems) -> CloudConfig | None:
    """Read the cloud section and fill in the region's default endpoints."""
    node = _required(node, root, "cloud", problems)
    if node is None:
        return None
    items = mapping_items(
        node, "cloud", _SECTION_KEYS["cloud"], problems, elsewhere=_elsewhere("cloud")
    )
    if items is None:
        return None
    region_node = items.get("region")
    region = _required_string(items, "region", node, "cloud.region", problems)
    project_id = _optional_string(items.get("project_id"), "cloud.project_id", problems)
    if project_id is not None and not is_project_id(project_id):
        problems.add("cloud.project_id", items.get("project_id"), "must be 32 hex digits")
    project_name = _optional_string(items.get("project_name"), "cloud.project_name", problems)
    dcs = _url(items.get("dcs_endpoint"), "cloud.dcs_endpoint", problems)
    iam = _url(items.get("iam_endpoint"), "cloud.iam_endpoint", problems)
    # Catch the two path mistakes that otherwise only show as 404s at run time.
    if dcs is not None and re.search(r"/v\d+\Z", dcs):
        problems.add(
            "cloud.dcs_endpoint",
            items.get("dcs_endpoint"),
            "must be the base URL without the API version (the exporter adds /v2/...)",
        )
        dcs = None
    if iam is not None and not iam.endswith("/v3"):
        problems.add(
            "cloud.iam_endpoint",
            items.get("iam_endpoint"),
            "must end with /v3, e.g. https://iam.eu-de.otc.t-systems.com/v3",
        )
        iam = None
    if region is None:
        return None
    defaults = default_endpoints(region)
    if defaults is None:
        missing = [f"cloud.{key}" for key in ("dcs_endpoint", "iam_endpoint") if key not in items]
        if missing:
            close = difflib.get_close_matches(region.lower(), known_regions(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.add(
                "cloud.region",
                region_node,
                f"unknown region {region!r}: {hint}set {' and '.join(missing)}, "
                f"or use one of {', '.join(known_regions())}",
            )
        if dcs is None or iam is None:
            return None
    return CloudConfig(
        region=region,
        dcs_endpoint=dcs or (defaults.dcs if defaults else ""),
        iam_endpoint=iam or (defaults.iam if defaults else ""),
        project_id=project_id,
        project_name=project_name,
    )


def _secret(
    items: dict[str, Node], key: str, parent: Node, path: str, problems: Problems
) -> Secret | None:
    """Read ``key`` or ``key_file`` (exactly one); a file must exist and be readable now.

    The value itself never appears in a problem.
    """
    inline, file_node = items.get(key), items.get(f"{key}_file")
    if inline is not None and file_node is not None:
        problems.add(f"{path}.{key}", inline, f"give either {key} or {key}_file, not both")
        return None
    if inline is None and file_node is None:
        problems.add(f"{path}.{key}", parent, f"is required (or {key}_file)")
        return None
    if file_node is not None:
        file_path = f"{path}.{key}_file"
        file_name = _required_string(items, f"{key}_file", parent, file_path, problems)
        if file_name is None:
            return None
        try:
            content = Path(file_name).read_text(encoding="utf-8")
        except OSError as exc:
            problems.add(file_path, file_node, f"cannot read {file_name}: {exc.strerror}")
            return None
        except UnicodeDecodeError:
            problems.add(file_path, file_node, f"file {file_name} is not UTF-8 text")
            return None
        if not content.strip():
            problems.add(file_path, file_node, f"file {file_name} is empty")
            return None
        return Secret(file=file_name)
    assert inline is not None
    if is_null(inline):
        problems.add(f"{path}.{key}", inline, f"is empty (null); give a value or {key}_file")
        return None
    value = string(inline, f"{path}.{key}", problems, secret=True)
    if value is None:
        return None
    if not value.strip():
        problems.add(f"{path}.{key}", inline, "is empty")
        return None
    return Secret(value=value)


def _read_auth(node: Node | None, root: Node, problems: Problems) -> Auth | None:
    """Read either AK/SK or IAM password credentials, refusing keys of the other method."""
    node = _required(node, root, "auth", problems)
    if node is None:
        return None
    items = mapping_items(
        node, "auth", _SECTION_KEYS["auth"], problems, elsewhere=_elsewhere("auth"), secret=True
    )
    if items is None:
        return None
    aksk, password = "access_key" in items, "username" in items
    if aksk and password:
        problems.add(
            "auth", node, "give either access_key (AK/SK) or username (IAM password), not both"
        )
        return None
    if not aksk and not password:
        problems.add(
            "auth", node, "needs access_key + secret_key, or username + password + domain_name"
        )
        return None
    method, foreign = ("access_key", _PASSWORD_KEYS) if aksk else ("username", _AKSK_KEYS)
    for key, value_node in items.items():
        if key in foreign:
            problems.add(f"auth.{key}", value_node, f"does not go with {method}; remove it")
    if aksk:
        access_key = _required_string(items, "access_key", node, "auth.access_key", problems)
        secret_key = _secret(items, "secret_key", node, "auth", problems)
        token = None
        if "security_token" in items or "security_token_file" in items:
            token = _secret(items, "security_token", node, "auth", problems)
        if access_key is None or secret_key is None:
            return None
        return AkSkAuth(access_key=access_key, secret_key=secret_key, security_token=token)
    username = _required_string(items, "username", node, "auth.username", problems)
    secret = _secret(items, "password", node, "auth", problems)
    domain = _required_string(items, "domain_name", node, "auth.domain_name", problems)
    if username is None or secret is None or domain is None:
        return None
    return PasswordAuth(username=username, password=secret, domain_name=domain)


def _duration(node: Node, path: str, problems: Problems) -> float | None:
    """Read a positive duration: ``30s``, ``1m30s``, ``500ms``, or a bare number of seconds."""
    value = scalar(node, path, problems)
    seconds: float | None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value)
    else:
        seconds = None
    if seconds is None or math.isnan(seconds):
        if value is not None:
            problems.add(
                path, node, f"must be a duration like 30s, 1m or 1h30m, not {describe(node)}"
            )
        return None
    if seconds <= 0 or math.isinf(seconds):
        problems.add(path, node, f"must be greater than 0, not {shorten(str(node.value))}")
        return None
    if not MIN_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
        # Below 100 ms the scheduler would spin; beyond a week a typo is more likely than intent.
        problems.add(path, node, "must be between 100ms and 7d")
        return None
    return seconds


def _positive_number(node: Node, path: str, problems: Problems, *, integer: bool) -> float | None:
    """Read a positive number (an int where ``integer``)."""
    value = scalar(node, path, problems)
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or math.isnan(value):
        kind = "a whole number" if integer else "a number"
        problems.add(path, node, f"must be {kind}, not {describe(node)}")
        return None
    if value <= 0 or math.isinf(value):
        problems.add(path, node, f"must be greater than 0, not {value}")
        return None
    return float(value)


def _read_polling(node: Node | None, problems: Problems) -> PollingConfig | None:
    """Read the polling section; every key is optional."""
    defaults = PollingConfig()
    if node is None or is_null(node):
        return defaults
    durations = ("interval", "timeout", "details_interval", "token_refresh_margin")
    numbers = {"concurrency": True, "stale_intervals": True, "max_requests_per_second": False}
    items = mapping_items(
        node, "polling", _SECTION_KEYS["polling"], problems, elsewhere=_elsewhere("polling")
    )
    if items is None:
        return None
    values: dict[str, float | int] = {}
    before = len(problems.items)
    for key, value_node in items.items():
        path = f"polling.{key}"
        if key in durations:
            seconds = _duration(value_node, path, problems)
            if seconds is not None:
                values[key] = seconds
        elif key in numbers:
            number = _positive_number(value_node, path, problems, integer=numbers[key])
            if number is not None:
                values[key] = int(number) if numbers[key] else number
    if len(problems.items) > before:
        return None
    return PollingConfig(**values)  # type: ignore[arg-type]


def _read_tasks(
    node: Node | None,
    root: Node,
    problems: Problems,
    taken: dict[str, tuple[str, int]] | None = None,
    where: str = "tasks",
) -> tuple[TaskConfig, ...] | None:
    """Read the non-empty task list; IDs must be unique quoted strings.

    A repeated ID is an error rather than collapsed: the two entries may carry different names,
    and silently keeping one would hide a copy-paste mistake (often a task that was meant to be
    added is missing). IDs are compared ignoring case, as UUIDs are. ``taken`` holds the IDs of
    earlier targets (their list's path and the line, by lowercase ID); this list's IDs, at
    ``where``, are added to it.
    """
    empty_message = "must be a non-empty list of tasks (each with an id)"
    if node is None or is_null(node):
        problems.add("tasks", node or root, empty_message)
        return None
    tasks: list[TaskConfig] = []
    first_seen: dict[str, int] = {}
    only_empty_items = True
    for path, item in sequence_items(node, "tasks", problems):
        if is_null(item):
            problems.add(path, item, "is empty; each task needs an id")
            continue
        only_empty_items = False
        items = mapping_items(
            item, path, _SECTION_KEYS["tasks[]"], problems, elsewhere=_elsewhere("tasks[]")
        )
        if items is None:
            continue
        task_id = _required_string(items, "id", item, f"{path}.id", problems)
        id_node = items.get("id")
        name = _optional_string(items.get("name"), f"{path}.name", problems)
        if task_id is None or id_node is None:
            continue
        if not is_task_id(task_id):
            problems.add(f"{path}.id", id_node, f"{shorten(task_id)!r} is not a task ID")
            continue
        line = id_node.start_mark.line + 1
        key = task_id.lower()
        if key in first_seen:
            problems.add(
                f"{path}.id",
                id_node,
                f"duplicate task ID {task_id!r} (first on line {first_seen[key]}); "
                "list each task once",
            )
            continue
        if taken is not None and key in taken:
            other_path, other_line = taken[key]
            problems.add(
                f"{path}.id",
                id_node,
                f"duplicate task ID {task_id!r}, also under {other_path} (line {other_line}); "
                "a task belongs to one target",
            )
            continue
        first_seen[key] = line
        tasks.append(TaskConfig(id=task_id, name=name))
    if isinstance(node, SequenceNode) and only_empty_items:
        problems.add("tasks", node, empty_message)
    if taken is not None:
        taken.update((key, (where, line)) for key, line in first_seen.items())
    return tuple(tasks)
