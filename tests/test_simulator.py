"""Tests for exporter.simulator: the fake DCS + IAM API, driven over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.auth import sign_request
from exporter.simulator import (
    DEMO_ACCESS_KEY,
    DEMO_DOMAIN,
    DEMO_PASSWORD,
    DEMO_PROJECT_ID,
    DEMO_PROJECT_NAME,
    DEMO_SECRET_KEY,
    DEMO_TASKS,
    DEMO_USER,
    SOURCE_PASSWORD,
    TARGET_PASSWORD,
    CannedResponse,
    MigrationModel,
    Simulator,
    demo_simulator,
    start,
)
from tests.support import BASELINE_BODY, DOC_EXAMPLE_BODY, PROJ, TASK_A, TASK_B

REPO = Path(__file__).resolve().parent.parent
OTHER_PROJECT = PROJ  # not the demo simulator's project
MODEL = MigrationModel(source_keys=10_000, full_phase_seconds=100, ops=300, kbps=12.5, seed=7)


class FakeClock:
    """A settable epoch clock shared by the simulator and the test's signer."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Serve = Callable[[Simulator], Awaitable[str]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners = []

    async def _serve(sim: Simulator) -> str:
        runner, base_url = await start(sim)
        runners.append(runner)
        return base_url

    yield _serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def stats_path(task_id: str, project_id: str = DEMO_PROJECT_ID) -> str:
    return f"/v2/{project_id}/migration-task/{task_id}/stats"


def signed(
    url: str,
    clock: Callable[[], float],
    access_key: str = DEMO_ACCESS_KEY,
    secret_key: str = DEMO_SECRET_KEY,
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Project-Id": DEMO_PROJECT_ID}
    now = datetime.fromtimestamp(clock(), UTC)
    return sign_request("GET", url, headers, b"", access_key, secret_key, now)


async def get_json(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None), response


async def get_signed(
    session: aiohttp.ClientSession, url: str, clock: Callable[[], float]
) -> tuple[int, Any]:
    status, body, _ = await get_json(session, url, signed(url, clock))
    return status, body


def password_auth(
    password: str = DEMO_PASSWORD, project: dict[str, str] | None = None, scoped: bool = True
) -> dict[str, object]:
    user = {"name": DEMO_USER, "password": password, "domain": {"name": DEMO_DOMAIN}}
    auth: dict[str, object] = {"identity": {"methods": ["password"], "password": {"user": user}}}
    if scoped:
        auth["scope"] = {"project": project or {"name": DEMO_PROJECT_NAME}}
    return {"auth": auth}


async def issue_token(
    session: aiohttp.ClientSession, base_url: str, body: dict[str, object] | None = None
) -> tuple[int, Any, str | None]:
    async with session.post(
        f"{base_url}/v3/auth/tokens?nocatalog=true", json=body or password_auth()
    ) as response:
        return response.status, await response.json(), response.headers.get("X-Subject-Token")


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# ---- AK/SK -----------------------------------------------------------------------------------


async def test_signed_request_accepted(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A request signed with the demo AK/SK on the simulator's clock gets the stats."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    assert await get_signed(session, url, clock) == (200, BASELINE_BODY)
    assert sim.requests[-1].auth == "aksk"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda h: {**h, "X-Project-Id": OTHER_PROJECT}, id="signed-header-changed"),
        pytest.param(
            lambda h: {**h, "Authorization": h["Authorization"][:-4] + "0000"}, id="signature"
        ),
    ],
)
async def test_tampered_request_rejected(
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    tamper: Callable[[dict[str, str]], dict[str, str]],
) -> None:
    """Changing a signed header or the signature after signing gives 401 APIGW.0301."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    url = await serve(sim) + stats_path(TASK_A)
    status, body, _ = await get_json(session, url, tamper(signed(url, clock)))
    assert status == 401
    assert body["error_code"] == "APIGW.0301"
    assert "signature mismatch" in body["error_msg"]


@pytest.mark.parametrize(
    ("access_key", "secret_key", "reason"),
    [
        ("UNKNOWNACCESSKEY0001", DEMO_SECRET_KEY, "unknown access key"),
        (DEMO_ACCESS_KEY, "not-the-secret-key", "signature mismatch"),
    ],
)
async def test_wrong_credentials_rejected(
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    access_key: str,
    secret_key: str,
    reason: str,
) -> None:
    """An unknown access key or a wrong secret key gives 401 APIGW.0301 with the reason."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    url = await serve(sim) + stats_path(TASK_A)
    status, body, _ = await get_json(session, url, signed(url, clock, access_key, secret_key))
    assert (status, body["error_code"]) == (401, "APIGW.0301")
    assert reason in body["error_msg"]


