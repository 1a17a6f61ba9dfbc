"""Sample Heap requests, shaped like the one in docs/design.md ("Heap's request"); for ``send-sample``, tests, benchmarks."""

from __future__ import annotations

from typing import Any


def heap_request(
    sync_task_id: str,
    page_number: int,
    total_pages: int,
    add: list[str] | None = None,
    remove: list[str] | None = None,
    *,
    segment_id: str | int = "15225086",
    segment_name: str = "Heap Test Segment",
    identity: str = "email",
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "segment": {"id": segment_id, "name": segment_name},
        "sync_info": {"page_number": page_number, "total_pages": total_pages, "sync_task_id": sync_task_id},
    }
    if add is not None:
        data["add"] = [{"id": i} for i in add]
    if remove is not None:
        data["remove"] = [{"id": i} for i in remove]
    return {
        "id_token": "bc2ae9f9-51ce-404e-9bf9-6b98cbc36f9e",
        "action_type": "segment.users.sync",
        "customer_config": {"fields": [{
            "field_id": "heap_identity_user_property",
            "field_display_name": "Heap Identity User Property",
            "field_type": "identity_mapping",
            "value": {"id": identity, "display_name": identity},
        }]},
        "data": data,
    }


def drain_request(segment_id: str | int = "15225086", segment_name: str = "Heap Test Segment") -> dict[str, Any]:
    return {
        "action_type": "segment.users.drain",
        "customer_config": {"fields": [{"field_id": "heap_identity_user_property",
                                        "field_type": "identity_mapping", "value": {"id": "email"}}]},
        "data": {"segment": {"id": segment_id, "name": segment_name}},
    }


def sample_sync_pages(sync_task_id: str, segment_name: str = "Heap Test Segment") -> list[dict[str, Any]]:
    """Two pages: page 1 adds three users, page 2 adds one and removes one added on page 1."""
    return [
        heap_request(sync_task_id, 1, 2, add=["user1@example.com", "user2@example.com", "user3@example.com"],
                     remove=[], segment_name=segment_name),
        heap_request(sync_task_id, 2, 2, add=["user4@example.com"], remove=["user2@example.com"],
                     segment_name=segment_name),
    ]
