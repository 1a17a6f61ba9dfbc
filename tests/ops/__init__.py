"""The operator tools (heapsync_ops/): the CLI, dead letters, replay, status and the status page."""
