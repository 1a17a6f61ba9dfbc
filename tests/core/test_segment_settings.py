"""Per-segment settings in the accounts file (issue 14, #2): ``[accounts.<id>.segments."<segment id>"]``
read, checked and looked up; the list-name rule with a pin. Pure; the chain is in tests/chain/test_segments.py."""

from __future__ import annotations

import pytest

from heapsync import naming
from heapsync.settings import (
    DEFAULT_SEGMENT,
    Account,
    AccountError,
    SegmentSettings,
    disabled_segments,
    parse_accounts,
    segment_settings,
)

SECRET = "0123456789abcdef-secret"
BASE = f'[accounts.acme]\nheap_webhook_secrets = ["{SECRET}"]\ncordial_api_key = "k"\n'


def accounts(segments: str = "") -> dict[str, Account]:
    return parse_accounts(BASE + segments, "accounts.toml")


# -- the accounts file -------------------------------------------------------------


def test_segment_tables_are_read_and_looked_up_by_string_or_integer_id() -> None:
    acc = accounts('[accounts.acme.segments."15225086"]\nlist_name = "Customers"\nenabled = false\n'
                   'max_removal_fraction = 0.2\nhold_drains = true\n')
    seg = acc["acme"].segment(15225086)
    assert seg == SegmentSettings(list_name="Customers", enabled=False, max_removal_fraction=0.2, hold_drains=True)
    assert acc["acme"].segment("15225086") is seg
    assert acc["acme"].segment("other") == DEFAULT_SEGMENT
    assert segment_settings(acc, "nobody", "15225086") == DEFAULT_SEGMENT
    assert DEFAULT_SEGMENT.enabled and DEFAULT_SEGMENT.list_name is None
    assert disabled_segments(acc) == [{"account": "acme", "segment_id": "15225086", "list_name": "Customers"}]


def test_whole_fractions_are_accepted() -> None:
    assert accounts('[accounts.acme.segments."1"]\nmax_removal_fraction = 1\n')["acme"].segment(1).max_removal_fraction == 1


@pytest.mark.parametrize(("line", "named"), [
    ("lsit_name = \"X\"", "segments.1.lsit_name: Extra inputs are not permitted"),
    ("max_removal_fraction = 1.5", "segments.1.max_removal_fraction"),
    ("max_removal_fraction = -0.1", "segments.1.max_removal_fraction"),
    ("max_removal_fraction = true", "segments.1.max_removal_fraction"),
    ("max_removal_fraction = \"10%\"", "segments.1.max_removal_fraction"),
    ("hold_drains = \"yes\"", "segments.1.hold_drains: Value error, must be true or false"),
    ("enabled = 0", "segments.1.enabled: Value error, must be true or false"),
    ("list_name = \"My List\"", "segments.1.list_name"),
    ("list_name = \"\"", "segments.1.list_name"),
])
def test_a_bad_segment_key_is_an_error_naming_account_segment_and_key(line: str, named: str) -> None:
    with pytest.raises(AccountError) as err:
        accounts(f'[accounts.acme.segments."1"]\n{line}\n')
    assert f"accounts.toml: accounts.acme: {named}" in str(err.value)


# -- list names -----------------------------------------------------------------------


def test_list_name_for_uses_the_pin_else_the_segment_name() -> None:
    assert naming.list_name_for("Heap Test Segment") == "HeapTestSegment"
    assert naming.list_name_for("Heap Test Segment", None) == "HeapTestSegment"
    assert naming.list_name_for("Renamed in Heap", "Customers") == "Customers"


def test_a_segments_rail_keys_replace_the_accounts_and_the_rest_inherit_them() -> None:
    from heapsync.settings import RemovalRail, removal_rail_for

    acc = parse_accounts(BASE.replace('cordial_api_key = "k"\n', 'cordial_api_key = "k"\nmax_removal_fraction = 0.5\n')
                         + '[accounts.acme.segments."7"]\nmax_removal_fraction = 0.0\n'
                         + '[accounts.acme.segments."8"]\nhold_drains = true\n', "accounts.toml")["acme"]
    assert removal_rail_for(acc, "7") == RemovalRail(max_removal_fraction=0.0, hold_drains=False)
    assert removal_rail_for(acc, "8") == RemovalRail(max_removal_fraction=0.5, hold_drains=True)
    assert removal_rail_for(acc, "9") == RemovalRail(max_removal_fraction=0.5, hold_drains=False)
    assert removal_rail_for(acc, "7").on and not removal_rail_for(accounts()["acme"], "7").on
