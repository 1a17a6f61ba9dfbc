"""Everything about Cordial's contact-import API that is *unknown* or guessed, in one place.

Known (Cordial's help centre, "Contact imports API"): ``POST /v2/contactimports``
starts an asynchronous job that fetches a CSV/TSV file from an external location
(HTTP(S), SFTP, S3); column headers are contact attribute keys (the email column is
``channels.email.address``) and list names, a list column holds 1/0; a ``subscribe``
parameter set to false leaves subscribe status unchanged; the answer carries a job
id, and ``GET /v2/jobs/{id}`` reports Scheduled/Pending/Processing/Failed/Done with
inserted/updated/rejected counts.

Unknown, and guessed here (change only this module when Cordial's answer differs):

- the request body's field names (:func:`import_request`);
- where the job id is in the answer (:func:`job_id_from`);
- the job document's field names and whether it lists rejected rows
  (:func:`job_state_from`);
- whether a 0 in a list column creates a contact that did not exist.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from heapsync.settings import Account
from sinks.operations import Operation

DONE, FAILED = "Done", "Failed"
FINAL = {DONE, FAILED}


def identifier_column(identity_key: str) -> str:
    """The CSV header naming the contact: the email channel, or the account's secondary key."""
    return "channels.email.address" if identity_key == "email" else identity_key


def render_csv(ops: list[Operation]) -> bytes:
    """Header ``<identifier>,<list>`` then one row per contact: 1 = member, 0 = not."""
    if not ops:
        return b""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([identifier_column(ops[0].identity_key), ops[0].list_name])
    writer.writerows((op.contact_id, 1 if op.kind == "add" else 0) for op in ops)
    return buf.getvalue().encode()


def import_request(url: str, account: Account) -> dict[str, Any]:
    """The body of ``POST /contactimports`` (guessed field names, see module doc).

    ``subscribe: false`` keeps subscribe status unchanged, as the membership sync must,
    unless the account explicitly asks for a status."""
    body: dict[str, Any] = {
        "source": {"transport": "https" if url.startswith("https") else "http", "url": url},
        "hasHeader": True,
        "subscribe": False,
    }
    if account.subscribe_status is not None:
        body["subscribe"] = True
        body["subscribeStatus"] = account.subscribe_status
    return body


def job_id_from(answer: Any) -> str:
    if isinstance(answer, dict):
        for key in ("jobID", "jobId", "job_id", "_id", "id"):
            if answer.get(key) not in (None, ""):
                return str(answer[key])
    raise ValueError("no job id in the contact import answer")


@dataclass
class JobState:
    status: str
    inserted: int = 0
    updated: int = 0
    rejected: int = 0
    rejected_rows: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def job_state_from(answer: Any) -> JobState:
    doc: dict[str, Any] = answer if isinstance(answer, dict) else {}
    results: dict[str, Any] = doc["results"] if isinstance(doc.get("results"), dict) else doc
    rows = results.get("errors") or results.get("rejectedRows") or []
    return JobState(
        status=str(doc.get("status") or doc.get("state") or "Unknown").capitalize(),
        inserted=_int(results.get("inserted")),
        updated=_int(results.get("updated")),
        rejected=_int(results.get("rejected")),
        rejected_rows=[r for r in rows if isinstance(r, dict)],
        message=str(doc.get("message") or doc.get("messages") or "")[:500],
    )
