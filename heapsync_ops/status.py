"""``heapsync status``: what an operator asks first during an incident.

- consumer lag per group and partition (the assembler group on the pages topic,
  each sink group on the deltas topic): how far behind each stage is;
- open syncs: read from the assembler's ``syncs`` table changelog
  (``<processor_group>-syncs-changelog``), pages received of total and age;
- dead letters not yet re-driven, counted by reason;
- the last applied sync per list and sink (the sink progress topic);
- segments turned off in the accounts file (``enabled = false``) and the syncs skipped for them.

The summaries are pure functions over plain records (tested directly); only
:func:`gather` talks to Kafka. Records are read through their contract models
(``heapsync/contracts.py``: :class:`SyncMeta`, :class:`AppliedChunk`, :class:`DoneMarker`), which also
read what older workers wrote (``received`` as a list of page numbers).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from heapsync.contracts import (
    AppliedChunk,
    SyncMeta,
    account_of_sync_key,
    decode_json,
    read_done_marker,
    read_tolerant,
)
from heapsync.kafka import client_config
from heapsync.lag import LagUnknown, committed_offsets, partition_lag, topic_lag
from heapsync.settings import Account, Settings, disabled_segments
from heapsync.topic_reader import Record, latest_by_key, read_topic

NO_OFFSET = -1001  # librdkafka: the group has not committed this partition


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int


def lag_of(committed: int | None, low: int, high: int, newest_is_tick: bool = False) -> int:
    """Records the group still has to read; with nothing committed it starts at the earliest record.
    A newest record that is the worker's timer tick is not counted (:func:`heapsync.lag.partition_lag`)."""
    return partition_lag(high, committed, low, newest_is_tick)


def syncs_changelog(processor_group: str) -> str:
    """Faust names a table's changelog ``<app id>-<table>-changelog``; the app id is the processor group."""
    return f"{processor_group}-syncs-changelog"


def open_syncs(latest: dict[bytes, Record], now: float) -> list[dict[str, Any]]:
    """Open syncs from the latest changelog value per key, oldest first."""
    out = []
    for key, rec in latest.items():
        doc = decode_json(rec.value)
        meta = read_tolerant(SyncMeta, doc) if doc is not None else None
        try:
            name = orjson.loads(key)
        except orjson.JSONDecodeError:
            continue
        if meta is None:
            continue
        started = meta.started_at if meta.started_at is not None else rec.timestamp_ms / 1000
        out.append({
            "sync": name if isinstance(name, str) else str(name),
            "account": meta.account,
            "segment_id": meta.segment_id,
            "segment_name": meta.segment_name,
            "kind": meta.kind,
            "replay_id": meta.replay_id,
            "pages_received": meta.received,
            "total_pages": meta.total_pages,
            "age_seconds": round(max(0.0, now - started), 1),
        })
    return sorted(out, key=lambda s: -s["age_seconds"])


def last_applied(records: Iterable[Record]) -> list[dict[str, Any]]:
    """The latest applied chunk per sink and list, from AppliedChunk records (a chunk of a held delta an
    operator discarded was not applied: its record is skipped)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in records:
        doc = decode_json(rec.value)
        chunk = read_tolerant(AppliedChunk, doc) if doc is not None else None
        if chunk is None or chunk.discarded:
            continue
        d = chunk.model_dump(mode="json")
        k = (chunk.sink, chunk.account, chunk.list_name)
        prev = latest.get(k)
        if prev is None or d["applied_at"] >= prev["applied_at"]:
            latest[k] = d
    return [
        {"sink": s, "account": a, "list_name": lst, "sync_task_id": d["sync_task_id"],
         "delta_id": d["delta_id"], "chunk": f"{d['chunk']}/{d['chunks']}",
         "adds": d["adds"], "removes": d["removes"], "dead_lettered": d["dead_lettered"],
         "complete": d["complete"], "applied_at": d["applied_at"]}
        for (s, a, lst), d in sorted(latest.items())
    ]


def done_changelog(processor_group: str) -> str:
    """The assembler's ``done`` table changelog: what became of each emitted sync (see ``syncs_changelog``)."""
    return f"{processor_group}-done-changelog"


