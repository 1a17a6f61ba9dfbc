"""Settings in one place: environment variables (``HEAPSYNC_*``) and the accounts file.

Every setting has a default that runs on one machine; production overrides
them through the environment (see docs/settings.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from heapsync.topics import Topics

ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

MIN_SECRET_LENGTH = 16
"""Shortest webhook secret the accounts file may hold (characters, leading/trailing spaces not counted).

Anyone who knows or guesses a secret can sign any request for its account: an empty secret
signs for everyone, a short one falls to a guess. Heap generates long random secrets.
"""


class AccountError(ValueError):
    """The accounts file is missing, unreadable or invalid."""


class SegmentSettings(BaseModel):
    """One segment's overrides (``[accounts.<id>.segments."<segment id>"]``); an unknown key is an error.

    The default (no table) is what Heap sends: list named after the segment, enabled, the
    account's removal rail.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    list_name: str | None = Field(
        None, description="Pins the Cordial list: a segment renamed in Heap keeps feeding this list."
    )
    enabled: bool = Field(
        True, description="false: pages are acknowledged and kept in the pages topic; nothing goes to Cordial."
    )
    # The removal rail resolves these in ``removal_rail_for(account, segment_id)``: a segment's value, when set,
    # replaces the account's.
    max_removal_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Removal-rail override for this segment (default: the account's)."
    )
    hold_drains: bool | None = Field(
        None, description="Removal-rail override for this segment (default: the account's)."
    )

    @field_validator("enabled", "hold_drains", mode="before")
    @classmethod
    def _a_bool(cls, v: object) -> object:
        # TOML has true/false: "no" or 0 here is a mistake to report, not a value to guess at
        if v is not None and not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v

    @field_validator("max_removal_fraction", mode="before")
    @classmethod
    def _a_number(cls, v: object) -> object:
        if isinstance(v, bool) or not (v is None or isinstance(v, (int, float))):
            raise ValueError("must be a number from 0 to 1 (a share of the list's members)")
        return v

    @field_validator("list_name")
    @classmethod
    def _usable_list_name(cls, v: str | None) -> str | None:
        # Cordial list names carry no whitespace (the segment-name rule removes it); a pinned one must not either
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError("must be a non-empty Cordial list name without whitespace")
        return v


DEFAULT_SEGMENT = SegmentSettings()


class Account(BaseModel):
    """One Cordial account fed by one Heap integration (one ``[accounts.<id>]`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    heap_webhook_secrets: list[SecretStr] = Field(min_length=1)
    cordial_api_key: SecretStr | None = None
    cordial_api_key_env: str | None = None
    cordial_base_url: str = "https://api.cordial.io/v2"
    cordial_identity_key: str | None = Field(
        None, description="Cordial contact key for ids that are not emails; default: the Heap field name."
    )
    subscribe_status: Literal["subscribed", "unsubscribed", "none"] | None = Field(
        None, description="Only when set is subscribeStatus sent with an add; default: never touched."
    )
    max_concurrency: int = Field(8, ge=1)
    rate_limit_per_second: float = Field(50.0, gt=0)
    max_removal_fraction: float | None = Field(
        None, ge=0, le=1, description="Hold a sync that would remove more than this share of the list's current "
        "members (the removal rail, heapsync/held.py); default: off."
    )
    hold_drains: bool = Field(False, description="Hold every drain of a list until an operator releases it.")
    segments: dict[str, SegmentSettings] = Field(
        default_factory=dict, description='Per-segment overrides, ``[accounts.<id>.segments."<segment id>"]``.'
    )

    @field_validator("heap_webhook_secrets", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("cordial_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _has_key_source(self) -> Account:
        if self.cordial_api_key is None and self.cordial_api_key_env is None:
            raise ValueError("set cordial_api_key or cordial_api_key_env")
        return self

    def api_key(self) -> str:
        """The Cordial API key, read from the environment when the file names a variable."""
        if self.cordial_api_key is not None:
            return self.cordial_api_key.get_secret_value()
        assert self.cordial_api_key_env is not None
        value = os.environ.get(self.cordial_api_key_env)
        if not value:
            raise AccountError(
                f"account {self.id!r}: environment variable {self.cordial_api_key_env} is not set"
            )
        return value

    def segment(self, segment_id: str | int) -> SegmentSettings:
        """The segment's overrides, or the defaults (Heap sends ids as strings or integers: both match)."""
        return self.segments.get(str(segment_id), DEFAULT_SEGMENT)

    def secrets(self) -> list[bytes]:
        return [s.get_secret_value().encode() for s in self.heap_webhook_secrets]

    def identity_key(self, identity_field: str) -> str:
        """The Cordial contact key that ids of ``identity_field`` are values of."""
        if identity_field == "email":
            return "email"
        return self.cordial_identity_key or identity_field


