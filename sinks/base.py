"""The names a sink is written against, in one import (kept for code that imports ``sinks.base``).

What a sink implements lives in :mod:`sinks.protocol`; the Kafka loop that runs it in :mod:`sinks.runner`.
"""

from sinks.protocol import ChunkResult, DeadLetters, DeltaSink
from sinks.runner import SinkRunner, make_runner

__all__ = ["ChunkResult", "DeadLetters", "DeltaSink", "SinkRunner", "make_runner"]
