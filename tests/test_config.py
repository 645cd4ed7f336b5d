"""Config loading: values, defaults, and problems that name file, line, column and key."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from exporter.config import (
    AkSkAuth,
    ConfigError,
    PasswordAuth,
    is_task_id,
    load_config,
    parse_config,
    parse_duration,
)
from tests.support import TASK_A, TASK_B

PROJECT = "0123456789abcdef0123456789abcdef"
CLOUD = f'cloud:\n  region: eu-de\n  project_id: "{PROJECT}"\n'
AKSK = "auth:\n  access_key: AKTEST\n  secret_key: sk-inline-value\n"
TASKS = f'tasks:\n  - id: "{TASK_A}"\n'
RENDERED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>[^:]+): (?P<msg>.+)$")


def config(*parts: str) -> str:
    """Join YAML fragments (each ending in a newline) into one document."""
    return "".join(textwrap.dedent(part) for part in parts)


def problems_of(text: str, filename: str = "c.yaml") -> list[str]:
    """The rendered problem lines of a config that must be refused."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, filename)
    lines = str(caught.value).splitlines()
    assert lines, "a ConfigError must never be empty"
    assert len(lines) == len(caught.value.problems)
    return lines


def located(line: str) -> tuple[int, int, str, str]:
    """Split a rendered problem into (line, column, key path, message), asserting its shape."""
    match = RENDERED.match(line)
    assert match, f"not file:line:col: key: message -> {line!r}"
    return int(match["line"]), int(match["col"]), match["path"], match["msg"]


# ---- a valid file ---------------------------------------------------------------------------


def test_minimal_config_fills_region_defaults() -> None:
    """A minimal eu-de config gets the region's DCS and IAM endpoints and the polling defaults."""
    parsed = parse_config(config(CLOUD, AKSK, TASKS))
    assert parsed.cloud.dcs_endpoint == "https://dcs.eu-de.otc.t-systems.com"
    assert parsed.cloud.iam_endpoint == "https://iam.eu-de.otc.t-systems.com/v3"
    assert parsed.cloud.project_id == PROJECT
    assert parsed.polling.interval == 30.0
    assert parsed.polling.timeout == 10.0
    assert parsed.tasks[0].id == TASK_A
    assert isinstance(parsed.auth, AkSkAuth)
    assert parsed.auth.secret_key.read() == "sk-inline-value"


@pytest.mark.parametrize(
    ("region", "dcs", "iam"),
    [
        ("eu-nl", "https://dcs.eu-nl.otc.t-systems.com", "https://iam.eu-nl.otc.t-systems.com/v3"),
        (
            "eu-ch2",
            "https://dcs.eu-ch2.sc.otc.t-systems.com",
            "https://iam-pub.eu-ch2.sc.otc.t-systems.com/v3",
        ),
        (
            "ap-southeast-1",
            "https://dcs.ap-southeast-1.myhuaweicloud.com",
            "https://iam.ap-southeast-1.myhuaweicloud.com/v3",
        ),
    ],
)
def test_region_defaults(region: str, dcs: str, iam: str) -> None:
    """Each known region (OTC and Huawei Cloud) has its own default endpoints."""
    parsed = parse_config(config(f"cloud:\n  region: {region}\n", AKSK, TASKS))
    assert (parsed.cloud.dcs_endpoint, parsed.cloud.iam_endpoint) == (dcs, iam)


def test_endpoint_overrides_and_trailing_slash() -> None:
    """Configured endpoints win over the region's and lose a trailing slash."""
    text = config(
        "cloud:\n  region: eu-de\n  dcs_endpoint: https://dcs.example.test/\n"
        "  iam_endpoint: https://iam.example.test/v3/\n",
        AKSK,
        TASKS,
    )
    parsed = parse_config(text)
    assert parsed.cloud.dcs_endpoint == "https://dcs.example.test"
    assert parsed.cloud.iam_endpoint == "https://iam.example.test/v3"


def test_unknown_region_without_endpoints_is_refused_with_suggestion() -> None:
    """An unknown region needs both endpoints; the error names the missing keys and a near match."""
    (line,) = problems_of(config("cloud:\n  region: EU-DE\n", AKSK, TASKS))
    number, column, path, message = located(line)
    assert (number, column, path) == (2, 11, "cloud.region")
    assert "unknown region 'EU-DE'" in message
    assert "did you mean 'eu-de'?" in message
    assert "cloud.dcs_endpoint and cloud.iam_endpoint" in message


