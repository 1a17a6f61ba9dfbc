"""The dev tooling (heapsync_dev/): `heapsync dev`, the Cordial simulator, Apache Kafka, installs, bench wiring."""
