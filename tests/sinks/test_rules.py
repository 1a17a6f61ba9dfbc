"""Pure rules of the sink: commit points, back-off, rate-limit headers, import body, signed URLs."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from heapsync.settings import Account
from sinks import cordial_import
from sinks.cordial_client import backoff_delay, low_remaining_hold, reset_seconds, retry_after_seconds
from sinks.filehost import sign, verify
from sinks.offsets import PartitionProgress
from sinks.operations import Operation


@given(st.integers(1, 60), st.data())
def test_commit_point_never_passes_an_unfinished_message(n: int, data: st.DataObject) -> None:
    p = PartitionProgress("t", 0)
    entries = [p.track(100 + i) for i in range(n)]
    order = data.draw(st.permutations(range(n)))
    for k, i in enumerate(order):
        entries[i].done = True
        point = p.commit_point()
        done = {order[j] for j in range(k + 1)}
        prefix = 0
        while prefix in done:
            prefix += 1
        assert point == (None if prefix == 0 else 100 + prefix)
    assert p.commit_point() == 100 + n


def test_due_only_when_the_point_moved() -> None:
    p = PartitionProgress("t", 0)
    a, b = p.track(5), p.track(6)
    b.done = True
    assert p.due() is None
    a.done = True
    assert p.due() == 7
    p.committed = 7
    assert p.due() is None


def test_backoff_grows_with_equal_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 20):
        step = min(60.0, 0.5 * 2 ** (attempt - 1))
        d = backoff_delay(attempt, 0.5, 60.0, rng)
        assert step / 2 <= d <= step
    # with the defaults (8 retries), an operation is dead-lettered only after > 60 s of failures
    assert sum(min(60.0, 0.5 * 2 ** (a - 1)) / 2 for a in range(1, 9)) > 60


def test_rate_limit_headers() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds({"Retry-After": "3"}, now) == 3
    assert retry_after_seconds({"X-Rate-Limit-Reset": "0.25"}, now) == 0.25
    assert retry_after_seconds({"X-Rate-Limit-Reset": str(now + 7)}, now) == 7
    assert retry_after_seconds({"X-Rate-Limit-Reset": str((now + 2) * 1000)}, now) == 2
    assert retry_after_seconds({}, now) is None
    assert reset_seconds("garbage", now) is None
    assert low_remaining_hold({"X-Rate-Limit-Remaining": "50", "X-Rate-Limit-Reset": "0.4"}, 8, now) is None
    assert low_remaining_hold({"X-Rate-Limit-Remaining": "3", "X-Rate-Limit-Reset": "0.4"}, 8, now) == 0.4


def test_import_csv_and_body() -> None:
    ops = [Operation("add", "Seg", "a@b.co"), Operation("remove", "Seg", "c,d@b.co")]
    assert cordial_import.render_csv(ops).decode() == 'channels.email.address,Seg\na@b.co,1\n"c,d@b.co",0\n'
    assert cordial_import.render_csv([Operation("add", "Seg", "42", "cid")]).decode() == "cid,Seg\n42,1\n"
    acct = Account(id="a", heap_webhook_secrets=["s"], cordial_api_key="k")
    body = cordial_import.import_request("https://h/x.csv", acct)
    assert body["source"] == {"transport": "https", "url": "https://h/x.csv"} and body["subscribe"] is False
    assert cordial_import.job_id_from({"jobID": "j1"}) == "j1"
    state = cordial_import.job_state_from({"status": "Done", "inserted": 2, "rejected": 1,
                                           "errors": [{"row": 3, "value": "bad"}]})
    assert state.final and state.rejected == 1 and state.rejected_rows[0]["value"] == "bad"


def test_signed_urls_expire_and_cannot_be_altered() -> None:
    key = b"k" * 32
    sig = sign(key, "/imports/abc.csv", 1000)
    assert verify(key, "/imports/abc.csv", "1000", sig, now=999)
    assert not verify(key, "/imports/abc.csv", "1000", sig, now=1001)
    assert not verify(key, "/imports/abd.csv", "1000", sig, now=999)
    assert not verify(key, "/imports/abc.csv", "2000", sig, now=999)
    assert not verify(b"other", "/imports/abc.csv", "1000", sig, now=999)
    assert not verify(key, "/imports/abc.csv", "x", sig, now=999)