def test_unknown_region_with_one_endpoint_names_the_other() -> None:
    """With only the DCS endpoint given, the problem asks for the IAM endpoint alone."""
    text = config("cloud:\n  region: mars-1\n  dcs_endpoint: https://dcs.mars.test\n", AKSK, TASKS)
    (line,) = problems_of(text)
    message = located(line)[3]
    assert "set cloud.iam_endpoint," in message
    assert "cloud.dcs_endpoint" not in message


def test_unknown_region_with_both_endpoints_is_fine() -> None:
    """A private or new region works when both endpoints are configured."""
    text = config(
        "cloud:\n  region: mars-1\n  dcs_endpoint: http://127.0.0.1:8080\n"
        "  iam_endpoint: http://127.0.0.1:8080/v3\n",
        AKSK,
        TASKS,
    )
    assert parse_config(text).cloud.dcs_endpoint == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("dcs.example.test", "must be an http(s) URL"),
        ("https://dcs.example.test/x?y=1", "must be an http(s) URL"),
        ("https://dcs.example .test", "must be an http(s) URL"),
        ("https://user:pw-in-url@dcs.example.test", "must not contain a user name or password"),
    ],
)
def test_bad_endpoint(endpoint: str, expected: str) -> None:
    """Endpoints must be plain http(s) URLs; credentials in one are refused without echoing them."""
    text = config(f'cloud:\n  region: eu-de\n  dcs_endpoint: "{endpoint}"\n', AKSK, TASKS)
    (line,) = problems_of(text)
    number, _, path, message = located(line)
    assert (number, path) == (3, "cloud.dcs_endpoint")
    assert expected in message
    assert "pw-in-url" not in message


# ---- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("2d", 172800.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Go-style durations are read into seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "30 s", "30S", "1m30", "s", "-5s", "1.5.5s", "10x"])
def test_parse_duration_refuses(text: str) -> None:
    """Anything that is not number+unit pairs is not a duration."""
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ('"30s"', 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("45", 45.0), ("2.5", 2.5)],
)
def test_polling_durations(value: str, seconds: float) -> None:
    """interval accepts a duration, quoted or not, or a bare number of seconds."""
    text = config(CLOUD, AKSK, f"polling:\n  interval: {value}\n", TASKS)
    assert parse_config(text).polling.interval == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "must be greater than 0, not 0"),
        ("-5", "must be greater than 0, not -5"),
        ('"30"', "must be a duration like 30s"),
        ("yes", "must be a duration like 30s"),
        ("[30]", "must be a single value"),
        (".inf", "must be greater than 0"),
    ],
)
def test_polling_bad_interval(value: str, expected: str) -> None:
    """A zero, negative or unreadable interval is refused at its line, never cast silently."""
    text = config(CLOUD, AKSK, f"polling:\n  interval: {value}\n", TASKS)
    (line,) = problems_of(text)
    number, column, path, message = located(line)
    assert (number, column, path) == (8, 13, "polling.interval")
    assert expected in message


def test_polling_numbers() -> None:
    """Whole-number settings refuse fractions; the rate ceiling may be fractional."""
    text = config(
        CLOUD,
        AKSK,
        "polling:\n  concurrency: 2.5\n  max_requests_per_second: 0.5\n  stale_intervals: 0\n",
        TASKS,
    )
    lines = [located(line) for line in problems_of(text)]
    assert [(path, message) for _, _, path, message in lines] == [
        ("polling.concurrency", "must be a whole number, not float '2.5'"),
        ("polling.stale_intervals", "must be greater than 0, not 0"),
    ]


# ---- IDs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0123", "12345", "1e5x"])
def test_unquoted_numeric_like_task_id(value: str) -> None:
    """An unquoted number as task ID is refused (YAML would read 0123 as 83), a string is fine."""
    text = config(CLOUD, AKSK, f"tasks:\n  - id: {value}\n")
    if value == "1e5x":  # not a number to YAML: a plain string
        assert parse_config(text).tasks[0].id == "1e5x"
        return
    (line,) = problems_of(text)
    number, column, path, message = located(line)
    assert (number, column, path) == (8, 9, "tasks[0].id")
    assert "put it in quotes" in message


