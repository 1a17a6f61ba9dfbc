"""What deploy/ ships: compose file, Dockerfile, Prometheus alerts and the Grafana dashboard."""
