"""Dev and test tooling, which the production image does not carry: the embedded broker, Apache Kafka
for tests, the demo pipeline and the Cordial simulator."""