def test_unquoted_numeric_project_id() -> None:
    """A project ID of digits only must be quoted too, or it would become an int."""
    text = config("cloud:\n  region: eu-de\n  project_id: 12345678901234567890123456789012\n")
    (line,) = problems_of(text + AKSK + TASKS)
    assert located(line) == (
        3,
        15,
        "cloud.project_id",
        "must be a string, not int '12345678901234567890123456789012'; put it in quotes",
    )


def test_bad_project_id() -> None:
    """A project ID must be 32 hex digits."""
    (line,) = problems_of(config('cloud:\n  region: eu-de\n  project_id: "abc"\n', AKSK, TASKS))
    assert located(line)[2:] == ("cloud.project_id", "must be 32 hex digits")


def test_task_id_with_path_characters_is_refused() -> None:
    """A task ID cannot carry slashes or spaces that would change the request path."""
    (line,) = problems_of(config(CLOUD, AKSK, 'tasks:\n  - id: "../x y"\n'))
    assert located(line)[2:] == ("tasks[0].id", "'../x y' is not a task ID")


def test_task_id_with_a_trailing_newline_is_refused_not_taken_for_its_twin() -> None:
    """An ID with a final newline is refused at its own line, not accepted beside the same ID."""
    (line,) = problems_of(config(CLOUD, AKSK, 'tasks:\n  - id: "ok-xN1\\n"\n  - id: "ok-xN1"\n'))
    assert located(line) == (8, 9, "tasks[0].id", "'ok-xN1\\n' is not a task ID")


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("ok-xN1", True),
        ("12345", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("ok-xN1\n", False),
        ("\nok-xN1", False),
        ("ok-xN1\n\n", False),
        ("", False),
        ("-ok", False),
        (12345, False),
        ({"a": 1}, False),
        (None, False),
    ],
)
def test_is_task_id_checks_the_whole_value(value: object, valid: bool) -> None:
    """is_task_id accepts only a whole string of ID characters: no final newline, no non-string."""
    assert is_task_id(value) is valid


@pytest.mark.parametrize(
    ("cloud", "line", "path", "message"),
    [
        (f'  project_id: "{PROJECT}\\n"\n', 3, "cloud.project_id", "must be 32 hex digits"),
        ('  dcs_endpoint: "https://d.test\\n"\n', 3, "cloud.dcs_endpoint", "an http(s) URL"),
        ('  dcs_endpoint: "https://d.test/v2\\n"\n', 3, "cloud.dcs_endpoint", "an http(s) URL"),
        ('  region: "eu-de\\n"\n', 2, "cloud.region", "unknown region 'eu-de\\n'"),
    ],
)
def test_other_whole_values_refuse_a_trailing_newline(
    cloud: str, line: int, path: str, message: str
) -> None:
    """A project ID, endpoint or region with a final newline is refused, naming key and line."""
    region = "" if "region" in cloud else "  region: eu-de\n"
    (problem,) = problems_of(config("cloud:\n" + region + cloud, AKSK, TASKS))
    number, _, where, text = located(problem)
    assert (number, where) == (line, path)
    assert message in text


# ---- secrets --------------------------------------------------------------------------------


def test_env_var_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} takes the value from the environment, also inside a longer string."""
    monkeypatch.setenv("DCS_AK", "AK-FROM-ENV")
    monkeypatch.setenv("DCS_SK", "sk-from-env")
    text = config(
        CLOUD, "auth:\n  access_key: ${DCS_AK}\n  secret_key: pre-${DCS_SK}-post\n", TASKS
    )
    auth = parse_config(text).auth
    assert isinstance(auth, AkSkAuth)
    assert auth.access_key == "AK-FROM-ENV"
    assert auth.secret_key.read() == "pre-sk-from-env-post"


def test_missing_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset ${VAR} is an error naming the variable and the key."""
    monkeypatch.delenv("DCS_SK_UNSET", raising=False)
    text = config(CLOUD, "auth:\n  access_key: AK\n  secret_key: ${DCS_SK_UNSET}\n", TASKS)
    (line,) = problems_of(text)
    number, column, path, message = located(line)
    assert (number, column, path) == (6, 15, "auth.secret_key")
    assert message == "environment variable DCS_SK_UNSET is not set"


