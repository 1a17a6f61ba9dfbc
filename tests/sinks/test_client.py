"""The Cordial client and bulk importer against the simulator over real HTTP (in-process servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from heapsync.contracts import Delta
from heapsync.settings import Account, Settings
from heapsync_dev.cordial_simulator import CordialSimulator
from sinks.cordial_bulk import BulkImporter
from sinks.cordial_client import CordialClient, CordialError
from sinks.filehost import SignedFileHost
from sinks.operations import Operation, plan
from tests.conftest import SIM_KEYS as KEYS
from tests.conftest import simulator_server


@pytest.fixture
async def sim() -> AsyncIterator[tuple[CordialSimulator, str]]:
    async with simulator_server(import_step_seconds=0.02) as (s, root):
        yield s, f"{root}/v2"


def client(url: str, label: str = "a", **kw: Any) -> CordialClient:
    account = Account(id=label, heap_webhook_secrets=["s"], cordial_api_key=KEYS[label], cordial_base_url=url,
                      max_concurrency=kw.pop("max_concurrency", 4), rate_limit_per_second=kw.pop("rate", 1000))
    return CordialClient(account, backoff_base_seconds=0.05, backoff_max_seconds=0.5,
                         auth_probe_seconds=0.1, **kw)


def adds(n: int, list_name: str = "Seg") -> list[Operation]:
    return [Operation("add", list_name, f"u{i}@x.co") for i in range(n)]


async def test_rate_limit_hit_loses_nothing_and_waits_as_told(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.config.rate_limit_per_second = 5
    async with client(url, max_concurrency=1) as c:
        c.low_water = -1  # never slow down early: provoke 429s
        await asyncio.gather(*(c.apply(op) for op in adds(14)))
    assert s.snapshot()["a"]["Seg"] == sorted(f"u{i}@x.co" for i in range(14))
    assert s.rate_limited >= 1
    log = list(s.request_log)
    for (t, _, status), (t_next, _, _) in zip(log, log[1:]):
        if status == 429:  # the next request came only after the window Cordial named had reset
            assert int(t_next) > int(t), (t, t_next)


async def test_low_remaining_slows_down_before_any_429(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.config.rate_limit_per_second = 10
    async with client(url, max_concurrency=4) as c:
        await asyncio.gather(*(c.apply(op) for op in adds(30)))
    assert len(s.snapshot()["a"]["Seg"]) == 30
    assert s.rate_limited == 0


async def test_list_is_created_exactly_once_under_concurrency(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    async with client(url) as c1, client(url) as c2:  # two clients: like two sink processes
        ids = await asyncio.gather(*(c.ensure_list("Seg") for c in (c1, c2) for _ in range(10)))
    assert set(ids) == {1}
    assert s.tenants["key-a"].lists_created == 1


async def test_transient_errors_and_outage_are_retried(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.config.error_rate = 0.3
    s.rng.seed(7)
    s.config.outages = [(0, 0.5)]
    async with client(url, max_retries=10) as c:
        await asyncio.gather(*(c.apply(op) for op in adds(40)))
    assert len(s.snapshot()["a"]["Seg"]) == 40
    assert s.status_counts.get("503", 0) > 0


async def test_permanent_errors_raise_and_missing_contact_is_fine(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    async with client(url) as c:
        with pytest.raises(CordialError) as err:
            await c.apply(Operation("add", "Seg", "not-an-email"))
        assert err.value.status == 422 and "valid email" in err.value.body
        assert await c.apply(Operation("remove", "Seg", "ghost@x.co")) == "missing"
        with pytest.raises(CordialError) as err:
            await c.request("GET", "/nothing-here")
        assert err.value.status == 404


async def test_revoked_key_pauses_that_account_only(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    s.revoked.add("key-b")
    async with client(url, "a") as ca, client(url, "b") as cb:
        paused = asyncio.gather(*(cb.apply(op) for op in adds(5)))
        await asyncio.gather(*(ca.apply(op) for op in adds(5)))
        await asyncio.sleep(0.3)
        assert cb.gate.paused and not paused.done()
        assert len(s.snapshot()["a"]["Seg"]) == 5
        s.revoked.discard("key-b")
        await asyncio.wait_for(paused, 10)
        assert not cb.gate.paused
    assert len(s.snapshot()["b"]["Seg"]) == 5


class RecordingDeadLetters:
    """Stands in for the Kafka-backed DeadLetters in this in-process test (the real one runs in test_sink_chain)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    async def send(self, reason: str, detail: dict[str, object], key: str = "") -> None:
        self.sent.append((reason, detail))


async def test_bulk_import_applies_a_chunk_and_dead_letters_rejected_rows(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    files = SignedFileHost(ttl_seconds=60)
    dead = RecordingDeadLetters()
    importer = BulkImporter(files, dead, Settings(sink_import_poll_seconds=0.02))  # type: ignore[arg-type]
    delta = Delta(delta_id="d", account="a", segment_id="1", segment_name="Seg", list_name="Seg",
                  identity_field="email", kind="sync", chunks=3,
                  add=[f"u{i}@x.co" for i in range(500)] + ["broken"], remove=["gone@x.co"])
    async with client(url) as c:
        await c.apply(Operation("add", "Seg", "gone@x.co"))
        ops = plan(delta, c.account)
        try:
            rejected = await importer.apply(c, delta, ops)
        finally:
            await files.close()
    assert rejected == 1 and dead.sent[0][1]["contact_id"] == "broken"
    members = s.snapshot()["a"]["Seg"]
    assert len(members) == 500 and "gone@x.co" not in members
    assert files.fetches == 1 and files.files == {}  # served once, withdrawn after


async def test_retries_are_bounded_then_the_error_is_raised_for_dead_lettering(sim: tuple[CordialSimulator, str]) -> None:
    s, url = sim
    async with client(url, max_retries=3) as c:
        await c.ensure_list("Seg")
        s.config.error_rate = 1.0
        with pytest.raises(CordialError) as err:
            await c.apply(Operation("add", "Seg", "a@x.co"))
    assert err.value.status == 503 and err.value.transient
    assert s.status_counts["503"] == 4  # the first try and three retries, then no more