class RemovalRail(BaseModel):
    """The effective removal rail of one list: what :func:`removal_rail_for` returns."""

    model_config = ConfigDict(frozen=True)

    max_removal_fraction: float | None = None
    hold_drains: bool = False

    @property
    def on(self) -> bool:
        return self.max_removal_fraction is not None or self.hold_drains


def removal_rail_for(account: Account, segment_id: str) -> RemovalRail:
    """The removal rail for one segment of ``account``: its segment table's keys where set, else the account's."""
    seg = account.segment(segment_id)
    return RemovalRail(
        max_removal_fraction=(seg.max_removal_fraction if seg.max_removal_fraction is not None
                              else account.max_removal_fraction),
        hold_drains=seg.hold_drains if seg.hold_drains is not None else account.hold_drains)


def segment_settings(accounts: Mapping[str, Account], account_id: str, segment_id: str | int) -> SegmentSettings:
    """What the accounts file says about one segment: its table, or the defaults (also for an unknown account)."""
    account = accounts.get(account_id)
    return account.segment(segment_id) if account is not None else DEFAULT_SEGMENT


def disabled_segments(accounts: Mapping[str, Account]) -> list[dict[str, str | None]]:
    """Segments turned off in the accounts file (``enabled = false``), for ``heapsync status`` and the status page."""
    return [{"account": account_id, "segment_id": segment_id, "list_name": seg.list_name}
            for account_id, account in sorted(accounts.items())
            for segment_id, seg in sorted(account.segments.items()) if not seg.enabled]


def parse_accounts(text: str, source: str = "<accounts>") -> dict[str, Account]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccountError(f"{source}: not valid TOML: {exc}") from exc
    tables = doc.get("accounts")
    if not isinstance(tables, dict) or not tables:
        raise AccountError(f"{source}: needs at least one [accounts.<id>] table")
    accounts: dict[str, Account] = {}
    for account_id, table in tables.items():
        if not re.match(ACCOUNT_ID_PATTERN, account_id):
            raise AccountError(f"{source}: account id {account_id!r} must match {ACCOUNT_ID_PATTERN}")
        if not isinstance(table, dict):
            raise AccountError(f"{source}: accounts.{account_id} must be a table")
        try:
            accounts[account_id] = Account(id=account_id, **table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(table)'}: {e['msg']}" for e in exc.errors()
            )
            raise AccountError(f"{source}: accounts.{account_id}: {problems}") from exc
    check_secrets(accounts, source)
    return accounts


def check_secrets(accounts: dict[str, Account], source: str = "<accounts>") -> None:
    """Refuse short secrets, and a secret shared by two accounts.

    The signature covers ``ts`` and the body, not the account: with a shared secret, a
    request signed for one account is accepted on the other's URL. Errors name accounts
    and positions, never the secret.
    """
    owner: dict[bytes, str] = {}
    for account_id, account in accounts.items():
        values = [s.get_secret_value() for s in account.heap_webhook_secrets]
        for n, secret in enumerate(values, start=1):
            where = f"{source}: accounts.{account_id}: heap_webhook_secrets entry {n} of {len(values)}"
            if not secret.strip():
                raise AccountError(f"{where} is empty")
            if len(secret.strip()) < MIN_SECRET_LENGTH:
                raise AccountError(f"{where} is too short: a webhook secret needs at least "
                                   f"{MIN_SECRET_LENGTH} characters")
            other = owner.setdefault(_hmac_key(secret.encode()), account_id)
            if other != account_id:
                raise AccountError(
                    f"{source}: accounts {other!r} and {account_id!r} share a webhook secret: a request "
                    f"signed for one would be accepted for the other; give each account its own secret")


def _hmac_key(secret: bytes) -> bytes:
    """The key HMAC-SHA256 really uses: a key over 64 bytes is hashed, a shorter one padded with zeros.

    So ``k`` and ``k + b"\\0"``, or a long key and its SHA-256, sign alike and count as one secret.
    """
    key = hashlib.sha256(secret).digest() if len(secret) > 64 else secret
    return key.rstrip(b"\0")