def test_secret_file_is_read_on_every_use(tmp_path: Path) -> None:
    """secret_key_file is read when used, so a rotated secret needs no restart."""
    secret = tmp_path / "sk"
    secret.write_text("first-secret\n", encoding="utf-8")
    text = config(CLOUD, f"auth:\n  access_key: AK\n  secret_key_file: {secret}\n", TASKS)
    auth = parse_config(text).auth
    assert isinstance(auth, AkSkAuth)
    assert auth.secret_key.read() == "first-secret"
    secret.write_text("rotated-secret", encoding="utf-8")
    assert auth.secret_key.read() == "rotated-secret"
    assert "rotated-secret" not in repr(auth)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read"), (b"  \n", "is empty"), (b"\xff\xfe", "is not UTF-8 text")],
)
def test_bad_secret_file(tmp_path: Path, content: bytes | None, expected: str) -> None:
    """A secret file that is missing, empty or not text is refused at load time."""
    secret = tmp_path / "sk"
    if content is not None:
        secret.write_bytes(content)
    text = config(CLOUD, f"auth:\n  access_key: AK\n  secret_key_file: {secret}\n", TASKS)
    (line,) = problems_of(text)
    number, _, path, message = located(line)
    assert (number, path) == (6, "auth.secret_key_file")
    assert expected in message


def test_password_auth_with_password_file(tmp_path: Path) -> None:
    """username + password_file + domain_name gives IAM password auth."""
    password = tmp_path / "pw"
    password.write_text("hunter2-pw", encoding="utf-8")
    text = config(
        CLOUD,
        f"auth:\n  username: bob\n  password_file: {password}\n  domain_name: acme\n",
        TASKS,
    )
    auth = parse_config(text).auth
    assert isinstance(auth, PasswordAuth)
    assert (auth.username, auth.domain_name, auth.password.read()) == ("bob", "acme", "hunter2-pw")


@pytest.mark.parametrize(
    ("auth", "path", "expected"),
    [
        ("  access_key: AK\n  secret_key:\n", "auth.secret_key", "is empty (null)"),
        ('  access_key: AK\n  secret_key: ""\n', "auth.secret_key", "is empty"),
        ("  access_key: AK\n", "auth.secret_key", "is required (or secret_key_file)"),
        ("  access_key:\n  secret_key: sk\n", "auth.access_key", "is required"),
        (
            "  username: bob\n  password:\n  domain_name: d\n",
            "auth.password",
            "is empty (null)",
        ),
        ("  username:\n  password: pw\n  domain_name: d\n", "auth.username", "is required"),
        ("  username: bob\n  password: pw\n", "auth.domain_name", "is required"),
        (
            "  access_key: AK\n  secret_key: sk\n  secret_key_file: /x\n",
            "auth.secret_key",
            "give either secret_key or secret_key_file, not both",
        ),
        (
            "  access_key: AK\n  secret_key: sk\n  password: pw\n",
            "auth.password",
            "does not go with access_key; remove it",
        ),
        (
            "  access_key: AK\n  secret_key: sk\n  username: bob\n",
            "auth",
            "give either access_key (AK/SK) or username (IAM password), not both",
        ),
        ("  secret_key: sk\n", "auth", "needs access_key + secret_key, or username"),
    ],
)
def test_auth_problems(auth: str, path: str, expected: str) -> None:
    """Every incomplete or mixed auth section is refused with the key that is wrong."""
    lines = problems_of(config(CLOUD, "auth:\n" + auth, TASKS))
    assert any(located(line)[2] == path and expected in located(line)[3] for line in lines), lines


@pytest.mark.parametrize("key", ["secret_key", "password"])
def test_secret_never_in_problem(key: str) -> None:
    """A secret written with the wrong type is refused without repeating its value."""
    first = "  access_key: AK\n" if key == "secret_key" else "  username: u\n  domain_name: d\n"
    text = config(CLOUD, f"auth:\n{first}  {key}: 918273645\n", TASKS)
    lines = problems_of(text)
    assert any(f"auth.{key}" in line and "put it in quotes" in line for line in lines)
    assert all("918273645" not in line for line in lines)


