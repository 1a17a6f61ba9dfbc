"""``heapsync topics``: show every heapsync topic with the settings that matter for
replay (partitions, replication, retention, cleanup policy), and create missing
ones with explicit settings (:func:`heapsync.kafka.ensure_topics`).

A topic whose settings differ from what heapsync would create (e.g. a retention
shorter than ``HEAPSYNC_TOPIC_RETENTION_DAYS``) is flagged, not changed: altering
a production topic is the operator's decision.
"""

from __future__ import annotations

from typing import Any

from heapsync.kafka import client_config, topic_configs
from heapsync.settings import Settings

SHOWN = ("retention.ms", "cleanup.policy", "min.insync.replicas")


def human_retention(ms: str | None) -> str:
    if ms is None:
        return "?"
    try:
        value = int(ms)
    except ValueError:
        return ms
    if value < 0:
        return "forever"
    days = value / 86_400_000
    return f"{days:g}d" if days >= 1 else f"{value / 3_600_000:g}h"


def differences(wanted: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Settings heapsync asks for that the topic does not have (only those shown)."""
    out = []
    for name in SHOWN:
        want = wanted.get(name, "delete" if name == "cleanup.policy" else None)
        if want is not None and actual.get(name) is not None and actual[name] != want:
            out.append(f"{name}={actual[name]} (wanted {want})")
    return out


def describe(settings: Settings, *, create: bool = True, timeout: float = 15.0) -> list[dict[str, Any]]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from heapsync.kafka import ensure_topics, wait_until_led

    created = set(ensure_topics(settings, timeout=timeout)) if create else set()
    admin = AdminClient(client_config(settings.kafka_bootstrap))
    wait_until_led(admin, sorted(created), timeout)  # this client may ask a broker that learns of them later
    md = admin.list_topics(timeout=timeout)
    wanted = topic_configs(settings)
    rows: list[dict[str, Any]] = []
    for name, want in wanted.items():
        meta = md.topics.get(name)
        if meta is None or meta.error is not None:
            rows.append({"topic": name, "partitions": None, "replication": None, "retention": None,
                         "cleanup_policy": None,
                         "state": "created, not yet in the brokers' metadata" if name in created else "missing"})
            continue
        actual: dict[str, str] = {}
        try:
            fut = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name)], request_timeout=timeout)
            for res_future in fut.values():
                actual = {k: v.value for k, v in res_future.result(timeout).items() if v.value is not None}
        except KafkaException:
            pass
        first = meta.partitions.get(0)
        diff = differences(want, actual)
        rows.append({
            "topic": name,
            "partitions": len(meta.partitions),
            "replication": len(first.replicas) if first is not None else None,
            "retention": human_retention(actual.get("retention.ms")),
            "cleanup_policy": actual.get("cleanup.policy", "delete"),
            "state": "created" if name in created else ("differs: " + "; ".join(diff) if diff else "ok"),
        })
    return rows
