"""Run the ingress: one aiohttp server, one idempotent producer, graceful shutdown.

On SIGTERM (or SIGINT) aiohttp stops listening, ``/readyz`` turns 503, requests
in flight finish (each bounded by the produce timeout), then the producer is
flushed, and the process exits 0. No page that got a 200 is lost: a 200 is only
sent after Kafka acked the record, so the flush is for rejected-topic records
and belt and braces.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Sequence

from aiohttp import web

from heapsync.kafka import ensure_topics
from heapsync.producer import ResilientProducer
from heapsync.settings import Account, Settings
from ingest import metrics
from ingest.app import INGRESS_KEY, AdminExtension, create_admin_app, create_app

log = logging.getLogger("heapsync.ingest")

LINGERING_SECONDS = 2.0
"""After a 413 the unread rest of a body is drained this long at most (aiohttp's default is 10 s)."""


def producer(settings: Settings) -> ResilientProducer:
    """Bounded local queue (full -> 503) and a short linger: a request waits for its record's ack."""
    return ResilientProducer.connect(
        settings.kafka_bootstrap, delivery_timeout_s=settings.produce_timeout_seconds,
        extra={"queue.buffering.max.kbytes": settings.ingest_queue_max_kbytes, "linger.ms": settings.ingest_linger_ms},
        on_replace=metrics.PRODUCER_RESTARTS.inc)


def build(settings: Settings, accounts: dict[str, Account], admin: Sequence[AdminExtension] = ()) -> web.Application:
    producers = producer(settings)
    app = create_app(settings, accounts, producers)

    async def start_draining(app: web.Application) -> None:
        app[INGRESS_KEY].draining = True
        log.info("ingress draining: no new connections, finishing requests in flight")

    async def close_producer(_: web.Application) -> None:
        remaining = producers.close(timeout=settings.produce_timeout_seconds)
        log.info("producer flushed", extra={"undelivered": remaining})

    app.on_shutdown.append(start_draining)
    app.on_cleanup.append(close_producer)
    if settings.admin_port:
        add_admin_listener(app, settings, admin)
    return app


def add_admin_listener(app: web.Application, settings: Settings, admin: Sequence[AdminExtension] = ()) -> None:
    """Serve the admin app (``ingest.app.create_admin_app``) on its own address, started and stopped with ``app``.

    The public port then carries only what Heap and a load balancer need; metrics, the status
    page and the OpenAPI document stay on an address the operator chooses (loopback by default).
    """
    runner = web.AppRunner(create_admin_app(settings, app[INGRESS_KEY], admin), access_log=None)

    async def start_admin(_: web.Application) -> None:
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.admin_host, settings.admin_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"admin listener cannot start (HEAPSYNC_ADMIN_HOST / HEAPSYNC_ADMIN_PORT): "
                                     f"{exc.strerror or exc}") from exc
        log.info("admin listener", extra={"host": settings.admin_host, "port": settings.admin_port})

    async def stop_admin(_: web.Application) -> None:
        await runner.cleanup()

    app.on_startup.append(start_admin)
    app.on_cleanup.append(stop_admin)


def tune_gc() -> None:
    """Keep the cyclic GC off the hot path.

    Profiling the benchmark showed a fifth of the CPU in ``gc_collect_main``: each page
    allocates many short-lived objects (pydantic validation), which triggered frequent
    collections that walked every long-lived object (modules, schemas, metrics). Freezing
    what exists after start-up takes those out of every later collection, and a higher
    first threshold makes young collections rarer. Request objects do not form lasting
    cycles, so memory stays bounded (the benchmark records peak RSS).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop (a dependency; MagicStack's libuv loop, the one aiohttp's docs suggest for servers), else asyncio's.

    An A/B in the ingest benchmark measured about 10% less CPU per page (BENCHMARKS.md). Set
    HEAPSYNC_INGEST_UVLOOP=0 to run on asyncio's default loop (to compare, or to rule it out).
    """
    if os.environ.get("HEAPSYNC_INGEST_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(settings: Settings, accounts: dict[str, Account], admin: Sequence[AdminExtension] = ()) -> None:
    """Serve the ingress until a signal; ``admin`` extends the admin app (the CLI adds the status page)."""
    try:
        ensure_topics(settings, timeout=10.0)
    except Exception as exc:  # noqa: BLE001 - the ingress still serves 503s while the broker is away
        log.warning("could not ensure topics", extra={"error": str(exc)})
    app = build(settings, accounts, admin)
    tune_gc()
    log.info("ingress listening", extra={"host": settings.ingest_host, "port": settings.ingest_port,
                                        "accounts": len(accounts)})
    # in-flight requests wait at most the produce timeout; give them that plus a margin
    try:
        web.run_app(app, host=settings.ingest_host, port=settings.ingest_port, print=None, loop=event_loop(),
                    shutdown_timeout=settings.produce_timeout_seconds + 5.0, access_log=None,
                    lingering_time=LINGERING_SECONDS, handle_signals=True,
                    # bodies are decoded by ingest.body.read_body: bounded, and JSON errors when they do not decode
                    auto_decompress=False)
    except OSError as exc:  # an address taken or not ours (public or admin): one log line naming it, exit 1
        log.error("ingress cannot start", extra={"error": str(exc)})
        raise SystemExit(1) from None
    log.info("ingress stopped")