# ---- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_did_you_mean() -> None:
    """A typo of a key in the same section is answered with the key that was meant."""
    text = config(CLOUD, AKSK, "polling:\n  intervall: 30s\n", TASKS)
    (line,) = problems_of(text)
    assert located(line) == (8, 3, "polling.intervall", "unknown key (did you mean 'interval'?)")


def test_key_in_wrong_section() -> None:
    """A key written in the wrong section is answered with the section it belongs to."""
    text = config(CLOUD, AKSK, "interval: 30s\n", TASKS)
    (line,) = problems_of(text)
    assert located(line) == (7, 1, "interval", "unknown key (it belongs under polling)")


def test_unknown_key_without_match_lists_allowed() -> None:
    """A key like nothing known lists what is allowed there."""
    text = config("cloud:\n  region: eu-de\n  flavour: x\n", AKSK, TASKS)
    (line,) = problems_of(text)
    assert located(line)[2:] == (
        "cloud.flavour",
        "unknown key (allowed: dcs_endpoint, iam_endpoint, project_id, project_name, region)",
    )


def test_repeated_key() -> None:
    """A key given twice is an error at the second one (YAML would keep only the last)."""
    text = config(CLOUD, AKSK, "polling:\n  interval: 30s\n  interval: 60s\n", TASKS)
    (line,) = problems_of(text)
    assert located(line) == (9, 3, "polling.interval", "key appears twice")


# ---- every problem at once ------------------------------------------------------------------


def test_check_lists_every_problem_in_file_order() -> None:
    """Like --config.check, one load reports every problem, each as file:line:col: key: message."""
    text = config(
        "cloud:\n  region: eu-de\n  project_id: 42\n",
        "auth:\n  access_key: AK\n",
        "polling:\n  interval: 0\n  timout: 5\n",
        f'tasks:\n  - id: "{TASK_A}"\n  - id: "{TASK_A}"\n  - {{}}\n',
    )
    lines = problems_of(text, "/etc/dcs/config.yaml")
    parsed = [located(line) for line in lines]
    assert all(line.startswith("/etc/dcs/config.yaml:") for line in lines)
    assert [(number, path) for number, _, path, _ in parsed] == [
        (3, "cloud.project_id"),
        (5, "auth.secret_key"),
        (7, "polling.interval"),
        (8, "polling.timout"),
        (11, "tasks[1].id"),
        (12, "tasks[2].id"),
    ]
    assert parsed == sorted(parsed, key=lambda item: (item[0], item[1]))


