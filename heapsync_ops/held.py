"""``heapsync held``: list, show, release and discard the deltas the removal rail holds.

Reads the sink's compacted lists topic (:mod:`heapsync.held`); a decision is one
:class:`HoldDecision` record on it, which the sink owning the list's partition carries out.
"""

from __future__ import annotations

from typing import Any

from heapsync.contracts import HoldDecision
from heapsync.held import ListsState, decision_key, hold_id
from heapsync.topic_reader import read_topic


class HoldError(ValueError):
    """The delta is not held (unknown, already decided, or waiting behind another hold)."""


def load_state(settings: Any, sink: str = "cordial") -> ListsState:
    state = ListsState(sink, keep_ids=False)  # shows and decides: sizes only, never the held contact ids
    for record in read_topic(settings.kafka_bootstrap, settings.topics.sink_lists, idle_timeout=10.0):
        if record.key is not None:
            state.feed(record.key.decode("utf-8", "replace"), record.value)
    return state


def matches(row: dict[str, Any], name: str) -> bool:
    """``DELTA_ID`` names the original delta, ``DELTA_ID@REPLAY_ID`` a ``heapsync replay`` copy of it
    (the delta id may be a prefix of at least 6 characters; the replay id is given whole)."""
    delta_id, _, replay_id = name.partition("@")
    return (row["replay_id"] or "") == replay_id and (
        row["delta_id"] == delta_id or (len(delta_id) >= 6 and row["delta_id"].startswith(delta_id)))


def find(state: ListsState, delta_id: str) -> dict[str, Any]:
    """The hold named ``DELTA_ID`` or ``DELTA_ID@REPLAY_ID`` (:func:`matches`), with what waits behind it."""
    rows = [r for r in state.holds() if matches(r, delta_id)]
    if len(rows) > 1:
        raise HoldError(f"{delta_id!r} matches {len(rows)} held deltas; give more of the id")
    if not rows:
        for queue in state.pending.values():
            for chunk in queue.values():
                if matches({"delta_id": chunk.delta.delta_id, "replay_id": chunk.delta.replay_id}, delta_id):
                    heads = [r["hold"] for r in state.holds()
                             if (r["account"], r["list_name"]) == (chunk.delta.account, chunk.delta.list_name)]
                    name = hold_id(chunk.delta.delta_id, chunk.delta.replay_id)
                    raise HoldError(f"delta {name} is not held itself: it waits behind "
                                    f"{', '.join(heads) or 'a hold being carried out'}; decide that one first")
        raise HoldError(f"no held delta {delta_id!r} (see `heapsync held list`)")
    row = dict(rows[0])
    row["waiting_detail"] = state.waiting_behind(row["hold"])
    return row


def outcome(row: dict[str, Any], action: str) -> str:
    """What the decision does, in one sentence, for the operator."""
    waiting = len(row["waiting_deltas"])
    behind = (f"then the {waiting} delta(s) waiting behind it are applied in order, each checked by the rail again"
              if waiting else "nothing waits behind it")
    if action == "release":
        return f"the sink applies delta {row['hold']} to {row['list_name']}; {behind}"
    return f"delta {row['hold']} is dropped: never applied to {row['list_name']}; {behind}"


def decide(settings: Any, delta_id: str, action: str, sink: str = "cordial") -> dict[str, Any]:
    """Write the decision on the lists topic; the sink owning the list carries it out."""
    from heapsync.producer import ResilientProducer

    state = load_state(settings, sink)
    row = find(state, delta_id)
    if row["decision"] is not None:
        raise HoldError(f"delta {row['hold']} already has a decision ({row['decision']}); the sink is carrying "
                        "it out")
    decision = HoldDecision(sink=sink, delta_id=row["delta_id"], replay_id=row["replay_id"], account=row["account"],
                            list_name=row["list_name"],
                            action="release" if action == "release" else "discard")
    producer = ResilientProducer.connect(settings.kafka_bootstrap)
    try:
        producer.send_nowait(settings.topics.sink_lists, decision.model_dump_json().encode(),
                             decision_key(sink, row["hold"]).encode())
        if producer.flush(30) != 0:
            raise HoldError("the decision could not be written to the broker; nothing was decided")
    finally:
        producer.close()
    return {"hold": row["hold"], "delta_id": row["delta_id"], "replay_id": row["replay_id"],
            "account": row["account"], "list_name": row["list_name"],
            "action": decision.action, "waiting_deltas": row["waiting_deltas"], "outcome": outcome(row, action)}
