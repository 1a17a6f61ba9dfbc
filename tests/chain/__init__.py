"""The whole chain across stages: end to end, replayed drains, Apache Kafka faults."""
