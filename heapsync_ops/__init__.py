"""Operator tools above the stages: the ``heapsync`` command line, dead letters, replay, status and the status page."""
