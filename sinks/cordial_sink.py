"""The Cordial sink: deltas topic in, Cordial REST calls out, offsets committed after.

A chunk's offset is committed only once every operation in it was applied or
dead-lettered (at-least-once). Operations are idempotent (set a list
attribute to true/false), so a chunk redone after a crash changes nothing.
Messages of one partition are applied in order, so chunks of one list are too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message
from pydantic import ValidationError

from heapsync.contracts import Delta
from heapsync.kafka import AsyncProducer
from heapsync.settings import Account, Settings
from sinks import operations
from sinks.cordial_client import CordialClient, CordialError

log = logging.getLogger("heapsync.sink")


class CordialSink:
    def __init__(self, settings: Settings, accounts: dict[str, Account]) -> None:
        self.settings = settings
        self.accounts = accounts
        self.clients: dict[str, CordialClient] = {}
        self.producer = AsyncProducer(settings.kafka_bootstrap)
        self._stopping = asyncio.Event()
        self.applied_chunks = 0

    def client(self, account: Account) -> CordialClient:
        if account.id not in self.clients:
            self.clients[account.id] = CordialClient(
                account,
                timeout_seconds=self.settings.sink_request_timeout_seconds,
                max_retries=self.settings.sink_max_retries,
                backoff_max_seconds=self.settings.sink_backoff_max_seconds,
            )
        return self.clients[account.id]

    async def dead_letter(self, reason: str, detail: dict[str, Any]) -> None:
        await self.producer.send(self.settings.topics.sink_dlq,
                                 orjson.dumps({"reason": reason, **detail}),
                                 key=str(detail.get("delta_id", "")).encode())

    async def apply_delta(self, delta: Delta) -> None:
        """Apply one chunk; operations that fail for good are dead-lettered, the rest continue."""
        account = self.accounts.get(delta.account)
        ref = {"delta_id": delta.delta_id, "chunk": delta.chunk, "account": delta.account,
               "list_name": delta.list_name}
        if account is None:
            await self.dead_letter("unknown account", {**ref, "delta": delta.model_dump(mode="json")})
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
                    await self.dead_letter("cordial rejected the operation", {
                        **ref, "operation": op.kind, "contact_id": op.contact_id,
                        "identity_key": op.identity_key, "status": exc.status, "response": exc.body,
                    })
                    return

        await asyncio.gather(*(run(op) for op in ops))
        self.applied_chunks += 1
        log.info("delta chunk applied", extra={**ref, "operations": len(ops)})

    async def handle(self, msg: Message) -> None:
        try:
            delta = Delta.model_validate_json(msg.value())
        except ValidationError as exc:
            await self.dead_letter("unreadable delta", {
                "partition": msg.partition(), "offset": msg.offset(),
                "errors": exc.errors(include_input=False, include_url=False),
                "value": (msg.value() or b"").decode("utf-8", "replace"),
            })
            return
        await self.apply_delta(delta)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        consumer = Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.settings.sink_group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": 3_600_000,
        })
        consumer.subscribe([self.settings.topics.deltas])
        log.info("sink started", extra={"topic": self.settings.topics.deltas, "group": self.settings.sink_group})
        try:
            while not self._stopping.is_set():
                msg = await loop.run_in_executor(None, consumer.poll, 0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error", extra={"error": msg.error().str()})
                    continue
                await self.handle(msg)
                await loop.run_in_executor(None, lambda m=msg: consumer.commit(message=m, asynchronous=False))
        finally:
            await loop.run_in_executor(None, consumer.close)
            for c in self.clients.values():
                await c.close()
            self.producer.close()
            log.info("sink stopped")
