"""The pure delta -> Cordial operations mapping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from heapsync.contracts import Delta
from heapsync.settings import Account
from sinks import operations
from sinks.operations import Operation, estimated_operations, plan, use_bulk


def account(**kw: object) -> Account:
    return Account(id="acme", heap_webhook_secrets=["s"], cordial_api_key="k", **kw)


def delta(**kw: object) -> Delta:
    base: dict[str, object] = dict(delta_id="d1", account="acme", segment_id="1", segment_name="Seg",
                                   list_name="Seg", identity_field="email", kind="sync")
    base.update(kw)
    return Delta(**base)


def test_email_ids_map_to_the_email_channel_and_path() -> None:
    ops = plan(delta(add=["a@b.co"], remove=["x+y@b.co"]), account())
    remove, add = ops
    assert add.body(account()) == {"channels": {"email": {"address": "a@b.co"}}, "Seg": True}
    assert remove.body(account()) == {"Seg": False}
    assert remove.contact_path() == "email:x%2By%40b.co"


def test_other_identity_field_uses_the_accounts_key_or_the_field_name() -> None:
    d = delta(identity_field="user_id", add=["42"], remove=["7/8"])
    remove, add = plan(d, account(cordial_identity_key="cid"))
    assert add.body(account()) == {"cid": "42", "Seg": True}
    assert remove.contact_path() == "cid:7%2F8"
    remove, add = plan(d, account())
    assert add.identity_key == "user_id" and remove.contact_path() == "user_id:7%2F8"


def test_subscribe_status_is_sent_only_when_the_account_asks() -> None:
    op = Operation("add", "Seg", "a@b.co")
    assert "subscribeStatus" not in str(op.body(account())) and "forceSubscribe" not in str(op.body(account()))
    body = op.body(account(subscribe_status="subscribed"))
    assert body["channels"]["email"] == {"address": "a@b.co", "subscribeStatus": "subscribed"}
    assert Operation("remove", "Seg", "a@b.co").body(account(subscribe_status="subscribed")) == {"Seg": False}


def test_drain_is_one_clear() -> None:
    assert plan(delta(kind="drain"), account()) == [Operation("clear", "Seg")]


@given(st.lists(st.emails(), unique=True, max_size=30), st.lists(st.emails(), unique=True, max_size=30))
def test_every_id_becomes_exactly_one_operation_and_no_body_touches_subscribe_status(
        add: list[str], remove: list[str]) -> None:
    remove = [r for r in remove if r not in add]
    ops = plan(delta(add=add, remove=remove), account())
    assert sorted(o.contact_id for o in ops if o.kind == "add") == sorted(add)
    assert sorted(o.contact_id for o in ops if o.kind == "remove") == sorted(remove)
    for o in ops:
        body = o.body(account())
        assert "forceSubscribe" not in body and "subscribeStatus" not in body.get("channels", {}).get("email", {})


def test_bulk_decision_is_the_same_for_every_chunk_of_a_delta() -> None:
    full = [f"u{i}@x.co" for i in range(5000)]
    chunks = [delta(chunk=n, chunks=3, add=full if n < 3 else full[:10]) for n in (1, 2, 3)]
    assert {use_bulk(c, 10_000, 5000) for c in chunks} == {True}
    two = [delta(chunk=n, chunks=2, add=full if n < 2 else full[:10]) for n in (1, 2)]
    assert {use_bulk(c, 10_000, 5000) for c in two} == {False}
    assert estimated_operations(delta(add=full), 5000) == 5000
    assert not use_bulk(delta(kind="drain", chunks=9), 10, 5000)


def test_delta_ref_carries_no_contact_ids() -> None:
    ref = operations.delta_ref(delta(add=["secret@x.co"]))
    assert "secret@x.co" not in str(ref) and ref["chunk_key"] == "d1:1"
