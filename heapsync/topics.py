"""Topic names, defined once. A deployment can prefix them (``HEAPSYNC_TOPIC_PREFIX``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str = "heapsync"

    @property
    def pages(self) -> str:
        """Accepted Heap requests, keyed by account and segment."""
        return f"{self.prefix}.pages"

    @property
    def rejected(self) -> str:
        """Signed requests the ingress could not take (invalid, unknown action)."""
        return f"{self.prefix}.pages.rejected"

    @property
    def deltas(self) -> str:
        """The public contract: net membership deltas per Cordial list."""
        return f"{self.prefix}.deltas"

    @property
    def assembler_dlq(self) -> str:
        """Syncs the assembler gave up on (timeout policy 'dead-letter')."""
        return f"{self.prefix}.deltas.dlq"

    @property
    def sink_dlq(self) -> str:
        """Cordial operations that failed for good."""
        return f"{self.prefix}.sink.dlq"

    @property
    def sink_progress(self) -> str:
        """Compacted: one AppliedChunk per applied chunk and sink (repeat detection, status)."""
        return f"{self.prefix}.sink.progress"

    @property
    def sink_lists(self) -> str:
        """Compacted, never expired: per-list state of each sink (member counts, held chunks, hold decisions)."""
        return f"{self.prefix}.sink.lists"

    @property
    def dlq_redrive(self) -> str:
        """Compacted: one record per re-driven dead-letter entry (``heapsync dlq redrive``), so none is re-driven twice."""
        return f"{self.prefix}.dlq.redrive"

    def dead_letter_topics(self) -> dict[str, str]:
        """The dead-letter topics by the short name ``heapsync dlq --topic`` uses."""
        return {"rejected": self.rejected, "assembler": self.assembler_dlq, "sink": self.sink_dlq}

    def all(self) -> list[str]:
        return [self.pages, self.rejected, self.deltas, self.assembler_dlq, self.sink_dlq, self.sink_progress,
                self.dlq_redrive, self.sink_lists]
