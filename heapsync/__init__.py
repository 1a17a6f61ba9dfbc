"""heapsync: Heap segment syncs -> Kafka -> Faust -> Cordial lists."""

__version__ = "0.1.0"