async def test_unauthenticated_request_rejected(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    """A request with neither a signature nor a token gives 401 APIGW.0301."""
    sim = Simulator()
    sim.add_task(TASK_A, "orders-cache")
    status, body, _ = await get_json(session, await serve(sim) + stats_path(TASK_A), {})
    assert (status, body["error_code"]) == (401, "APIGW.0301")
    assert sim.requests[-1].auth == "none"


async def test_skewed_signature_reported_expired_with_server_date(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """With the server clock 20 min ahead (C19) a signed call gets 401 "signature expired" and a Date 1200 s ahead."""
    sim = Simulator(clock=clock, clock_offset=1200)
    sim.add_task(TASK_A, "orders-cache")
    url = await serve(sim) + stats_path(TASK_A)
    status, body, response = await get_json(session, url, signed(url, clock))
    assert (status, body["error_code"]) == (401, "APIGW.0301")
    assert "signature expired" in body["error_msg"]
    server_date = parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert server_date - clock() == pytest.approx(1200, abs=1)


async def test_date_header_honours_clock_offset(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Every response, successful or not, carries a Date from clock() + clock_offset."""
    sim = Simulator(clock=clock, clock_offset=-90)
    sim.add_task(TASK_A, "orders-cache")
    base_url = await serve(sim)
    _, _, token = await issue_token(session, base_url)
    assert token is not None
    for path, headers in [
        (stats_path(TASK_A), {"X-Auth-Token": token}),
        (stats_path(TASK_A), {}),
        ("/no/such/path", {}),
    ]:
        async with session.get(base_url + path, headers=headers) as response:
            date = parsedate_to_datetime(response.headers["Date"]).timestamp()
            assert date == pytest.approx(clock() - 90, abs=1), path
    sim.clock_offset = 600
    async with session.get(base_url + stats_path(TASK_A)) as response:
        date = parsedate_to_datetime(response.headers["Date"]).timestamp()
        assert date == pytest.approx(clock() + 600, abs=1)


# ---- IAM tokens ------------------------------------------------------------------------------


async def test_token_flow_issue_use_expire(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A token from POST /v3/auth/tokens works on DCS until expire_tokens(), then 401 "token expired"; a new one works."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    base_url = await serve(sim)
    status, body, token = await issue_token(session, base_url)
    assert status == 201 and token
    assert body["token"]["project"] == {
        "id": DEMO_PROJECT_ID,
        "name": DEMO_PROJECT_NAME,
        "domain": body["token"]["project"]["domain"],
    }
    url = base_url + stats_path(TASK_A)
    assert (await get_json(session, url, {"X-Auth-Token": token}))[:2] == (200, BASELINE_BODY)
    assert sim.requests[-1].auth == "token"

    sim.expire_tokens()
    status, body, _ = await get_json(session, url, {"X-Auth-Token": token})
    assert (status, body["error_code"]) == (401, "APIGW.0301")
    assert "token expired" in body["error_msg"]

    _, _, fresh = await issue_token(session, base_url)
    assert fresh and fresh != token
    assert (await get_json(session, url, {"X-Auth-Token": fresh}))[0] == 200
    assert sim.token_requests == 2


async def test_token_expires_after_ttl(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A token's expires_at is issue time + token_ttl on the server clock, and it is refused from then on (C16)."""
    sim = Simulator(clock=clock, token_ttl=120)
    sim.add_task(TASK_A, "orders-cache")
    base_url = await serve(sim)
    _, body, token = await issue_token(session, base_url)
    assert token is not None
    expected = datetime.fromtimestamp(clock() + 120, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert body["token"]["expires_at"] == expected
    url = base_url + stats_path(TASK_A)
    clock.advance(119)
    assert (await get_json(session, url, {"X-Auth-Token": token}))[0] == 200
    clock.advance(1)
    status, body, _ = await get_json(session, url, {"X-Auth-Token": token})
    assert status == 401 and "token expired" in body["error_msg"]


async def test_unknown_token_rejected(serve: Serve, session: aiohttp.ClientSession) -> None:
    """A token the fake IAM never issued gives 401 APIGW.0301 "token invalid"."""
    sim = Simulator()
    sim.add_task(TASK_A, "orders-cache")
    url = await serve(sim) + stats_path(TASK_A)
    status, body, _ = await get_json(session, url, {"X-Auth-Token": "MIIforged"})
    assert (status, body["error_code"]) == (401, "APIGW.0301")
    assert "token invalid" in body["error_msg"]


@pytest.mark.parametrize(
    "body",
    [
        password_auth(password="wrong"),
        password_auth(project={"name": "eu-nl"}),
        password_auth(project={"id": OTHER_PROJECT}),
    ],
    ids=["wrong-password", "unknown-project-name", "unknown-project-id"],
)
async def test_token_refused_iam_style(
    serve: Serve, session: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    """A wrong password or an unknown project scope gets an IAM-style 401 and no token."""
    sim = Simulator()
    status, answer, token = await issue_token(session, await serve(sim), body)
    assert status == 401 and token is None
    assert answer["error"]["code"] == 401 and answer["error"]["title"] == "Unauthorized"
    assert sim.token_requests == 1


async def test_token_scoped_by_project_id_with_catalog(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    """Scoping by project id works, and without ?nocatalog=true the body carries a catalog."""
    sim = Simulator()
    base_url = await serve(sim)
    async with session.post(
        f"{base_url}/v3/auth/tokens", json=password_auth(project={"id": DEMO_PROJECT_ID})
    ) as response:
        assert response.status == 201
        body = await response.json()
    assert body["token"]["project"]["id"] == DEMO_PROJECT_ID
    assert body["token"]["catalog"]


@pytest.mark.parametrize("auth", ["aksk", "token"])
async def test_project_lookup_by_name(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock, auth: str
) -> None:
    """GET /v3/projects?name= returns the project for its name and nothing for another name."""
    sim = Simulator(clock=clock)
    base_url = await serve(sim)
    _, _, token = await issue_token(session, base_url)
    assert token is not None
    for name, expected in [(DEMO_PROJECT_NAME, [DEMO_PROJECT_ID]), ("eu-nl", [])]:
        url = f"{base_url}/v3/projects?name={name}"
        headers = signed(url, clock) if auth == "aksk" else {"X-Auth-Token": token}
        status, body, _ = await get_json(session, url, headers)
        assert status == 200
        assert [project["id"] for project in body["projects"]] == expected


async def test_project_mismatch_rejected(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A project in the path that is not the token's (or not the simulator's) gives 401 DCS.1004."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    base_url = await serve(sim)
    _, _, token = await issue_token(session, base_url)
    assert token is not None
    url = base_url + stats_path(TASK_A, OTHER_PROJECT)
    status, body, _ = await get_json(session, url, {"X-Auth-Token": token})
    assert (status, body["error_code"]) == (401, "DCS.1004")
    assert (await get_signed(session, url, clock))[1]["error_code"] == "DCS.1004"

    _, _, unscoped = await issue_token(session, base_url, password_auth(scoped=False))
    assert unscoped is not None
    status, body, _ = await get_json(
        session, base_url + stats_path(TASK_A), {"X-Auth-Token": unscoped}
    )
    assert (status, body["error_code"]) == (401, "DCS.1004")


# ---- list and details ------------------------------------------------------------------------


async def test_list_paginates(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """25 tasks with limit=10 come back as pages of 10, 10 and 5, each with count 25, in order."""
    sim = Simulator(clock=clock)
    ids = [f"aaaaaaaa-0000-4000-8000-{n:012d}" for n in range(25)]
    for number, task_id in enumerate(ids):
        sim.add_task(task_id, f"cache-{number}")
    base_url = await serve(sim) + f"/v2/{DEMO_PROJECT_ID}/migration-tasks"
    seen: list[str] = []
    for offset, size in [(0, 10), (10, 10), (20, 5), (30, 0)]:
        status, body = await get_signed(session, f"{base_url}?limit=10&offset={offset}", clock)
        assert status == 200
        assert body["count"] == 25
        assert len(body["migration_tasks"]) == size
        seen += [task["task_id"] for task in body["migration_tasks"]]
    assert seen == ids
    status, body = await get_signed(session, base_url, clock)
    assert len(body["migration_tasks"]) == 10  # default limit


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "offset=-1", "limit=ten"])
async def test_list_rejects_bad_paging(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock, query: str
) -> None:
    """A limit outside 1-1000, a negative offset or a non-number gives 400."""
    sim = Simulator(clock=clock)
    url = await serve(sim) + f"/v2/{DEMO_PROJECT_ID}/migration-tasks?{query}"
    status, body = await get_signed(session, url, clock)
    assert status == 400 and body["error_code"].startswith("DCS.")


async def test_list_filters_by_name_and_drops_removed(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """name= filters the list, and a removed task is no longer listed."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    sim.add_task(TASK_B, "sessions-cache")
    base_url = await serve(sim) + f"/v2/{DEMO_PROJECT_ID}/migration-tasks"
    _, body = await get_signed(session, f"{base_url}?name=orders", clock)
    assert [task["task_name"] for task in body["migration_tasks"]] == ["orders-cache"]
    sim.remove_task(TASK_A)
    _, body = await get_signed(session, base_url, clock)
    assert (body["count"], body["migration_tasks"][0]["task_id"]) == (1, TASK_B)


async def test_details_contain_plaintext_passwords(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Details carry the documented fields with plaintext Redis passwords, so leak tests have something to find."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", status="INCRMIGEATING", source_name="redis-old")
    url = await serve(sim) + f"/v2/{DEMO_PROJECT_ID}/migration-task/{TASK_A}"
    status, body = await get_signed(session, url, clock)
    assert status == 200
    assert (body["task_id"], body["task_name"], body["status"]) == (
        TASK_A,
        "orders-cache",
        "INCRMIGEATING",
    )
    assert body["migration_method"] == "incremental_migration"
    assert body["source_instance"]["password"] == SOURCE_PASSWORD
    assert body["target_instance"]["password"] == TARGET_PASSWORD
    assert body["source_instance"]["name"] == "redis-old"
    assert sim.requests[-1].task_id == TASK_A


@pytest.mark.parametrize("path", ["", "/stats"])
async def test_removed_task_is_dcs_4133(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock, path: str
) -> None:
    """Details and stats of a removed (or never known) task give 400 DCS.4133 as documented."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    base_url = await serve(sim) + f"/v2/{DEMO_PROJECT_ID}/migration-task/"
    assert (await get_signed(session, base_url + TASK_A + path, clock))[0] == 200
    sim.remove_task(TASK_A)
    expected = {
        "error_code": "DCS.4133",
        "error_msg": "Instance job is not found.",
        "error_ext_msg": None,
    }
    for task_id in (TASK_A, TASK_B):
        assert await get_signed(session, base_url + task_id + path, clock) == (400, expected)


async def test_unknown_path_is_json_404(serve: Serve, session: aiohttp.ClientSession) -> None:
    """A path the API does not have gets a JSON 404, and the request is still recorded."""
    sim = Simulator()
    status, body, _ = await get_json(session, await serve(sim) + "/v2/nothing", {})
    assert (status, body["error_code"]) == (404, "DCS.4001")
    assert sim.requests[-1].status == 404


# ---- stats: fixed bodies and the model -------------------------------------------------------


async def test_stats_body_equals_doc_example(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """set_body() serves exactly the documented example body, replacing the model."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", model=MODEL)
    url = await serve(sim) + stats_path(TASK_A)
    sim.set_body(TASK_A, DOC_EXAMPLE_BODY)
    status, body, response = await get_json(session, url, signed(url, clock))
    assert (status, body) == (200, DOC_EXAMPLE_BODY)
    assert response.content_type == "application/json"


def test_model_full_phase_then_incremental() -> None:
    """Progress climbs to 100 with target keys growing and offset 0, then the offset moves while migrating."""
    full = [MODEL.stats_at(t) for t in range(0, 100, 5)]
    progress = [int(str(stats["full_migration_progress"])) for stats in full]
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] < 100
    assert {stats["offset"] for stats in full} == {"0"}
    targets = [int(str(stats["target_dbsize"])) for stats in full]
    assert targets == sorted(targets) and targets[-1] < 10_000

    incremental = [MODEL.stats_at(t) for t in range(100, 400)]
    assert all(stats["full_migration_progress"] == "100" for stats in incremental)
    assert all(stats["is_migrating"] is True for stats in incremental)
    offsets = [int(str(stats["offset"])) for stats in incremental]
    assert len(set(offsets)) > 50  # moving
    assert 0 in offsets and max(offsets) > 0  # sometimes in sync
    assert all(abs(int(str(s["target_dbsize"])) - 10_000) < 1000 for s in incremental)
    assert MODEL.stats_at(250.5) == MODEL.stats_at(250.5)  # deterministic


def test_model_stalled_offset_constant() -> None:
    """A stalled model keeps one non-zero offset while still saying it is migrating."""
    stalled = MigrationModel(10_000, 100, 300, 12.5, seed=7, stalled=True)
    incremental = [stalled.stats_at(t) for t in range(100, 400, 7)]
    assert {stats["offset"] for stats in incremental} == {str(stalled.stalled_offset)}
    assert stalled.stalled_offset > 0
    assert all(stats["is_migrating"] is True for stats in incremental)


def test_model_bare_numbers() -> None:
    """numbers_as_strings=False gives the same values as JSON numbers instead of strings."""
    as_numbers = MigrationModel(10_000, 100, 300, 12.5, seed=7, numbers_as_strings=False)
    for elapsed in (10, 250):
        numbers, strings = as_numbers.stats_at(elapsed), MODEL.stats_at(elapsed)
        for key, value in numbers.items():
            if key != "is_migrating":
                assert isinstance(value, int | float) and str(value) == strings[key]


@given(
    elapsed=st.floats(min_value=-10, max_value=1e6),
    seed=st.integers(0, 2**32),
    stalled=st.booleans(),
)
def test_model_invariants(elapsed: float, seed: int, stalled: bool) -> None:
    """Every body has the seven fields, progress in 0-100, non-negative counts, and offset 0 in the full phase."""
    model = MigrationModel(5_000, 300, 100, 8.0, seed=seed, stalled=stalled)
    stats = model.stats_at(elapsed)
    assert set(stats) == set(BASELINE_BODY)
    progress = int(str(stats["full_migration_progress"]))
    assert 0 <= progress <= 100
    assert all(float(str(stats[key])) >= 0 for key in BASELINE_BODY if key != "is_migrating")
    assert int(str(stats["target_dbsize"])) <= 5_000
    if elapsed < 300:
        assert stats["offset"] == "0"


async def test_model_served_over_http_follows_clock(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Stats come from the model at the task's age on the simulator's clock, and set_stalled freezes the offset."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", model=MODEL)
    url = await serve(sim) + stats_path(TASK_A)
    assert (await get_signed(session, url, clock))[1] == MODEL.stats_at(0)
    clock.advance(50)
    assert (await get_signed(session, url, clock))[1] == MODEL.stats_at(50)
    clock.advance(200)
    sim.set_stalled(TASK_A, True)
    offsets = set()
    for _ in range(5):
        clock.advance(13)
        offsets.add((await get_signed(session, url, clock))[1]["offset"])
    assert offsets == {str(MODEL.stalled_offset)}
    sim.set_stalled(TASK_A, False)
    clock.advance(13)
    assert (await get_signed(session, url, clock))[1] == MODEL.stats_at(250 + 6 * 13)


async def test_started_ago_ages_the_model(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """started_ago puts a new task straight into the incremental phase."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", model=MODEL, started_ago=500)
    url = await serve(sim) + stats_path(TASK_A)
    assert (await get_signed(session, url, clock))[1] == MODEL.stats_at(500)


# ---- scripted replies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canned", "content_type", "text"),
    [
        pytest.param(
            CannedResponse(
                status=502,
                body="<html><head><title>502 Bad Gateway</title></head></html>",
                content_type="text/html",
            ),
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head></html>",
            id="502-html",
        ),
        pytest.param(
            CannedResponse(
                status=429,
                headers={"Retry-After": "2"},
                body={"error_code": "APIG.0308", "error_msg": "throttled"},
            ),
            "application/json",
            '{"error_code": "APIG.0308", "error_msg": "throttled"}',
            id="429-retry-after",
        ),
        pytest.param(CannedResponse(), "application/json", "", id="200-empty"),
        pytest.param(
            CannedResponse(body=b'{"offset":NaN}'), "application/json", '{"offset":NaN}', id="raw"
        ),
    ],
)
async def test_canned_status_headers_body(
    serve: Serve,
    session: aiohttp.ClientSession,
    clock: FakeClock,
    canned: CannedResponse,
    content_type: str,
    text: str,
) -> None:
    """A pushed reply is sent with its status, headers, content type and raw or JSON body, then the body resumes."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    sim.push(TASK_A, canned)
    async with session.get(url, headers=signed(url, clock)) as response:
        assert response.status == canned.status
        assert response.content_type == content_type
        assert await response.text() == text
        for name, value in canned.headers.items():
            assert response.headers[name] == value
    assert await get_signed(session, url, clock) == (200, BASELINE_BODY)
    assert [record.status for record in sim.requests] == [canned.status, 200]


async def test_canned_order_push_all_then_push_then_body(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """push_all() replies go to the next calls of any task, before that task's push() queue, before its body."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    sim.add_task(TASK_B, "sessions-cache", body=DOC_EXAMPLE_BODY)
    base_url = await serve(sim)
    sim.push(TASK_A, CannedResponse(status=500, body={"error_code": "DCS.5000"}))
    sim.push_all(CannedResponse(status=429), CannedResponse(status=429))
    statuses = []
    for task_id in (TASK_B, TASK_A, TASK_A, TASK_A, TASK_B):
        url = base_url + stats_path(task_id)
        async with session.get(url, headers=signed(url, clock)) as response:
            statuses.append(response.status)
    assert statuses == [429, 429, 500, 200, 200]


async def test_push_for_unknown_task(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Replies pushed for a task the simulator does not have are served, then DCS.4133."""
    sim = Simulator(clock=clock)
    url = await serve(sim) + stats_path(TASK_B)
    sim.push(TASK_B, CannedResponse(body=BASELINE_BODY))
    assert await get_signed(session, url, clock) == (200, BASELINE_BODY)
    assert (await get_signed(session, url, clock))[0] == 400


async def test_canned_delay(serve: Serve, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    """A delayed reply arrives no sooner than its delay, and counts as in flight meanwhile."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    sim.push(TASK_A, CannedResponse(body=DOC_EXAMPLE_BODY, delay=0.3))
    started = time.monotonic()
    call = asyncio.create_task(get_signed(session, url, clock))
    assert await eventually(lambda: sim.in_flight(TASK_A) == 1)
    assert await call == (200, DOC_EXAMPLE_BODY)
    assert time.monotonic() - started >= 0.3
    assert sim.in_flight(TASK_A) == 0


async def test_canned_hang_until_client_times_out(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A hanging reply sends nothing, so the client's timeout fires; the request leaves in-flight when the client does."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    sim.push(TASK_A, CannedResponse(hang=True))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with session.get(
            url, headers=signed(url, clock), timeout=aiohttp.ClientTimeout(total=0.3)
        ) as response:
            await response.read()
    assert 0.3 <= time.monotonic() - started < 2
    assert sim.max_in_flight(TASK_A) == 1
    assert await eventually(lambda: sim.in_flight(TASK_A) == 0)
    assert sim.requests[-1].status == 0
    assert await get_signed(session, url, clock) == (200, BASELINE_BODY)


async def test_canned_partial_body_then_stall(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A partial reply sends its status, headers and the first bytes, then nothing until the client gives up."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    url = await serve(sim) + stats_path(TASK_A)
    partial = b'{"full_migration_progress":"4'
    sim.push(TASK_A, CannedResponse(partial=partial))
    async with session.get(
        url, headers=signed(url, clock), timeout=aiohttp.ClientTimeout(sock_read=0.3)
    ) as response:
        assert response.status == 200
        assert response.content_length is not None and response.content_length > len(partial)
        assert await response.content.readexactly(len(partial)) == partial
        with pytest.raises(TimeoutError):
            await response.read()
    assert await eventually(lambda: sim.in_flight(TASK_A) == 0)


async def test_canned_reset(serve: Serve, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    """A reset reply closes the connection with no response; aiohttp retries a GET once, so it takes two."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    sim.push(TASK_A, CannedResponse(reset=True), CannedResponse(reset=True))
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_signed(session, url, clock)
    assert [record.status for record in sim.requests] == [0, 0]
    assert await get_signed(session, url, clock) == (200, BASELINE_BODY)


async def test_in_flight_accounting(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """in_flight() counts a task's open stats requests and max_in_flight() keeps the peak, per task."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache", body=BASELINE_BODY)
    sim.add_task(TASK_B, "sessions-cache", body=BASELINE_BODY)
    url = await serve(sim) + stats_path(TASK_A)
    sim.push(TASK_A, *[CannedResponse(body=BASELINE_BODY, delay=0.3)] * 3)
    calls = [asyncio.create_task(get_signed(session, url, clock)) for _ in range(3)]
    assert await eventually(lambda: sim.in_flight(TASK_A) == 3)
    assert sim.in_flight(TASK_B) == 0
    await asyncio.gather(*calls)
    assert (sim.in_flight(TASK_A), sim.max_in_flight(TASK_A), sim.max_in_flight(TASK_B)) == (
        0,
        3,
        0,
    )


async def test_shutdown_releases_hanging_requests(clock: FakeClock) -> None:
    """runner.cleanup() returns promptly even while a request hangs."""
    sim = Simulator(clock=clock)
    sim.push(TASK_A, CannedResponse(hang=True))
    runner, base_url = await start(sim)
    url = base_url + stats_path(TASK_A)
    async with aiohttp.ClientSession() as client:
        call = asyncio.create_task(get_signed(client, url, clock))
        assert await eventually(lambda: sim.in_flight(TASK_A) == 1)
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 2
        with pytest.raises(aiohttp.ClientError):
            await call


async def test_requests_recorded(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """Each request is recorded with its arrival time, method, path, task id, auth kind and status."""
    sim = Simulator(clock=clock)
    sim.add_task(TASK_A, "orders-cache")
    base_url = await serve(sim)
    await issue_token(session, base_url)
    clock.advance(5)
    await get_signed(session, base_url + stats_path(TASK_A), clock)
    await get_json(session, base_url + f"/v2/{DEMO_PROJECT_ID}/migration-tasks", {})
    assert [tuple(record) for record in sim.requests] == [
        (clock() - 5, "POST", "/v3/auth/tokens", None, "password", 201),
        (clock(), "GET", stats_path(TASK_A), TASK_A, "aksk", 200),
        (clock(), "GET", f"/v2/{DEMO_PROJECT_ID}/migration-tasks", None, "none", 401),
    ]


# ---- demo and command line -------------------------------------------------------------------


async def test_demo_simulator_tasks(
    serve: Serve, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """The demo has three named tasks: one in the full phase, one incremental, one sending bare numbers."""
    sim = demo_simulator(clock)
    assert sim.task_ids() == [task_id for task_id, _ in DEMO_TASKS]
    assert [name for _, name in DEMO_TASKS] == ["orders-cache", "sessions-cache", "catalog-cache"]
    base_url = await serve(sim)
    orders, sessions, catalog = [
        (await get_signed(session, base_url + stats_path(task_id), clock))[1]
        for task_id in sim.task_ids()
    ]
    assert int(orders["full_migration_progress"]) < 100
    assert sessions["full_migration_progress"] == "100"
    assert isinstance(catalog["source_dbsize"], int)


def test_command_line_serves_demo() -> None:
    """python -m exporter.simulator prints its URL and demo credentials, answers signed calls, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "exporter.simulator", "--listen", "127.0.0.1:0"]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            base_url = first.split(" listening on ")[1].split()[0]
            banner = first + "".join(process.stdout.readline() for _ in range(6))
            assert DEMO_ACCESS_KEY in banner and DEMO_SECRET_KEY in banner and DEMO_USER in banner
            url = f"{base_url}/v2/{DEMO_PROJECT_ID}/migration-tasks"
            request = urllib.request.Request(url, headers=signed(url, time.time))
            with urllib.request.urlopen(request, timeout=5) as response:
                body = json.load(response)
            assert [task["task_name"] for task in body["migration_tasks"]] == [
                name for _, name in DEMO_TASKS
            ]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
