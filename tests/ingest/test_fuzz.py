"""Fuzz the running ingress with hypothesis: random methods, paths, headers and bodies, mostly correctly
signed so that they reach the JSON and schema checks. No answer may be a 5xx, every error is a JSON body."""

from __future__ import annotations

import gzip
import json
import os
import string
import subprocess
import sys
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heapsync_dev.samples import drain_request, heap_request
from ingest.signature import heap_hash_header
from tests.conftest import Pipeline
from tests.ingest_support import raw_request

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 500
FUZZ_SECRET = "fuzz-webhook-secret"

header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
    max_leaves=25,
)


def mutate(doc: Any, draw: Any) -> Any:
    """Replace or delete one value somewhere inside a valid Heap request."""
    if isinstance(doc, dict) and doc:
        key = draw(st.sampled_from(sorted(doc)))
        choice = draw(st.integers(0, 2))
        out = dict(doc)
        if choice == 0:
            del out[key]
        elif choice == 1:
            out[key] = draw(json_values)
        else:
            out[key] = mutate(doc[key], draw)
        return out
    if isinstance(doc, list) and doc:
        i = draw(st.integers(0, len(doc) - 1))
        out = list(doc)
        out[i] = mutate(doc[i], draw)
        return out
    return draw(json_values)


@st.composite
def bodies(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "json", "bytes", "action"]))
    base = draw(st.sampled_from([
        heap_request("fuzz", 1, 2, add=["a@example.com"], remove=["b@example.com"], segment_id=5),
        drain_request(segment_id=5),
    ]))
    if kind == "valid":
        return json.dumps(base).encode()
    if kind == "mutated":
        return json.dumps(mutate(base, draw)).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "action":
        return json.dumps({**base, "action_type": draw(st.text(max_size=30))}).encode()
    return draw(st.binary(max_size=300))


@st.composite
def requests(draw: Any) -> tuple[str, str, bytes, dict[str, str]]:
    body = draw(bodies())
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH"]))
    account = draw(st.sampled_from(["acme"] * 6 + ["nobody"]) | st.text(min_size=1, max_size=20))
    path = draw(st.sampled_from([f"/heap/listMembership/{urllib.parse.quote(account, safe='')}"] * 9
                                + ["/", "/heap/listMembership", "/healthz", "/metrics", "/status"]))
    headers: dict[str, str] = {}
    ctype = draw(st.sampled_from(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain",
                                                             "application/vnd.heap+json", None]) | header_text)
    if ctype is not None:
        headers["Content-Type"] = ctype
    signing = draw(st.sampled_from(["good"] * 6 + ["good-hex", "stale", "wrong", "junk", "none"]))
    now = int(time.time() * 1000)
    if signing in ("good", "good-hex", "stale"):
        ts = now - 10_000_000 if signing == "stale" else now
        headers["Heap-Hash"] = heap_hash_header(FUZZ_SECRET.encode(), ts, body, "hex" if signing == "good-hex" else "base64")
    elif signing == "wrong":
        headers["Heap-Hash"] = heap_hash_header(b"other", now, body)
    elif signing == "junk":
        headers["Heap-Hash"] = draw(header_text)
    if draw(st.booleans()):
        headers["X-Request-Id"] = draw(header_text)
    if draw(st.integers(0, 9)) == 0:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "identity"]) | header_text)
        headers["Content-Encoding"] = encoding
        if encoding in ("gzip", "deflate") and draw(st.booleans()):
            body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)  # signed as decoded
    return method, path, body, headers


def test_fuzzed_requests_never_get_a_5xx_and_errors_are_json(pipeline: Pipeline) -> None:
    pipeline.secret = FUZZ_SECRET
    pipeline.start_ingest()
    port = pipeline.ingest_port
    seen: dict[int, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests())
    def check(request: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, body, headers = request
        reply = raw_request(port, method, path, None if method == "GET" else body, headers, timeout=30)
        seen[reply.status] = seen.get(reply.status, 0) + 1
        assert reply.status < 500, (reply.status, reply.raw[:300], request)
        assert path not in ("/metrics", "/status") or reply.status in (404, 405), "admin routes are not public"
        doc = json.loads(reply.raw)  # every answer is JSON
        assert isinstance(doc, dict)
        if reply.status >= 400:
            assert isinstance(doc.get("error"), str), doc
        if reply.status == 405:
            assert reply.headers.get("Allow")

    check()
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0 and seen.get(403, 0) > 0, seen
    assert pipeline.procs[0].popen.poll() is None, "the ingress is still running"
    assert "unhandled error" not in pipeline.procs[0].output()


def test_schemathesis_finds_the_ingress_true_to_its_openapi_document(pipeline: Pipeline, tmp_path: Path) -> None:
    """schemathesis generates requests from /openapi.json and checks every answer against it
    (status documented, body matching its schema, no 5xx). It cannot sign, so the webhook mostly
    answers 403 here; the hypothesis test above covers signed requests."""
    pipeline.start_ingest()
    config = tmp_path / "schemathesis.toml"
    config.write_text('[parameters]\n"path.account_id" = "acme"\n')
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [str(st), "--config-file", str(config), "run", f"http://127.0.0.1:{pipeline.admin_port}/openapi.json",
         "--url", f"http://127.0.0.1:{pipeline.ingest_port}",  # the document is on the admin port; the API is not
         "--checks", "all", "--max-examples", "40", "--request-timeout", "20", "--seed", "1"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its working files stay out of the repository
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