def disabled_with_skips(disabled: list[dict[str, Any]], latest_done: dict[bytes, Record]) -> list[dict[str, Any]]:
    """Each segment the accounts file turns off, with the syncs the assembler skipped for it (outcome "disabled"
    in its done markers, :class:`DoneMarker`, within the pages topic's retention) and when the last one was."""
    skipped: dict[tuple[str, str], list[float]] = {}
    for key, rec in latest_done.items():
        done = read_done_marker(rec.value)
        try:
            name = orjson.loads(key)
        except orjson.JSONDecodeError:
            continue
        if done is None or done.outcome != "disabled" or not isinstance(name, str):
            continue
        at = done.at if done.at is not None else rec.timestamp_ms / 1000
        skipped.setdefault((account_of_sync_key(name) or name, str(done.segment_id)), []).append(at)
    out = []
    for seg in disabled:
        times = skipped.get((str(seg["account"]), str(seg["segment_id"])), [])
        last = datetime.fromtimestamp(max(times), timezone.utc).isoformat() if times else None
        out.append({**seg, "syncs_skipped": len(times), "last_skipped_at": last})
    return out


# -- shell ----------------------------------------------------------------------


def consumer_groups(settings: Settings) -> dict[str, str]:
    """Group -> the topic it consumes."""
    groups = {settings.processor_group: settings.topics.pages, settings.sink_group: settings.topics.deltas}
    archive = getattr(settings, "archive_group", None)
    if archive:
        groups[archive] = settings.topics.deltas
    return groups


def group_lag(settings: Settings, timeout: float = 30.0) -> tuple[list[PartitionLag], dict[str, str]]:
    """Lag per group and partition, and the groups whose committed offsets could not be read (with why)."""
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer({**client_config(settings.kafka_bootstrap), "group.id": "heapsync-status-probe",
                      "enable.auto.commit": False, "enable.partition.eof": True})
    rows: list[PartitionLag] = []
    unknown: dict[str, str] = {}
    required = {settings.processor_group, settings.sink_group}
    try:
        for group, topic in consumer_groups(settings).items():
            meta = probe.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
            try:
                committed = committed_offsets(settings.kafka_bootstrap, group, tps, timeout)
            except LagUnknown as exc:
                # a lag computed without the committed offsets would be the whole topic: say so instead
                if group in required:
                    unknown[group] = str(exc)
                continue
            if group not in required and not any(c is not None and c >= 0 for c in committed.values()):
                continue  # an optional consumer (e.g. the archive sink) that has never run here
            lags = topic_lag(probe, topic, [tp.partition for tp in tps], committed, topic == settings.topics.pages,
                             timeout)
            for p, (end, n) in lags.items():
                c = committed.get(p)
                rows.append(PartitionLag(group, topic, p, None if c is None or c < 0 else c, end, n))
    finally:
        probe.close()
    return rows, unknown


def gather(settings: Settings, accounts: Mapping[str, Account] | None = None) -> dict[str, Any]:
    from heapsync_ops import dlq

    now = time.time()
    lag, lag_unknown = group_lag(settings)
    totals: dict[str, int] = {}
    for row in lag:
        totals[row.group] = totals.get(row.group, 0) + row.lag
    changelog = latest_by_key(read_topic(settings.kafka_bootstrap, syncs_changelog(settings.processor_group),
                                         idle_timeout=10.0))
    entries = dlq.load(settings)
    marks = dlq.load_marks(settings)
    applied = last_applied(read_topic(settings.kafka_bootstrap, settings.topics.sink_progress, idle_timeout=10.0))
    from heapsync_ops.held import load_state

    holds = load_state(settings).holds()
    disabled = disabled_segments(accounts or {})
    if disabled:  # the done markers are read only when a segment is turned off
        disabled = disabled_with_skips(disabled, latest_by_key(read_topic(
            settings.kafka_bootstrap, done_changelog(settings.processor_group), idle_timeout=10.0)))
    return {
        "at": now,
        "disabled_segments": disabled,
        "lag": [row.__dict__ for row in lag],
        "lag_total": totals,
        "lag_unknown": lag_unknown,
        "open_syncs": open_syncs(changelog, now),
        "dead_letters": dlq.counts_by_reason(entries, marks),
        "last_applied": applied,
        "held": holds,
    }
