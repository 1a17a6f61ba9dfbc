"""The accounts file: what users write, and the errors they get when it is wrong."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

import pytest

from heapsync.settings import MIN_SECRET_LENGTH, AccountError, Settings, load_accounts, parse_accounts

OLD, NEW, SINGLE = "old-webhook-secret-1", "new-webhook-secret-2", "single-webhook-secret"

GOOD = f"""
[accounts.acme]
heap_webhook_secrets = ["{OLD}", "{NEW}"]
cordial_api_key = "key"
cordial_base_url = "https://api.usw2.cordial.io/v2/"

[accounts.beta]
heap_webhook_secrets = "{SINGLE}"
cordial_api_key_env = "BETA_KEY"
"""


def test_accounts_file_parses_tables_and_rotation() -> None:
    accounts = parse_accounts(GOOD)
    assert set(accounts) == {"acme", "beta"}
    assert accounts["acme"].secrets() == [OLD.encode(), NEW.encode()]
    assert accounts["acme"].cordial_base_url == "https://api.usw2.cordial.io/v2"
    assert accounts["beta"].secrets() == [SINGLE.encode()]
    assert accounts["beta"].cordial_base_url == "https://api.cordial.io/v2"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    beta = parse_accounts(GOOD)["beta"]
    with pytest.raises(AccountError, match="BETA_KEY"):
        beta.api_key()
    monkeypatch.setenv("BETA_KEY", "from-env")
    assert beta.api_key() == "from-env"


def test_secrets_are_not_shown_in_repr() -> None:
    acme = parse_accounts(GOOD)["acme"]
    assert OLD not in repr(acme) and "key'" not in repr(acme)


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


def account(account_id: str, *secrets: str) -> str:
    listed = ", ".join(f'"{s}"' for s in secrets)
    return f'[accounts.{account_id}]\nheap_webhook_secrets = [{listed}]\ncordial_api_key = "k"\n'


@pytest.mark.parametrize("secrets, message", [
    ((OLD, ""), "acme: heap_webhook_secrets entry 2 of 2 is empty"),
    (("   ",), "acme: heap_webhook_secrets entry 1 of 1 is empty"),
    (("s3cret", NEW), "acme: heap_webhook_secrets entry 1 of 2 is too short: .* at least 16 characters"),
    (("x" * (MIN_SECRET_LENGTH - 1),), "too short"),
    ((" " * 8 + "x" * (MIN_SECRET_LENGTH - 1) + " " * 8,), "too short"),  # padding does not count
])
def test_empty_and_short_secrets_are_refused_naming_the_account(secrets: tuple[str, ...], message: str) -> None:
    with pytest.raises(AccountError, match=message) as err:
        parse_accounts(account("beta", SINGLE) + account("acme", *secrets))
    assert all(s not in str(err.value) for s in secrets if s.strip())


def test_a_secret_of_the_minimum_length_loads() -> None:
    assert parse_accounts(account("acme", "x" * MIN_SECRET_LENGTH))["acme"].secrets() == [b"x" * MIN_SECRET_LENGTH]


def test_a_secret_shared_by_two_accounts_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(account("acme", OLD, NEW) + account("beta", SINGLE) + account("gamma", "other-secret-0003", NEW))
    with pytest.raises(AccountError, match="accounts 'acme' and 'gamma' share a webhook secret") as err:
        load_accounts(path)
    assert NEW not in str(err.value) and str(path) in str(err.value)


def test_secrets_that_sign_alike_count_as_shared() -> None:
    # HMAC pads a short key with zero bytes: OLD and OLD + NUL sign exactly the same requests
    padded = OLD + "\0"
    assert hmac.new(OLD.encode(), b"body", "sha256").digest() == hmac.new(padded.encode(), b"body", "sha256").digest()
    with pytest.raises(AccountError, match="accounts 'acme' and 'beta' share a webhook secret"):
        parse_accounts(account("acme", OLD) + account("beta", OLD + "\\u0000"))


def test_one_secret_listed_twice_in_one_account_loads() -> None:
    assert parse_accounts(account("acme", OLD, OLD))["acme"].secrets() == [OLD.encode()] * 2


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


def documentation() -> str:
    """README.md and every docs/ page: what a user reads."""
    root = Path(__file__).resolve().parent
    while not (root / "pyproject.toml").exists():
        root = root.parent
    return "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])


def test_every_setting_is_named_in_the_docs() -> None:
    """Docs that match the code: each environment variable appears in README.md or docs/ (``A_HOST``/``_PORT`` counts)."""
    readme = documentation()
    named = set(re.findall(r"HEAPSYNC_[A-Z0-9_]+", readme))
    for stem, _, sibling in re.findall(r"`(HEAPSYNC_[A-Z0-9_]+)_([A-Z0-9]+)`\s*/\s*`_([A-Z0-9_]+)`", readme):
        named.add(f"{stem}_{sibling}")
    every = sorted(f"HEAPSYNC_{name.upper()}" for name in Settings.model_fields)
    assert [name for name in every if name not in named] == []


@pytest.mark.parametrize("name", ["accounts.example.toml", "accounts.demo.toml"])
def test_shipped_accounts_files_load(name: str) -> None:
    assert load_accounts(Path(__file__).resolve().parents[2] / "deploy" / name)


def test_documented_accounts_example_loads() -> None:
    readme = documentation()
    [example] = re.findall(r"```toml\n(\[accounts\.acme\].*?)```", readme, re.S)
    assert parse_accounts(example)["acme"].secrets() == [b"the-secret-from-heap"]