def test_load_config_from_file(tmp_path: Path) -> None:
    """load_config reads a file and names it in problems."""
    path = tmp_path / "config.yaml"
    path.write_text(config(CLOUD, AKSK, "tasks: []\n"), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (
        f"{path}:7:8: tasks: must be a non-empty list of tasks (each with an id)"
    )


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is one problem naming the file."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_load_config_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused at the first bad byte, not with a traceback."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"cloud:\n  region: eu-\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}:2:14: not UTF-8 text; save the file as UTF-8"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (Windows editors) does not break the file."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + config(CLOUD, AKSK, TASKS).encode())
    assert load_config(str(path)).tasks[0].id == TASK_A


# ---- CASES.md -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [('tasks:\n\t- id: "TASK_A"\n', 2, 1), ('tasks:\n  - id: "TASK_A"\t# main\n', 2, 17)],
)
def test_c22_tab_characters(tmp_path: Path, text: str, line: int, column: int) -> None:
    """C22: a tab gives one error naming file, line and column and saying 'tab', no traceback."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (
        f"{path}:{line}:{column}: invalid YAML: tab character; "
        "YAML allows only spaces for indentation and before comments"
    )


@pytest.mark.parametrize(
    ("tasks", "expected"),
    [
        ("", ["1:1: cloud: is required", "1:1: auth: is required", "1:1: tasks: must be"]),
        ("tasks:\n", ["tasks: must be a non-empty list of tasks (each with an id)"]),
        ("tasks: []\n", ["tasks: must be a non-empty list of tasks (each with an id)"]),
        ("tasks:\n  -\n", ["tasks: must be a non-empty list", "tasks[0]: is empty"]),
    ],
    ids=["a-empty-file", "b-null-section", "c-empty-list", "d-null-item"],
)
def test_c24_empty_file_null_section_empty_list(tasks: str, expected: list[str]) -> None:
    """C24: (a)-(d) are all the same clear error, "tasks must be a non-empty list", no TypeError.

    (c) `tasks: []` is refused like the others rather than started with only self-metrics: an
    exporter that watches nothing is almost always a mistake in the file, and failing loudly
    before listening is what the other three cases do.
    """
    text = "" if not tasks else config(CLOUD, AKSK, tasks)
    lines = problems_of(text)
    for fragment in expected:
        assert any(fragment in line for line in lines), (fragment, lines)
    assert all(RENDERED.match(line) for line in lines)


def test_c25_duplicate_ids_bad_interval_unknown_keys() -> None:
    """C25: interval 0, the typo `timout` and the duplicate TASK_A are all reported at their lines.

    Duplicate IDs are refused rather than collapsed with a WARN (DESIGN.md): both entries may
    carry different names, and keeping one silently would hide the copy-paste mistake that
    usually means another task was meant; with nothing collapsed there is exactly one series per
    (metric, task_id) by construction.
    """
    text = config(
        CLOUD,
        AKSK,
        "polling:\n  interval: 0\n  timout: 5\n",
        f'tasks:\n  - id: "{TASK_A}"\n  - id: "{TASK_A}"\n  - id: "{TASK_B}"\n',
    )
    parsed = [located(line) for line in problems_of(text)]
    assert parsed == [
        (8, 13, "polling.interval", "must be greater than 0, not 0"),
        (9, 3, "polling.timout", "unknown key (did you mean 'timeout'?)"),
        (
            12,
            9,
            "tasks[1].id",
            f"duplicate task ID '{TASK_A}' (first on line 11); list each task once",
        ),
    ]


def test_c25_top_level_interval_and_typo() -> None:
    """C25 as written in CASES.md (keys at the top level): each key is named with where it goes."""
    text = config(CLOUD, AKSK, "interval: 0\ntimout: 5\n", TASKS)
    parsed = [located(line)[2:] for line in problems_of(text)]
    assert parsed == [
        ("interval", "unknown key (it belongs under polling)"),
        ("timout", "unknown key (did you mean 'timeout' under polling?)"),
    ]


def test_c25_duplicate_differing_only_in_case() -> None:
    """C25: a task ID repeated in another case is the same UUID and also a duplicate."""
    text = config(CLOUD, AKSK, f'tasks:\n  - id: "{TASK_A}"\n  - id: "{TASK_A.upper()}"\n')
    (line,) = problems_of(text)
    assert located(line)[2] == "tasks[1].id"
    assert "duplicate task ID" in line


@pytest.mark.parametrize(("value", "seconds"), [('"30s"', 30.0), ("30s", 30.0)])
def test_c25_interval_30s_variants(value: str, seconds: float) -> None:
    """C25: `interval: "30s"` and `interval: 30s` are parsed explicitly as 30 seconds."""
    text = config(CLOUD, AKSK, f"polling:\n  interval: {value}\n", TASKS)
    assert parse_config(text).polling.interval == seconds


def test_c25_interval_negative() -> None:
    """C25: `interval: -5` is refused at its line."""
    text = config(CLOUD, AKSK, "polling:\n  interval: -5\n", TASKS)
    (line,) = problems_of(text)
    assert located(line) == (8, 13, "polling.interval", "must be greater than 0, not -5")


# ---- mistakes a first-time user made --------------------------------------------------------


def test_unclosed_env_reference_is_an_error_and_double_dollar_is_literal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`${NAME` without its brace is refused (it would reach the cloud as a literal key); `$${` means `${`."""
    monkeypatch.setenv("DCS_AK", "AKFROMENV")
    broken = "auth:\n  access_key: ${DCS_AK\n  secret_key: s\n"
    [line] = problems_of(config(CLOUD, broken, TASKS))
    assert located(line)[2:] == (
        "auth.access_key",
        "has a ${ that is not a ${NAME} reference; write $${ for a literal ${",
    )
    literal = "auth:\n  access_key: ${DCS_AK}\n  secret_key: pa$${x}ss\n"
    parsed = parse_config(config(CLOUD, literal, TASKS))
    assert isinstance(parsed.auth, AkSkAuth)
    assert parsed.auth.access_key == "AKFROMENV"
    assert parsed.auth.secret_key.read() == "pa${x}ss"


