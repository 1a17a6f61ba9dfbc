"""The public port serves the webhook and nothing else (issue 13 #2): /metrics, /status, /status.json
and /openapi.json are on the ingress's admin listener (HEAPSYNC_ADMIN_HOST, default loopback, and
HEAPSYNC_ADMIN_PORT), checked against the real process."""

from __future__ import annotations

import json
import socket

import pytest

from heapsync.settings import Settings
from heapsync_dev.processes import free_port, wait_for_port
from ingest.app import ADMIN_ROUTES, PUBLIC_ROUTES
from tests.conftest import Pipeline, http


def test_admin_settings_default_to_loopback_and_can_be_turned_off() -> None:
    s = Settings()
    assert (s.admin_host, s.admin_port) == ("127.0.0.1", 8090)
    assert s.admin_port != s.ingest_port and s.admin_port not in (8081,)  # dev's simulator port
    assert Settings(admin_port="").admin_port is None  # type: ignore[arg-type]
    assert Settings(admin_port=0).admin_port is None


@pytest.mark.integration
def test_each_admin_route_is_404_on_the_public_port_and_answers_on_the_admin_port(pipeline: Pipeline) -> None:
    proc = pipeline.start_ingest()
    public = f"http://127.0.0.1:{pipeline.ingest_port}"
    admin = f"http://127.0.0.1:{pipeline.admin_port}"
    for route in ADMIN_ROUTES:
        refused = http("GET", public + route)
        assert refused.status == 404 and refused.body == {"error": "Not Found"}, (route, refused)
        served = http("GET", admin + route)
        assert served.status == 200, (route, served)
    assert "heapsync_ingest_requests_total" in http("GET", admin + "/metrics").body
    assert "/heap/listMembership/{account_id}" in http("GET", admin + "/openapi.json").body["paths"]
    assert "<h1>heapsync status</h1>" in http("GET", admin + "/status").body
    assert "lists" in http("GET", admin + "/status.json").body
    # the public port keeps the webhook and the probes
    assert http("GET", public + "/healthz").body == {"status": "ok"}
    assert http("GET", public + "/readyz").status == 200
    assert pipeline.post(b"{}", account="nobody").status == 404  # webhook route answers (unknown account)
    assert PUBLIC_ROUTES == ("/heap/listMembership/{account_id}", "/healthz", "/readyz")
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    [listening] = [line for line in lines if line["msg"] == "admin listener"]
    assert (listening["host"], listening["port"]) == ("127.0.0.1", pipeline.admin_port)
    assert proc.stop() == 0


@pytest.mark.integration
def test_admin_port_0_turns_the_listener_off(pipeline: Pipeline) -> None:
    pipeline.extra_env["HEAPSYNC_ADMIN_PORT"] = "0"
    proc = pipeline.start(  # by hand: start_ingest waits for the admin port
        "ingest", "ingest", "--port", str(pipeline.ingest_port))
    wait_for_port("127.0.0.1", pipeline.ingest_port, 30)
    assert http("GET", f"http://127.0.0.1:{pipeline.ingest_port}/metrics").status == 404
    assert proc.stop() == 0
    assert '"admin listener"' not in proc.output()


@pytest.mark.integration
def test_a_taken_admin_port_stops_the_ingress_with_a_clear_line(pipeline: Pipeline) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pipeline.extra_env["HEAPSYNC_ADMIN_PORT"] = str(taken.getsockname()[1])
        proc = pipeline.start("ingest", "ingest", "--port", str(free_port()))
        assert proc.popen.wait(60) != 0
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    [failed] = [line for line in lines if line["msg"] == "ingress cannot start"]
    assert failed["error"].startswith("[Errno 98] admin listener cannot start (HEAPSYNC_ADMIN_HOST / HEAPSYNC_ADMIN_PORT)")
    assert "Traceback" not in proc.output()
