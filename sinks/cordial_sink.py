"""The Cordial sink: applies each delta chunk to Cordial.

Operations are idempotent (set a list attribute to true/false), so a chunk redone
after a crash changes nothing. Small deltas go through the REST API one contact at
a time; big ones (over ``sink_bulk_threshold`` operations) through a contact import
per chunk (:mod:`sinks.cordial_bulk`). Operations that fail for good go to the
sink's dead-letter topic and the rest of the chunk continues; a refused key pauses
that account's client without dropping anything (:mod:`sinks.cordial_client`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from heapsync.contracts import Delta
from heapsync.settings import Account, AccountError, RemovalRail, Settings, removal_rail_for
from sinks import metrics, operations
from sinks.cordial_bulk import BulkImporter
from sinks.cordial_client import CordialClient, CordialError
from sinks.filehost import SignedFileHost
from sinks.operations import delta_ref
from sinks.protocol import ChunkResult, DeadLetters
from sinks.runner import SinkRunner, make_runner

log = logging.getLogger("heapsync.sink.cordial")


class CordialSink:
    name = "cordial"

    def __init__(self, settings: Settings, accounts: dict[str, Account], dead_letters: DeadLetters) -> None:
        self.settings = settings
        self.accounts = accounts
        self.dead_letters = dead_letters
        self.clients: dict[str, CordialClient] = {}
        secret = settings.sink_files_secret.get_secret_value().encode() if settings.sink_files_secret else None
        self.files = SignedFileHost(settings.sink_files_host, settings.sink_files_port,
                                    settings.sink_files_public_url, secret, settings.sink_files_ttl_seconds)
        self.bulk = BulkImporter(self.files, dead_letters, settings)
        self.applied_chunks = 0
        self._keyless: set[str] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()
        await self.files.close()

    def client(self, account: Account) -> CordialClient:
        if account.id not in self.clients:
            s = self.settings
            self.clients[account.id] = CordialClient(
                account, timeout_seconds=s.sink_request_timeout_seconds, max_retries=s.sink_max_retries,
                backoff_base_seconds=s.sink_backoff_base_seconds, backoff_max_seconds=s.sink_backoff_max_seconds,
                auth_probe_seconds=s.sink_auth_probe_seconds, low_water=s.sink_rate_low_watermark,
            )
        return self.clients[account.id]

    async def apply(self, delta: Delta) -> ChunkResult:
        account = self.accounts.get(delta.account)
        if account is None:
            log.error("delta for an unknown account; dead-lettered", extra=delta_ref(delta))
            await self.dead_letters.send("unknown account", {**delta_ref(delta), "delta": delta.model_dump(mode="json")},
                                         delta.delta_id)
            return ChunkResult(dead_lettered=len(delta.add) + len(delta.remove) or 1)
        try:
            client = self.client(account)
        except AccountError as exc:
            await self._wait_for_key(account, exc)
            raise  # not reached: the wait ends only when the sink stops
        ops = operations.plan(delta, account)
        if operations.use_bulk(delta, self.settings.sink_bulk_threshold, self.settings.delta_chunk_size):
            dead = await self.bulk.apply(client, delta, ops)
            if dead is not None:
                self._done(delta, ops, "bulk", dead)
                return ChunkResult(dead_lettered=dead, path="bulk")
            log.warning("contact import unavailable; applying the chunk through the REST API", extra=delta_ref(delta))
        dead = await self.apply_rest(client, delta, ops)
        self._done(delta, ops, "drain" if delta.kind == "drain" else "rest", dead)
        return ChunkResult(dead_lettered=dead, path="drain" if delta.kind == "drain" else "rest")

    async def _wait_for_key(self, account: Account, exc: AccountError) -> None:
        """No API key for the account (its environment variable is unset): treat it like a refused
        key, pause that account's lanes and skip nothing; other accounts keep flowing."""
        metrics.PAUSED.labels(account.id).set(1)
        if account.id not in self._keyless:
            self._keyless.add(account.id)
            log.error("account has no Cordial API key; its deltas wait (set it and restart the sink)",
                      extra={"account": account.id, "error": str(exc)})
        await asyncio.Event().wait()

    def _done(self, delta: Delta, ops: list[operations.Operation], path: str, dead_lettered: int) -> None:
        """One line per chunk that says what happened to its operations: a chunk whose every
        operation was dead-lettered is not "applied" in any sense an operator cares about."""
        self.applied_chunks += 1
        log.log(logging.WARNING if dead_lettered else logging.INFO, "delta chunk applied", extra={
            **delta_ref(delta), "operations": len(ops), "applied": max(0, len(ops) - dead_lettered),
            "dead_lettered": dead_lettered, "path": path})

    async def apply_rest(self, client: CordialClient, delta: Delta, ops: list[operations.Operation]) -> int:
        """Every operation applied or dead-lettered; returns how many were dead-lettered."""
        ref = delta_ref(delta)
        dead = 0

        async def run(op: operations.Operation) -> None:
            nonlocal dead
            try:
                result = await client.apply(op)
            except CordialError as exc:
                dead += 1
                metrics.OPERATIONS.labels(client.account.id, op.kind, "dead_lettered").inc()
                reason = "cordial rejected the operation" if not exc.transient else "cordial kept failing"
                await self.dead_letters.send(reason, {
                    **ref, "operation": op.kind, "contact_id": op.contact_id, "identity_key": op.identity_key,
                    "status": exc.status, "response": exc.body,
                }, delta.delta_id)
                return
            metrics.OPERATIONS.labels(client.account.id, op.kind, result).inc()

        await asyncio.gather(*(run(op) for op in ops))
        return dead


def rail_for(accounts: dict[str, Account]) -> Callable[[Delta], RemovalRail]:
    """The removal rail of a delta's list, from the accounts file (off for an unknown account: it is dead-lettered)."""
    def rail(delta: Delta) -> RemovalRail:
        account = accounts.get(delta.account)
        return removal_rail_for(account, delta.segment_id) if account is not None else RemovalRail()
    return rail


def build_runner(settings: Settings, accounts: dict[str, Account]) -> SinkRunner:
    return make_runner(lambda dl: CordialSink(settings, accounts, dl), settings, group=settings.sink_group,
                       rail_for=rail_for(accounts))