def test_long_values_are_shortened_in_problems() -> None:
    """A runaway value is cut to a readable length instead of being printed whole."""
    text = config(CLOUD, AKSK, f"polling:\n  interval: {'x' * 5000}\n", TASKS)
    [line] = problems_of(text)
    assert len(line) < 200
    assert "..." in line


def test_auth_written_as_a_string_is_not_echoed() -> None:
    """`auth: AK SECRET` is refused without repeating the secret it contains."""
    [line] = problems_of(config(CLOUD, "auth: AKVALUE SECRETVALUE\n", TASKS))
    assert located(line)[2] == "auth"
    assert "SECRETVALUE" not in line


@pytest.mark.parametrize(
    ("key", "url", "message"),
    [
        ("dcs_endpoint", "https://dcs.example.test/v2", "without the API version"),
        ("iam_endpoint", "https://iam.example.test", "must end with /v3"),
    ],
)
def test_endpoint_paths_are_checked(key: str, url: str, message: str) -> None:
    """Endpoint path mistakes are caught by the check, not as 404s at run time."""
    cloud = f"{CLOUD}  {key}: {url}\n"
    [line] = problems_of(config(cloud, AKSK, TASKS))
    assert located(line)[2] == f"cloud.{key}"
    assert message in line


# ---- several targets ------------------------------------------------------------------------

OTHER_PROJECT = "fedcba9876543210fedcba9876543210"
TWO_TARGETS = f"""\
polling:
  interval: 15s
targets:
  - name: de
    cloud:
      region: eu-de
      project_id: "{PROJECT}"
    auth:
      access_key: AKDE
      secret_key: sk-de
    tasks:
      - id: "{TASK_A}"
        name: orders
  - name: nl
    cloud:
      region: eu-nl
      project_id: "{OTHER_PROJECT}"
    auth:
      username: monitoring
      password: pw-nl
      domain_name: OTC-EU-NL
    tasks:
      - id: "{TASK_B}"
    discovery:
      status: [MIGRATING]
"""


def test_two_targets_are_read_in_order_with_their_own_sections() -> None:
    """A targets list gives one target per entry, each with its cloud, auth, tasks and discovery,
    and the one polling section."""
    parsed = parse_config(TWO_TARGETS)
    de, nl = parsed.targets
    assert (de.name, de.cloud.project_id, de.cloud.region) == ("de", PROJECT, "eu-de")
    assert isinstance(de.auth, AkSkAuth) and de.auth.access_key == "AKDE"
    assert [(t.id, t.name) for t in de.tasks] == [(TASK_A, "orders")]
    assert de.discovery is None
    assert (nl.name, nl.cloud.project_id) == ("nl", OTHER_PROJECT)
    assert nl.cloud.dcs_endpoint == "https://dcs.eu-nl.otc.t-systems.com"
    assert isinstance(nl.auth, PasswordAuth) and nl.auth.password.read() == "pw-nl"
    assert nl.discovery is not None and nl.discovery.statuses == ("MIGRATING",)
    assert parsed.polling.interval == 15.0
    assert [task.id for task in parsed.all_tasks] == [TASK_A, TASK_B]


def test_top_level_form_is_one_target_named_default() -> None:
    """A file without targets still means exactly one target, built from its top-level sections."""
    parsed = parse_config(config(CLOUD, AKSK, TASKS))
    (only,) = parsed.targets
    assert only.name == "default"
    assert (only.cloud, only.auth, only.tasks) == (parsed.cloud, parsed.auth, parsed.tasks)


def test_top_level_cloud_and_auth_beside_targets_name_both() -> None:
    """Top-level cloud and auth next to targets are refused, each pointing at the line of targets."""
    lines = problems_of(config(CLOUD, AKSK, TWO_TARGETS))
    found = [located(line) for line in lines]
    targets_line = config(CLOUD, AKSK, TWO_TARGETS).splitlines().index("targets:") + 1
    assert [(path, line) for line, _, path, _ in found] == [("cloud", 1), ("auth", 4)]
    for _, _, _, message in found:
        assert f"together with targets (line {targets_line})" in message


