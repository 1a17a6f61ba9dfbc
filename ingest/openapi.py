"""The OpenAPI 3.0 document of the ingress, served at ``GET /openapi.json``.

Written by hand so it says what Heap and an operator need to know (status codes,
the signature header, Retry-After), and kept honest by ``tests/ingest/test_app.py``,
which checks its payload schemas against the pydantic models in ``heapsync.contracts``.
"""

from __future__ import annotations

import copy
from typing import Any

from heapsync.contracts import MAX_TOTAL_PAGES
from heapsync.settings import ACCOUNT_ID_PATTERN

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema_name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref(schema_name)}}}
    if headers:
        response["headers"] = headers
    return response


_REQUEST_ID_HEADER = {"X-Request-Id": {"description": "Request id, also in the ingress's log line.",
                                        "schema": {"type": "string"}}}

_NON_EMPTY = {"type": "string", "minLength": 1}

SCHEMAS: dict[str, Any] = {
    "FieldValue": {
        "type": "object", "required": ["id"], "additionalProperties": True,
        "properties": {"id": {**_NON_EMPTY, "description": "The user property the ids are values of, e.g. email."},
                       "display_name": {"type": "string", "nullable": True}},
    },
    "CustomerField": {
        "type": "object", "required": ["field_id", "value"], "additionalProperties": True,
        "properties": {"field_id": _NON_EMPTY, "value": _ref("FieldValue"),
                       "field_display_name": {"type": "string", "nullable": True},
                       "field_type": {"type": "string", "nullable": True, "example": "identity_mapping"}},
    },
    "CustomerConfig": {
        "type": "object", "required": ["fields"], "additionalProperties": True,
        "properties": {"fields": {"type": "array", "items": _ref("CustomerField")}},
    },
    "Segment": {
        "type": "object", "required": ["id", "name"], "additionalProperties": True,
        "properties": {"id": {"oneOf": [_NON_EMPTY, {"type": "integer"}],
                              "description": "A string in Heap's samples, an integer in its spec: both accepted."},
                       "name": {"type": "string"}},
    },
    "SyncInfo": {
        "type": "object", "required": ["page_number", "total_pages", "sync_task_id"], "additionalProperties": True,
        "description": "1 <= page_number <= total_pages.",
        "properties": {"page_number": {"type": "integer", "minimum": 1, "maximum": MAX_TOTAL_PAGES},
                       "total_pages": {"type": "integer", "minimum": 1, "maximum": MAX_TOTAL_PAGES},
                       "sync_task_id": {**_NON_EMPTY, "description": "Usually a UUID; any non-empty string."}},
    },
    "Member": {
        "type": "object", "required": ["id"], "additionalProperties": True,
        "properties": {"id": _NON_EMPTY},
    },
    "SyncData": {
        "type": "object", "required": ["segment", "sync_info"], "additionalProperties": True,
        "description": "At least one of add and remove must be present.",
        "properties": {"segment": _ref("Segment"), "sync_info": _ref("SyncInfo"),
                       "add": {"type": "array", "items": _ref("Member"), "nullable": True},
                       "remove": {"type": "array", "items": _ref("Member"), "nullable": True}},
    },
    "DrainData": {
        "type": "object", "required": ["segment"], "additionalProperties": True,
        "properties": {"segment": _ref("Segment")},
    },
    "HeapSync": {
        "type": "object", "required": ["action_type", "customer_config", "data"], "additionalProperties": True,
        "properties": {"action_type": {"type": "string", "enum": ["segment.users.sync"]},
                       "id_token": {"type": "string", "nullable": True,
                                    "description": "UUID naming the Heap customer account (not a JWT)."},
                       "customer_config": _ref("CustomerConfig"), "data": _ref("SyncData")},
    },
    "HeapDrain": {
        "type": "object", "required": ["action_type", "customer_config", "data"], "additionalProperties": True,
        "description": "Empty the list of this segment.",
        "properties": {"action_type": {"type": "string", "enum": ["segment.users.drain"]},
                       "id_token": {"type": "string", "nullable": True},
                       "customer_config": _ref("CustomerConfig"), "data": _ref("DrainData")},
    },
    "OtherAction": {
        "type": "object", "required": ["action_type"], "additionalProperties": True,
        "description": "Any other action type: answered 200 and kept in the rejected topic, never dropped.",
        "properties": {"action_type": _NON_EMPTY},
    },
    "Accepted": {
        "type": "object", "required": ["status", "request_id"],
        "properties": {"status": {"type": "string", "enum": ["accepted", "kept"],
                                  "description": "kept: an unsupported action type, stored in the rejected topic."},
                       "reason": {"type": "string"}, "request_id": {"type": "string"}},
    },
    "Status": {
        "type": "object", "required": ["status"], "additionalProperties": True,
        "properties": {"status": {"type": "string"}},
    },
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": True,
        "properties": {"error": {"type": "string"}, "reason": {"type": "string"},
                       "request_id": {"type": "string"}},
    },
    "FieldError": {
        "type": "object", "required": ["path", "message", "type"],
        "properties": {"path": {"type": "string", "example": "data.sync_info"}, "message": {"type": "string"},
                       "type": {"type": "string"}},
    },
    "InvalidPayload": {
        "type": "object", "required": ["error", "errors", "request_id"],
        "properties": {"error": {"type": "string", "enum": ["Invalid payload"]},
                       "errors": {"type": "array", "items": _ref("FieldError")},
                       "request_id": {"type": "string"}},
    },
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "heapsync ingress",
        "version": "1",
        "description": (
            "Receives Heap segment syncs (webhook), checks the Heap-Hash signature, and answers 200 only "
            "after Kafka acknowledged the page. Any other status makes Heap retry. This document describes the "
            "public port; /metrics, /status, /status.json and this document are served on the admin listener "
            "(HEAPSYNC_ADMIN_HOST / HEAPSYNC_ADMIN_PORT) only."
        ),
    },
    "paths": {
        "/heap/listMembership/{account_id}": {
            "post": {
                "operationId": "receiveHeapSync",
                "summary": "One page of a Heap segment sync (or a drain).",
                "parameters": [
                    {"name": "account_id", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": ACCOUNT_ID_PATTERN},
                     "description": "heapsync account (a [accounts.<id>] table of the accounts file)."},
                    {"name": "Heap-Hash", "in": "header", "required": True, "schema": {"type": "string"},
                     "example": "ts:1700000000000,hmac:3q2+7w==...",
                     "description": (
                         "ts:<epoch ms>,hmac:<HMAC-SHA256(secret, ts + raw body)> in Base64 or hex. "
                         "Pairs in any order, keys in any case. ts must lie within the configured window "
                         "(default 3600 s in the past, 60 s in the future)."
                     )},
                    {"name": "X-Request-Id", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {
                        "oneOf": [_ref("HeapSync"), _ref("HeapDrain"), _ref("OtherAction")],
                    }}},
                },
                "responses": {
                    "200": _json("Accepted", "Taken: the page is in Kafka (or, for another action type, kept).",
                                 _REQUEST_ID_HEADER),
                    "400": {"description": "Signed but invalid (bad JSON, schema, page range): InvalidPayload, and "
                                           "the raw request is kept in the rejected topic. Or a body that does not "
                                           "decode with its Content-Encoding, or has bytes after the end of its "
                                           "compressed stream: Error.",
                            "content": {"application/json": {"schema": {
                                "anyOf": [_ref("InvalidPayload"), _ref("Error")]}}}},
                    "403": _json("Error", "Missing, malformed or wrong signature, or ts outside the window "
                                 "(reason says which, except for a wrong signature)."),
                    "404": _json("Error", "Unknown account."),
                    "405": _json("Error", "Only POST."),
                    "408": _json("Error", "The body did not arrive in time (default 60 s after the headers)."),
                    "413": _json("Error", "Body larger than the configured limit (default 16 MiB), decoded or as "
                                 "sent."),
                    "415": _json("Error", "Content-Type is not JSON."),
                    "503": _json("Error", "Kafka did not acknowledge in time, the local queue is full, or every body "
                                 "read slot is busy: retry.",
                                 {"Retry-After": {"schema": {"type": "integer"},
                                                  "description": "Seconds to wait before retrying."}}),
                },
            },
        },
        "/healthz": {"get": {"operationId": "healthz", "summary": "The process is alive.",
                             "responses": {"200": _json("Status", "Alive.")}}},
        "/readyz": {"get": {"operationId": "readyz", "summary": "Broker reachable and topics present.",
                            "responses": {"200": _json("Status", "Ready."),
                                          "503": _json("Error", "Not ready (broker, topics, or shutting down).")}}},
    },
    "components": {"schemas": SCHEMAS},
}


def document() -> dict[str, Any]:
    """A fresh copy, so no caller can change what the next one is served."""
    return copy.deepcopy(_DOCUMENT)
