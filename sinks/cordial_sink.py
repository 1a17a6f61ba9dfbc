"""The Cordial sink: applies each delta chunk to Cordial's REST API.

Operations are idempotent (set a list attribute to true/false), so a chunk
redone after a crash changes nothing. Operations that fail for good go to the
sink's dead-letter topic and the rest of the chunk continues; a revoked key
pauses the account without dropping anything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from heapsync.contracts import Delta
from heapsync.settings import Account, Settings
from sinks import operations
from sinks.base import DeadLetters, SinkRunner, make_runner
from sinks.cordial_client import CordialClient, CordialError

log = logging.getLogger("heapsync.sink.cordial")

class CordialSink:
    name = "cordial"

    def __init__(self, settings: Settings, accounts: dict[str, Account], dead_letters: DeadLetters) -> None:
        self.settings = settings
        self.accounts = accounts
        self.dead_letters = dead_letters
        self.clients: dict[str, CordialClient] = {}
        self.applied_chunks = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    def client(self, account: Account) -> CordialClient:
        if account.id not in self.clients:
            self.clients[account.id] = CordialClient(
                account,
                timeout_seconds=self.settings.sink_request_timeout_seconds,
                max_retries=self.settings.sink_max_retries,
                backoff_max_seconds=self.settings.sink_backoff_max_seconds,
            )
        return self.clients[account.id]

    async def apply(self, delta: Delta) -> None:
        account = self.accounts.get(delta.account)
        ref = {"delta_id": delta.delta_id, "chunk": delta.chunk, "account": delta.account,
               "list_name": delta.list_name}
        if account is None:
            await self.dead_letters.send("unknown account", {**ref, "delta": delta.model_dump(mode="json")}, delta.delta_id)
            return
        client = self.client(account)
        ops = operations.plan(delta, account)

        async def run(op: operations.Operation) -> None:
            while True:
                try:
                    await client.apply(op)
                    return
                except CordialError as exc:
                    if exc.auth:
                        # Key revoked or IP not allowed: wait for it to be fixed, drop nothing.
                        log.error("Cordial refused the account's key; pausing", extra={**ref, "status": exc.status})
                        await asyncio.sleep(self.settings.sink_backoff_max_seconds)
                        continue
                    await self.dead_letters.send("cordial rejected the operation", {
                        **ref, "operation": op.kind, "contact_id": op.contact_id,
                        "identity_key": op.identity_key, "status": exc.status, "response": exc.body,
                    }, delta.delta_id)
                    return

        await asyncio.gather(*(run(op) for op in ops))
        self.applied_chunks += 1
        log.info("delta chunk applied", extra={**ref, "operations": len(ops)})


def build_runner(settings: Settings, accounts: dict[str, Account]) -> SinkRunner:
    return make_runner(lambda dl: CordialSink(settings, accounts, dl), settings, group=settings.sink_group)
