"""Run the ingress: one aiohttp server, one idempotent producer, graceful shutdown.

On SIGTERM aiohttp stops accepting, finishes in-flight requests, then the
producer is flushed, so no page that got a 200 is lost.
"""

from __future__ import annotations

import logging

from aiohttp import web

from heapsync.kafka import AsyncProducer, ensure_topics
from heapsync.settings import Account, Settings
from ingest.app import create_app

log = logging.getLogger("heapsync.ingest")


def build(settings: Settings, accounts: dict[str, Account]) -> web.Application:
    producer = AsyncProducer(settings.kafka_bootstrap, delivery_timeout_s=settings.produce_timeout_seconds)
    app = create_app(settings, accounts, producer)

    async def close_producer(_: web.Application) -> None:
        remaining = producer.close(timeout=settings.produce_timeout_seconds)
        log.info("producer flushed", extra={"undelivered": remaining})

    app.on_cleanup.append(close_producer)
    return app


def run(settings: Settings, accounts: dict[str, Account]) -> None:
    try:
        ensure_topics(settings)
    except Exception as exc:  # noqa: BLE001 - the ingress still serves 503s while the broker is away
        log.warning("could not ensure topics", extra={"error": str(exc)})
    app = build(settings, accounts)
    log.info("ingress listening", extra={"host": settings.ingest_host, "port": settings.ingest_port,
                                        "accounts": len(accounts)})
    web.run_app(app, host=settings.ingest_host, port=settings.ingest_port, print=None,
                shutdown_timeout=settings.produce_timeout_seconds, access_log=None)
