"""The bulk path: one Cordial contact import per delta chunk.

Why per chunk: a chunk is the unit the runner commits and records, so an import
per chunk keeps "offset committed only when every operation is applied or
dead-lettered" without holding chunks back; chunks of one delta touch disjoint
ids, so the runner runs several imports of one delta at once. The CSV is served
by the sink itself at an expiring signed URL (:mod:`sinks.filehost`); the job is
followed to Done; rejected rows go to the dead-letter topic. When the import API
is refused, fails or times out, the chunk falls back to the REST path (same
result, slower), so nothing depends on the guessed import body being right.
"""

from __future__ import annotations

import asyncio
import logging
import time

from heapsync.contracts import Delta
from heapsync.settings import Settings
from sinks import cordial_import, metrics
from sinks.cordial_client import CordialClient, CordialError
from sinks.filehost import SignedFileHost
from sinks.operations import Operation, delta_ref
from sinks.protocol import DeadLetters

log = logging.getLogger("heapsync.sink.cordial.bulk")


class BulkImporter:
    def __init__(self, files: SignedFileHost, dead_letters: DeadLetters, settings: Settings) -> None:
        self.files = files
        self.dead_letters = dead_letters
        self.poll_seconds = settings.sink_import_poll_seconds
        self.timeout = settings.sink_import_timeout_seconds

    async def apply(self, client: CordialClient, delta: Delta, ops: list[Operation]) -> int | None:
        """Import the chunk; returns how many rows were dead-lettered, or None when the
        import could not be used (the caller then applies the chunk through the REST API)."""
        if not ops:
            return 0
        ref = delta_ref(delta)
        account = client.account.id
        try:
            await client.ensure_list(delta.list_name)  # a list column must name an existing list
        except CordialError:
            return None  # the REST path dead-letters each operation with Cordial's answer
        token, url = await self.files.publish(cordial_import.render_csv(ops))
        try:
            try:
                _, answer = await client.request("POST", "/contactimports",
                                                 cordial_import.import_request(url, client.account),
                                                 pause_on_auth=False)
                job_id = cordial_import.job_id_from(answer)
            except (CordialError, ValueError) as exc:
                metrics.IMPORTS.labels(account, "refused").inc()
                log.warning("contact import refused", extra={**ref, "status": getattr(exc, "status", None)})
                return None
            state = await self._follow(client, job_id)
            metrics.IMPORTS.labels(account, state.status if state else "timeout").inc()
            if state is None or state.status != cordial_import.DONE:
                log.warning("contact import did not finish", extra={
                    **ref, "job_id": job_id, "status": state.status if state else "timeout",
                    "message": state.message if state else ""})
                return None
        finally:
            self.files.withdraw(token)
        return await self._dead_letter_rejected(delta, ops, job_id, state, ref)

    async def _follow(self, client: CordialClient, job_id: str) -> cordial_import.JobState | None:
        deadline = time.monotonic() + self.timeout
        wait = self.poll_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(wait)
            try:
                _, answer = await client.request("GET", f"/jobs/{job_id}")
            except CordialError as exc:
                log.warning("cannot follow the import job", extra={"job_id": job_id, "status": exc.status})
                return None
            state = cordial_import.job_state_from(answer)
            if state.final:
                return state
            wait = min(wait * 1.5, 5.0)
        return None

    async def _dead_letter_rejected(self, delta: Delta, ops: list[Operation], job_id: str,
                                    state: cordial_import.JobState, ref: dict[str, object]) -> int:
        account = delta.account
        adds = sum(1 for op in ops if op.kind == "add")
        metrics.OPERATIONS.labels(account, "add", "imported").inc(adds)
        metrics.OPERATIONS.labels(account, "remove", "imported").inc(len(ops) - adds)
        if state.rejected == 0 and not state.rejected_rows:
            return 0
        listed = 0
        for row in state.rejected_rows:
            listed += 1
            await self.dead_letters.send("cordial import rejected the row", {
                **ref, "job_id": job_id, "operation": "import", "row": row, "status": 422,
                "contact_id": row.get("value") or row.get("id") or row.get("identifier"),
                "response": row.get("message") or row.get("error"),
            }, delta.delta_id)
        if state.rejected > listed:
            await self.dead_letters.send("cordial import rejected rows", {
                **ref, "job_id": job_id, "operation": "import", "rejected": state.rejected - listed,
                "response": "Cordial did not list the rejected rows; see the job in Cordial",
            }, delta.delta_id)
        metrics.OPERATIONS.labels(account, "import", "dead_lettered").inc(max(state.rejected, listed))
        return max(state.rejected, listed)
