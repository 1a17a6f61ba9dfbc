"""The accounts file: what users write, and the errors they get when it is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from heapsync.settings import AccountError, Settings, load_accounts, parse_accounts

GOOD = """
[accounts.acme]
heap_webhook_secrets = ["old", "new"]
cordial_api_key = "key"
cordial_base_url = "https://api.usw2.cordial.io/v2/"

[accounts.beta]
heap_webhook_secrets = "single"
cordial_api_key_env = "BETA_KEY"
"""


def test_accounts_file_parses_tables_and_rotation() -> None:
    accounts = parse_accounts(GOOD)
    assert set(accounts) == {"acme", "beta"}
    assert accounts["acme"].secrets() == [b"old", b"new"]
    assert accounts["acme"].cordial_base_url == "https://api.usw2.cordial.io/v2"
    assert accounts["beta"].secrets() == [b"single"]
    assert accounts["beta"].cordial_base_url == "https://api.cordial.io/v2"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    beta = parse_accounts(GOOD)["beta"]
    with pytest.raises(AccountError, match="BETA_KEY"):
        beta.api_key()
    monkeypatch.setenv("BETA_KEY", "from-env")
    assert beta.api_key() == "from-env"


def test_secrets_are_not_shown_in_repr() -> None:
    acme = parse_accounts(GOOD)["acme"]
    assert "old" not in repr(acme) and "key'" not in repr(acme)


@pytest.mark.parametrize("text, message", [
    ("not toml [", "not valid TOML"),
    ("[other]\nx = 1", "at least one"),
    ('[accounts.acme]\ncordial_api_key = "k"', "heap_webhook_secrets"),
    ('[accounts.acme]\nheap_webhook_secrets = ["s"]', "cordial_api_key"),
    ('[accounts."bad id"]\nheap_webhook_secrets = ["s"]\ncordial_api_key = "k"', "account id"),
    ('[accounts.acme]\nheap_webhook_secrets = ["s"]\ncordial_api_key = "k"\ntypo = 1', "typo"),
])
def test_invalid_accounts_files_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(AccountError, match=message):
        parse_accounts(text)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AccountError, match="cannot read accounts file"):
        load_accounts(tmp_path / "nope.toml")


def test_identity_key_mapping() -> None:
    acme = parse_accounts(GOOD)["acme"]
    assert acme.identity_key("email") == "email"
    assert acme.identity_key("user_id") == "user_id"
    custom = parse_accounts(GOOD.replace('cordial_api_key = "key"', 'cordial_api_key = "key"\ncordial_identity_key = "cid"'))
    assert custom["acme"].identity_key("user_id") == "cid"


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEAPSYNC_TOPIC_PREFIX", "prod")
    monkeypatch.setenv("HEAPSYNC_SYNC_TIMEOUT_SECONDS", "120")
    s = Settings()
    assert s.topics.pages == "prod.pages"
    assert s.sync_timeout_seconds == 120


def test_every_setting_is_named_in_the_readme() -> None:
    """Docs that match the code: each environment variable appears in README.md (``A_HOST``/``_PORT`` counts)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    named = set(re.findall(r"HEAPSYNC_[A-Z0-9_]+", readme))
    for stem, _, sibling in re.findall(r"`(HEAPSYNC_[A-Z0-9_]+)_([A-Z0-9]+)`\s*/\s*`_([A-Z0-9_]+)`", readme):
        named.add(f"{stem}_{sibling}")
    every = sorted(f"HEAPSYNC_{name.upper()}" for name in Settings.model_fields)
    assert [name for name in every if name not in named] == []