def test_duplicate_target_names_are_refused() -> None:
    """Two entries with the same name are refused at the second, naming the first's line."""
    text = TWO_TARGETS.replace("name: nl", "name: de")
    (line,) = problems_of(text)
    number, _, path, message = located(line)
    assert (number, path) == (text.splitlines().index("  - name: de", 5) + 1, "targets[1].name")
    assert "duplicate target name 'de' (first on line 4)" in message


def test_task_id_in_two_targets_is_refused_naming_both_lines() -> None:
    """A task ID under two targets (in any case) is refused at the second, naming the first."""
    text = TWO_TARGETS.replace(f'id: "{TASK_B}"', f'id: "{TASK_A.upper()}"')
    (line,) = problems_of(text)
    number, _, path, message = located(line)
    first = text.splitlines().index(f'      - id: "{TASK_A}"') + 1
    assert (number, path) == (
        text.splitlines().index(f'      - id: "{TASK_A.upper()}"') + 1,
        "targets[1].tasks[0].id",
    )
    assert f"also under targets[0].tasks (line {first})" in message


def test_problems_inside_targets_are_located_under_their_entry() -> None:
    """Problems in an entry carry its path (targets[1].auth.access_key ...) and their own line."""
    text = (
        TWO_TARGETS.replace("username: monitoring", "access_key: 12345")
        .replace("password: pw-nl", "secret_key: x")
        .replace("      domain_name: OTC-EU-NL\n", "")
        .replace("region: eu-nl", "region: eu-nowhere")
        .replace("  - name: de\n", "  - name: de\n    polling: {}\n")
    )
    found = {located(line)[2]: located(line) for line in problems_of(text)}
    assert set(found) == {
        "targets[0].polling",
        "targets[1].cloud.region",
        "targets[1].auth.access_key",
    }
    lines = text.splitlines()
    assert found["targets[1].auth.access_key"][:2] == (
        lines.index("      access_key: 12345") + 1,
        19,
    )
    assert "put it in quotes" in found["targets[1].auth.access_key"][3]
    assert found["targets[1].cloud.region"][0] == lines.index("      region: eu-nowhere") + 1
    assert "shared by all targets" in found["targets[0].polling"][3]


def test_target_entry_needs_name_cloud_auth_and_tasks() -> None:
    """An entry with none of its required keys gets one problem per key, at the entry."""
    text = "targets:\n  - discovery_typo: 1\n"
    paths = sorted(located(line)[2] for line in problems_of(text))
    assert paths == [
        "targets[0].auth",
        "targets[0].cloud",
        "targets[0].discovery_typo",
        "targets[0].name",
        "targets[0].tasks",
    ]


def test_empty_targets_list_is_refused() -> None:
    """targets: [] is refused rather than meaning no project at all."""
    (line,) = problems_of("targets: []\n")
    assert located(line)[2:] == (
        "targets",
        "must be a non-empty list of targets (each with a name)",
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1", "http://:8080"]
)
def test_endpoint_host_and_port_must_parse(url: str) -> None:
    """A port out of range, a port that is not a number or a broken IPv6 host fails the check,
    instead of passing it and crashing the client at start."""
    [line] = problems_of(config(f'{CLOUD}  dcs_endpoint: "{url}"\n', AKSK, TASKS))
    assert located(line)[2] == "cloud.dcs_endpoint"


def test_ipv6_endpoint_with_brackets_is_accepted() -> None:
    """A bracketed IPv6 host with a port is a valid endpoint."""
    parsed = parse_config(config(f'{CLOUD}  dcs_endpoint: "http://[::1]:8080"\n', AKSK, TASKS))
    assert parsed.cloud.dcs_endpoint == "http://[::1]:8080"


@pytest.mark.parametrize("value", ["0.0001", "50ms", "8d", "99999999999999999999d"])
def test_durations_outside_100ms_to_7d_are_refused(value: str) -> None:
    """A sub-100 ms interval would make the scheduler spin; a huge one is a typo."""
    [line] = problems_of(config(CLOUD, AKSK, f"polling:\n  interval: {value}\n", TASKS))
    assert located(line)[2:] == ("polling.interval", "must be between 100ms and 7d")
