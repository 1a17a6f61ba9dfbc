"""How contact ids compare: an email the way Cordial compares it, every other identity exactly.

A pure rule shared by the assembler (ids are normalised before assembly) and the operator tools
(``heapsync trace`` finds a contact however its case was typed).
"""

from __future__ import annotations

from collections.abc import Iterable

EMAIL_IDENTITY = "email"
"""Cordial's email contact key (and Heap's email identity field): its ids compare case-insensitively."""


def compared_as(identity_field: str, cordial_key: str | None = None) -> str:
    """The identity a Heap field's ids compare under: ``email`` when they go to Cordial's email key.

    ``cordial_key`` is ``Account.identity_key(identity_field)`` when the account is known: an account
    can map another Heap field (``Email``, ``user_email``) onto Cordial's ``email`` with
    ``cordial_identity_key = "email"``, and those ids are emails too. Unknown: the Heap field decides."""
    return EMAIL_IDENTITY if cordial_key == EMAIL_IDENTITY else identity_field


def normalise_email(address: str) -> str:
    """How Cordial compares addresses: surrounding spaces dropped, case ignored."""
    return address.strip().lower()


def normalise_ids(identity_field: str, ids: Iterable[str]) -> list[str]:
    """Ids as the contact Cordial will see: emails trimmed and lower-cased, other identities exactly as sent."""
    if identity_field != EMAIL_IDENTITY:
        return list(ids)
    return list(map(str.lower, map(str.strip, ids)))  # C-level loops: this runs for every id of every page


def same_contact(asked: str, recorded: str, identity_field: str | None) -> bool:
    """Whether two ids name one contact under ``identity_field`` (no field recorded: email, the default)."""
    if (identity_field or EMAIL_IDENTITY) == EMAIL_IDENTITY:
        return normalise_email(asked) == normalise_email(recorded)
    return asked == recorded
