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

    def all(self) -> list[str]:
        return [self.pages, self.rejected, self.deltas, self.assembler_dlq, self.sink_dlq, self.sink_progress]
