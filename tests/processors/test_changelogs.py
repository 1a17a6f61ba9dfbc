"""The worker's changelog topics exist before it joins its group (a first start on a fresh Kafka raced without it)."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from heapsync.kafka import client_config
from heapsync.settings import Settings
from heapsync_dev.apache_kafka import KafkaCluster
from processors.worker import create_app, declare_changelogs
from tests.conftest import Broker

pytestmark = pytest.mark.integration


def test_changelogs_are_created_ahead_with_the_tables_partitions_and_compaction(broker: Broker) -> None:
    group = f"t{uuid.uuid4().hex[:10]}-assembler"
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=group[:11], topic_partitions=3,
                        processor_group=group, processor_store="memory://")
    app = create_app(settings)
    names = {t.changelog_topic.get_topic_name() for t in app.tables.values()}
    assert names and all(n.startswith(group) and n.endswith("-changelog") for n in names)

    assert set(declare_changelogs(app, settings)) == names
    assert declare_changelogs(app, settings) == []  # a second worker finds them there

    admin = AdminClient(client_config(broker.bootstrap))
    topics = admin.list_topics(timeout=10).topics
    assert all(len(topics[n].partitions) == 3 for n in names)
    if isinstance(broker, KafkaCluster):  # Apache Kafka reports topic configs exactly
        for res, fut in admin.describe_configs([ConfigResource("topic", n) for n in names]).items():
            assert fut.result(10)["cleanup.policy"].value == "compact", res