def settings_problems(exc: ValidationError) -> str:
    """``HEAPSYNC_<NAME>: <problem>`` for each invalid setting, on one line, without the values (they may be secrets)."""
    return "; ".join(
        f"{'HEAPSYNC_' + str(e['loc'][0]).upper() if e['loc'] else '(settings)'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    )


def load_accounts(path: Path) -> dict[str, Account]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AccountError(f"cannot read accounts file {path}: {exc.strerror}") from exc
    return parse_accounts(text, str(path))


class Settings(BaseSettings):
    """Process settings, read from ``HEAPSYNC_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="HEAPSYNC_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "heapsync"
    topic_partitions: int = Field(6, ge=1)
    topic_replication: int = Field(1, ge=1)
    topic_retention_days: float = Field(14.0, gt=0)
    accounts_file: Path = Path("accounts.toml")

    # ingest
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8080
    admin_host: str = Field("127.0.0.1", description="Where the ingress serves /metrics, /status and /openapi.json.")
    admin_port: int | None = Field(
        8090, ge=0, le=65535, description="Port of the ingress's admin listener; 0 or empty turns it off."
    )
    signature_max_age_seconds: float = Field(
        3600.0, gt=0, description="How old a Heap-Hash ts may be; generous so Heap's retries pass."
    )
    signature_max_future_seconds: float = Field(60.0, ge=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_compressed_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Bytes as sent of a gzip/deflate body; its decoded size counts "
        "against max_body_bytes."
    )
    ingest_max_body_reads: int = Field(
        8, ge=1, description="Webhook bodies read, decoded and signature-checked at once (each may hold about "
        "twice max_body_bytes); more wait up to produce_timeout_seconds, then 503."
    )
    ingest_body_read_timeout_seconds: float = Field(
        60.0, gt=0, description="A body must have arrived this long after its headers, else 408: a slow sender "
        "does not keep a read slot."
    )
    produce_timeout_seconds: float = Field(10.0, gt=0)
    ingest_queue_max_kbytes: int = Field(
        64 * 1024, ge=1024, description="Local producer queue bound; above it the ingress answers 503 at once."
    )
    ingest_linger_ms: float = Field(
        5.0, ge=0, description="Producer linger: concurrent pages share one produce request."
    )

    # processors
    processor_group: str = "heapsync-assembler"
    processor_store: str = Field(
        "rocksdb://", description="Faust table store: rocksdb:// (rocksdict) in production, memory:// for tests."
    )
    processor_data_dir: Path = Path(".heapsync/processor")
    processor_web_port: int | None = None
    sync_timeout_seconds: float = Field(3600.0, gt=0)
    partial_policy: Literal["emit", "dead-letter"] = "emit"
    delta_chunk_size: int = Field(5000, ge=1)
    dead_letter_part_bytes: int = Field(
        1_000_000, ge=16_384, le=16 * 1024 * 1024 - 65_536,
        description="Largest assembler dead-letter record; a larger dead letter is split into parts (heapsync/dlq_parts.py)."
    )
    processor_recovery_consistency_check: bool = Field(
        True, description="Faust's check that local RocksDB state is not ahead of its changelog. Tansu reports a "
        "partition's end as the first offset of its last batch, which trips the check after a restart: off on Tansu."
    )
    processor_standby_replicas: int = Field(
        1, ge=0, description="Standby copies of each table partition kept by other workers (fast, complete takeover)."
    )
    processor_session_timeout_seconds: float = Field(
        60.0, gt=0, description="How long the group waits for a silent worker before moving its partitions."
    )
    processor_cache_max_ids: int = Field(
        2_000_000, ge=0, description="Ids of open syncs' running net state kept in memory (about 100 bytes each), so a "
        "sync's delta is ready when its last page is; a sync past it is assembled from its stored pages."
    )
    processor_emit_max_ids: int = Field(
        1_000_000, ge=1, description="Id occurrences an emission from stored pages holds in memory at once (about "
        "250 bytes each); a larger sync is computed in hash buckets spilled to files under processor_data_dir."
    )
    processor_prefetch_pages: int = Field(
        256, ge=1, description="Pages records the worker reads ahead of the one it assembles (Faust's stream buffer; "
        "its default, 4,096 pages of ~30 KB, held over 100 MB while a large sync arrived)."
    )
    processor_emit_inflight_chunks: int = Field(
        16, ge=1, description="Delta chunks sent but not yet acknowledged by the broker; the next chunk is made only "
        "when one is (back-pressure: a sync's output is never all in memory)."
    )
    processor_compression: Literal["none", "snappy", "lz4", "zstd", "gzip"] = Field(
        "snappy", description="Compression of the worker's changelog and delta records. Not lz4: Faust's "
        "aiokafka producer compresses lz4 at level 9 (high compression), a fifth of the worker's CPU in the benchmark."
    )

    # sinks
    sink_group: str = "heapsync-cordial-sink"
    sink_max_retries: int = Field(8, ge=0)
    sink_backoff_max_seconds: float = Field(60.0, gt=0)
    sink_request_timeout_seconds: float = Field(30.0, gt=0)
    sink_backoff_base_seconds: float = Field(
        0.5, gt=0, description="First retry waits 0.5-1x this, doubling each attempt up to sink_backoff_max_seconds."
    )
    sink_auth_probe_seconds: float = Field(
        30.0, gt=0, description="While an account's key is refused (401/403), probe it this often."
    )
    sink_rate_low_watermark: int = Field(
        -1, description="Hold new requests until the window resets when X-Rate-Limit-Remaining drops to this; "
                        "-1 = the account's max_concurrency."
    )
    sink_max_inflight_messages: int = Field(
        5000, ge=1, description="Delta chunks read but not yet applied; polling pauses above this."
    )
    sink_max_inflight_ids: int = Field(
        250_000, ge=1, description="Operations (ids) in delta chunks read but not yet applied; polling pauses above "
        "this, so the sink's memory is bounded by it and not by the size of a sync."
    )
    sink_lane_parallel_chunks: int = Field(
        8, ge=1, description="Chunks of one delta applied at once (they touch disjoint ids)."
    )
    sink_commit_interval_seconds: float = Field(1.0, gt=0)
    sink_shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight chunks may finish before they are abandoned."
    )
    sink_revoke_grace_seconds: float = Field(
        5.0, ge=0, description="On a rebalance, how long the revoked partitions' in-flight chunks may finish before "
        "they are cancelled and the partitions given up (well under the session and max-poll timeouts)."
    )
    sink_applied_max_chunks: int = Field(
        500_000, ge=1, description="Most applied chunk keys kept in memory for repeat detection (the oldest go first; "
        "keys also expire with the topic retention, as in the progress topic)."
    )
    sink_bulk_threshold: int = Field(
        10_000, ge=1, description="Deltas with more operations than this go through a contact import."
    )
    sink_files_host: str = Field("127.0.0.1", description="Where the sink serves import CSVs.")
    sink_files_port: int = Field(0, ge=0, description="0 = any free port.")
    sink_files_public_url: str | None = Field(
        None, description="Base URL Cordial uses to reach the CSV server (default http://host:port)."
    )
    sink_files_secret: SecretStr | None = Field(
        None, description="HMAC key signing CSV URLs; default a random key per process."
    )
    sink_files_ttl_seconds: float = Field(3600.0, gt=0, description="How long a signed CSV URL stays valid.")
    sink_import_poll_seconds: float = Field(0.5, gt=0, description="First wait between GET /jobs/{id} polls.")
    sink_import_timeout_seconds: float = Field(3600.0, gt=0)

    # archive sink (sinks/archive.py): every delta as JSON Lines files
    archive_dir: Path = Path(".heapsync/archive")
    archive_group: str = "heapsync-archive-sink"
    archive_max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Rotate a file at this size.")
    archive_max_seconds: float = Field(3600.0, gt=0, description="Rotate a file at this age.")

    # status page (heapsync_ops/status_page.py)
    status_page_enabled: bool = True
    status_page_recent: int = Field(20, ge=1, description="Recent syncs kept per list on the status page.")

    log_level: str = "INFO"
    metrics_port: int | None = Field(
        None, description="Serve Prometheus /metrics on this port (processor and sinks; the ingress serves its own on the "
        "admin listener)."
    )

    @field_validator("admin_port", mode="before")
    @classmethod
    def _off_when_empty(cls, v: object) -> object:
        return None if v in ("", 0, "0") else v

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def accounts(self) -> dict[str, Account]:
        return load_accounts(self.accounts_file)
