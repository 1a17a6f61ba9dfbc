"""The Cordial simulator over real HTTP (in-process server): the rules the sink relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from heapsync_dev.cordial_simulator import CordialSimulator
from tests.conftest import simulator_server


@pytest.fixture
async def sim() -> AsyncIterator[tuple[CordialSimulator, str]]:
    async with simulator_server(import_step_seconds=0.01) as (s, root):
        yield s, root


async def call(url: str, method: str, path: str, json: object = None, key: str | None = "key-a",
               data: bytes | None = None) -> tuple[int, object, dict[str, str]]:
    auth = aiohttp.BasicAuth(key, "") if key else None
    async with aiohttp.ClientSession(auth=auth) as s:
        async with s.request(method, f"{url}{path}", json=json, data=data) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


async def test_auth_lists_contacts(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    assert (await call(url, "GET", "/v2/accountlists", key=None))[0] == 401
    assert (await call(url, "GET", "/v2/accountlists", key="nope"))[0] == 401
    status, body, _ = await call(url, "POST", "/v2/accountlists", {"name": "Seg", "enhanced": True})
    assert status == 201 and body["id"] == 1
    status, body, _ = await call(url, "POST", "/v2/accountlists", {"name": "Seg"})
    assert status == 422 and body["error"] is True
    # the other account has its own lists
    assert (await call(url, "POST", "/v2/accountlists", {"name": "Seg"}, key="key-b"))[0] == 201
    contact = {"channels": {"email": {"address": "A@x.co"}}, "Seg": True}
    assert (await call(url, "POST", "/v2/contacts", contact))[0] == 200
    assert (await call(url, "POST", "/v2/contacts", {"channels": {"email": {"address": "bad"}}, "Seg": True}))[0] == 422
    assert (await call(url, "POST", "/v2/contacts", {"channels": {"email": {"address": "b@x.co"}}, "Nope": True}))[0] == 422
    assert (await call(url, "PUT", "/v2/contacts/email:missing%40x.co", {"Seg": False}))[0] == 404
    assert s.snapshot()["a"]["Seg"] == ["a@x.co"]
    assert (await call(url, "PUT", "/v2/contacts/email:a%40x.co", {"Seg": False}))[0] == 200
    assert s.snapshot() == {"a": {"Seg": []}, "b": {"Seg": []}}
    s.revoked.add("key-a")
    assert (await call(url, "GET", "/v2/accountlists"))[0] == 403


async def test_rate_limit_answers_429_with_headers(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.config.rate_limit_per_second = 3
    statuses = []
    async with aiohttp.ClientSession(auth=aiohttp.BasicAuth("key-a", "")) as session:
        for _ in range(6):
            async with session.get(f"{url}/v2/accountlists") as r:
                statuses.append((r.status, r.headers.get("X-Rate-Limit-Remaining"), r.headers.get("Retry-After")))
    limited = [x for x in statuses if x[0] == 429]
    assert limited and all(x[2] is not None for x in limited)
    assert all(x[1] is not None for x in statuses)


async def test_contact_import_fetches_the_csv_and_runs_as_a_job(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    await call(url, "POST", "/v2/accountlists", {"name": "Seg"})
    csv = b"channels.email.address,Seg\na@x.co,1\nnot-an-email,1\nb@x.co,0\n"
    files = web.Application()
    files.router.add_get("/f.csv", lambda r: web.Response(body=csv, content_type="text/csv"))
    fs = TestServer(files, host="127.0.0.1")
    await fs.start_server()
    try:
        status, body, _ = await call(url, "POST", "/v2/contactimports",
                                     {"source": {"transport": "http", "url": f"http://127.0.0.1:{fs.port}/f.csv"},
                                      "hasHeader": True, "subscribe": False})
        assert status == 201
        seen = set()
        for _ in range(200):
            _, job, _ = await call(url, "GET", f"/v2/jobs/{body['jobID']}")
            seen.add(job["status"])
            if job["status"] in ("Done", "Failed"):
                break
            await asyncio.sleep(0.005)
        assert job["status"] == "Done", job
        assert (job["inserted"], job["rejected"]) == (2, 1) and job["errors"][0]["value"] == "not-an-email"
        assert {"Pending", "Processing"} & seen
        assert s.snapshot()["a"]["Seg"] == ["a@x.co"]
        assert "subscribeStatus" not in s.tenants["key-a"].contacts["email:a@x.co"]
        # an unreachable file fails the job
        _, body, _ = await call(url, "POST", "/v2/contactimports",
                                {"source": {"transport": "http", "url": f"http://127.0.0.1:{fs.port}/nope.csv"}})
        for _ in range(200):
            _, job, _ = await call(url, "GET", f"/v2/jobs/{body['jobID']}")
            if job["status"] in ("Done", "Failed"):
                break
            await asyncio.sleep(0.005)
        assert job["status"] == "Failed"
    finally:
        await fs.close()


async def test_outage_windows_answer_503(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.config.outages = [(0, 0.3)]
    assert (await call(url, "GET", "/v2/accountlists"))[0] == 503
    await asyncio.sleep(0.35)
    assert (await call(url, "GET", "/v2/accountlists"))[0] == 200
