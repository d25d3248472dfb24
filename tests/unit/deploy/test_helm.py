"""helm/sieve rendered by the real `helm` binary and validated against the Kubernetes API schemas.

`helm` comes from scripts/install_helm.sh (built from the Go module proxy into ~/.cache/sieve/bin). Every
rendered manifest is checked with kubernetes-validate (strict: unknown fields fail) for the oldest Kubernetes
the chart supports and the newest the validator knows; the ServiceMonitor CRD is checked structurally.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_rules import ROOT, as_mapping, check_sieve_command, known_env_names, unknown_sieve_names

from services.common.config import IndexSettings, MilvusSettings

CHART = ROOT / "helm" / "sieve"
RELEASE = "sv"
NAMESPACE = "moderation"
KUBE_VERSIONS = ("1.25", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)

# Value sets the chart must render cleanly: the defaults (GPU Triton, external Kafka and Redis, FAISS index), the
# CPU-only override shipped with the chart, everything optional switched on, and the index on Milvus.
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "cpu": ["-f", str(CHART / "values-cpu.yaml")],
    "bundled": [
        "--set", "kafka.bundled.enabled=true",
        "--set", "redis.bundled.enabled=true",
        "--set", "moderator.autoscaling.consumerLag.enabled=true",
        "--set", "reviewer.pdb.enabled=true",
        "--set", "kafka.securityProtocol=SASL_SSL",
        "--set", "kafka.saslMechanism=SCRAM-SHA-512",
        "--set", "kafka.saslUsername=sieve",
        "--set", "kafka.saslPassword=not-a-real-password",
        "--set", "reviewer.tokens.admin[0]=admin:0123456789abcdef",
    ],
    # The recent-images index in an external Milvus (the upstream chart installed beside this release).
    "milvus": [
        "--set", "index.backend=milvus",
        "--set", "milvus.token=root:not-a-real-token",
        "--set", "milvus.consistency=Bounded",
    ],
}  # fmt: skip


def helm_binary() -> str:
    bin_dir = os.environ.get("SIEVE_BIN_DIR") or str(Path.home() / ".cache" / "sieve" / "bin")
    candidates = [os.environ.get("SIEVE_HELM", ""), str(Path(bin_dir) / "helm")]
    for candidate in [*candidates, shutil.which("helm") or ""]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("no helm binary: run scripts/install_helm.sh (builds it into ~/.cache/sieve/bin)")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=False, timeout=120)


@functools.cache
def render(scenario: str) -> tuple[dict[str, Any], ...]:
    result = _helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *SCENARIOS[scenario])
    assert result.returncode == 0, result.stderr
    docs = tuple(as_mapping(d) for d in yaml.safe_load_all(result.stdout) if d)
    assert docs, "helm rendered nothing"
    return docs


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def container(docs: tuple[dict[str, Any], ...], workload: str) -> dict[str, Any]:
    spec = dict(pod_specs(docs))[f"{RELEASE}-sieve-{workload}"]
    containers: list[dict[str, Any]] = spec["containers"]
    return containers[0]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- helm itself ---------------------------------------------------------------------------------------------------


def test_helm_is_the_real_v3_binary() -> None:
    result = _helm("version", "--short")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("v3."), result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_clean(scenario: str) -> None:
    result = _helm("lint", "--strict", str(CHART), *SCENARIOS[scenario])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_satisfy_the_kubernetes_schemas(scenario: str, kube_version: str) -> None:
    failures: list[str] = []
    checked = 0
    for doc in render(scenario):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: see test_service_monitors_point_at_rendered_services
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            failures.append(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(exc.message)
    assert not failures, "\n".join(failures)
    assert checked >= 10


def test_schema_validation_can_fail() -> None:
    """A misspelt field in an otherwise rendered Deployment is rejected in strict mode."""
    deployment = dict(of_kind(render("default"), "Deployment")[f"{RELEASE}-sieve-moderator"])
    deployment["spec"] = {**deployment["spec"], "replica": 3}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


# --- what the chart must contain ---------------------------------------------------------------------------------


def test_default_render_has_every_part() -> None:
    docs = render("default")
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == {f"{RELEASE}-sieve-{c}" for c in ("moderator", "reviewer", "triton")}
    cronjobs = of_kind(docs, "CronJob")
    assert set(cronjobs) == {f"{RELEASE}-sieve-trainer", f"{RELEASE}-sieve-trainer-promotions"}
    promotions = cronjobs[f"{RELEASE}-sieve-trainer-promotions"]["spec"]
    assert promotions["concurrencyPolicy"] == "Forbid"
    pod = promotions["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["sieve", "trainer", "promotions"]  # admins' requests between rounds
    assert set(of_kind(docs, "HorizontalPodAutoscaler")) == {f"{RELEASE}-sieve-moderator"}
    assert {f"{RELEASE}-sieve-moderator", f"{RELEASE}-sieve-triton"} <= set(of_kind(docs, "PodDisruptionBudget"))
    assert set(of_kind(docs, "ConfigMap")) == {f"{RELEASE}-sieve"}
    assert f"{RELEASE}-sieve" in of_kind(docs, "Secret")
    assert len(of_kind(docs, "ServiceMonitor")) >= 2
    assert not of_kind(docs, "StatefulSet"), "bundled Kafka and Redis must be off by default"
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/part-of"] == "sieve"


def test_triton_gets_a_gpu_by_default_and_none_with_the_cpu_values() -> None:
    gpu = container(render("default"), "triton")["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    cpu = container(render("cpu"), "triton")["resources"]
    assert not any("nvidia.com" in key for part in cpu.values() for key in part)
    cpu_pod = dict(pod_specs(render("cpu")))[f"{RELEASE}-sieve-triton"]
    assert not cpu_pod.get("tolerations")


def test_a_gpu_triton_loads_the_gpu_model_configs_and_a_cpu_one_the_defaults() -> None:
    gpu_args = container(render("default"), "triton")["args"]
    assert "--model-config-name=gpu" in gpu_args
    assert "--pinned-memory-pool-byte-size=268435456" in gpu_args
    for model in {p.parent.name for p in (ROOT / "model_repo").glob("*/config.pbtxt")}:
        assert (ROOT / "model_repo" / model / "configs" / "gpu.pbtxt").is_file(), model
    cpu_args = container(render("cpu"), "triton")["args"]
    assert not any(a.startswith(("--model-config-name", "--pinned-memory")) for a in cpu_args)


def test_triton_uses_explicit_model_control_for_every_model() -> None:
    args = container(render("default"), "triton")["args"]
    assert "--model-control-mode=explicit" in args
    models = {p.parent.name for p in (ROOT / "model_repo").glob("*/config.pbtxt")}
    assert {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")} == models
    assert "--metrics-port=8002" in args


def test_moderator_probes_use_the_health_port_from_its_settings() -> None:
    docs = render("default")
    config = of_kind(docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"]
    moderator = container(docs, "moderator")
    ports = {p["name"]: p["containerPort"] for p in moderator["ports"]}
    assert ports["health"] == int(config["SIEVE_MODERATOR_HEALTH_PORT"]) != 0
    assert ports["metrics"] == int(config["SIEVE_OTEL_PROMETHEUS_PORT"]) != 0
    assert moderator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert moderator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_triton_readiness_follows_the_served_embedder() -> None:
    # A refused promotion leaves a failed version listed, and Triton's server readiness false with it: the pods
    # must stay in the Service while the embedder serves.
    triton_probe = container(render("default"), "triton")["readinessProbe"]["httpGet"]
    assert triton_probe == {"path": "/v2/models/sieve_embedder/ready", "port": "http"}


def test_hpa_scales_the_moderator_on_cpu_and_optionally_on_consumer_lag() -> None:
    default_hpa = of_kind(render("default"), "HorizontalPodAutoscaler")[f"{RELEASE}-sieve-moderator"]["spec"]
    assert default_hpa["scaleTargetRef"]["name"] in of_kind(render("default"), "Deployment")
    assert [m["type"] for m in default_hpa["metrics"]] == ["Resource"]
    lag_hpa = of_kind(render("bundled"), "HorizontalPodAutoscaler")[f"{RELEASE}-sieve-moderator"]["spec"]
    external = [m["external"] for m in lag_hpa["metrics"] if m["type"] == "External"]
    assert external and external[0]["metric"]["name"] == "sieve_consumer_lag"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pdbs_and_services_select_rendered_pods(scenario: str) -> None:
    docs = render(scenario)
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in {"Deployment", "StatefulSet"}
    ]
    for pdb in of_kind(docs, "PodDisruptionBudget").values():
        assert any(labels_match(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels)
    for service in of_kind(docs, "Service").values():
        assert any(labels_match(service["spec"]["selector"], labels) for labels in pod_labels)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_monitors_point_at_rendered_services(scenario: str) -> None:
    """ServiceMonitor is a CRD (no schema in kubernetes-validate): checked structurally instead."""
    docs = render(scenario)
    services = of_kind(docs, "Service")
    monitors = of_kind(docs, "ServiceMonitor")
    assert monitors
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selected = [
            s for s in services.values() if labels_match(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"{name} selects {len(selected)} Services"
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
            assert endpoint["port"] in port_names, f"{name} scrapes port {endpoint['port']!r}"
            assert endpoint["path"].startswith("/")
            assert endpoint["interval"].endswith("s")


def test_service_monitors_can_be_switched_off() -> None:
    result = _helm("template", RELEASE, str(CHART), "--set", "serviceMonitor.enabled=false")
    assert result.returncode == 0, result.stderr
    assert "kind: ServiceMonitor" not in result.stdout


# --- settings: ConfigMap, Secret, env ------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_sieve_setting_is_read_by_the_code(scenario: str) -> None:
    docs = render(scenario)
    known = known_env_names()
    names: list[str] = []
    for config in of_kind(docs, "ConfigMap").values():
        names += config["data"]
    for secret in of_kind(docs, "Secret").values():
        names += secret.get("stringData", {})
    for _, spec in pod_specs(docs):
        for c in spec["containers"]:
            names += [e["name"] for e in c.get("env", [])]
    assert unknown_sieve_names(names, known) == []
    config_keys = set(of_kind(docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"])
    assert all(k.startswith("SIEVE_") for k in config_keys)


def test_secrets_stay_out_of_the_configmap() -> None:
    docs = render("bundled")
    config = of_kind(docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"]
    secret = of_kind(docs, "Secret")[f"{RELEASE}-sieve"]["stringData"]
    assert {"SIEVE_REDIS_URL", "SIEVE_KAFKA_SASL_PASSWORD"} <= set(secret)
    assert not {"SIEVE_REDIS_URL", "SIEVE_KAFKA_SASL_PASSWORD"} & set(config)
    assert "not-a-real-password" not in yaml.safe_dump(config)
    reviewer_secret = of_kind(docs, "Secret")[f"{RELEASE}-sieve-reviewer"]["stringData"]
    assert "admin:0123456789abcdef" in reviewer_secret["SIEVE_REVIEWER_ADMIN_TOKENS"]
    sieve_containers = [
        c for _, spec in pod_specs(docs) for c in spec["containers"] if c.get("args", [])[:1] == ["sieve"]
    ]
    assert len(sieve_containers) == 4  # moderator, reviewer, trainer, trainer-promotions
    for c in sieve_containers:
        refs = [ref["secretRef"] for ref in c["envFrom"] if "secretRef" in ref]
        assert {"name": f"{RELEASE}-sieve"} in refs, c["name"]


def test_external_and_bundled_dependencies_are_wired() -> None:
    external = of_kind(render("default"), "ConfigMap")[f"{RELEASE}-sieve"]["data"]
    assert external["SIEVE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka.kafka.svc.cluster.local:9092"
    assert external["SIEVE_TRITON_URL"] == f"{RELEASE}-sieve-triton:8001"
    bundled_docs = render("bundled")
    bundled = of_kind(bundled_docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"]
    services = of_kind(bundled_docs, "Service")
    assert bundled["SIEVE_KAFKA_BOOTSTRAP_SERVERS"] == f"{RELEASE}-sieve-kafka:9092"
    assert f"{RELEASE}-sieve-kafka" in services and f"{RELEASE}-sieve-redis" in services
    redis_url = of_kind(bundled_docs, "Secret")[f"{RELEASE}-sieve"]["stringData"]["SIEVE_REDIS_URL"]
    assert redis_url == f"redis://{RELEASE}-sieve-redis:6379/0"
    assert set(of_kind(bundled_docs, "StatefulSet")) == {f"{RELEASE}-sieve-kafka", f"{RELEASE}-sieve-redis"}


@pytest.mark.parametrize("workload", ["moderator", "reviewer", "trainer"])
def test_workloads_run_sieve_subcommands(workload: str) -> None:
    assert check_sieve_command(container(render("default"), workload)["args"]) == "parsed"


def _settings_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """What a Sieve container's envFrom gives it: the ConfigMap, then the chart's Secret."""
    env = dict(of_kind(docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"])
    env.update(of_kind(docs, "Secret").get(f"{RELEASE}-sieve", {}).get("stringData", {}))
    return env


def test_the_index_is_faiss_by_default_and_nothing_of_milvus_is_set() -> None:
    env = _settings_env(render("default"))
    assert env["SIEVE_INDEX_BACKEND"] == "faiss"
    assert not [k for k in env if k.startswith("SIEVE_MILVUS_")]
    assert "SIEVE_MILVUS_TOKEN" not in _settings_env(render("bundled"))  # no token without the milvus backend


def test_milvus_backend_reaches_every_sieve_container(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("milvus")
    config = of_kind(docs, "ConfigMap")[f"{RELEASE}-sieve"]["data"]
    secret = of_kind(docs, "Secret")[f"{RELEASE}-sieve"]["stringData"]
    assert config["SIEVE_INDEX_BACKEND"] == "milvus"
    # The default endpoint: the upstream chart's Service, installed as release "milvus" in namespace "milvus".
    assert config["SIEVE_MILVUS_URI"] == "http://milvus.milvus.svc.cluster.local:19530"
    assert secret["SIEVE_MILVUS_TOKEN"] == "root:not-a-real-token"
    assert "SIEVE_MILVUS_TOKEN" not in config and "not-a-real-token" not in yaml.safe_dump(config)
    # The moderator (search, add), the trainer (backfill on promotion) and the reviewer all read the same index.
    for workload in ("moderator", "reviewer", "trainer"):
        refs = container(docs, workload)["envFrom"]
        assert {"configMapRef": {"name": f"{RELEASE}-sieve"}} in refs, workload
        assert {"secretRef": {"name": f"{RELEASE}-sieve"}} in refs, workload
    # What the pods get parses into the code's own settings.
    for key, value in _settings_env(docs).items():
        monkeypatch.setenv(key, str(value))
    assert IndexSettings().backend == "milvus"
    milvus = MilvusSettings()
    assert milvus.uri == config["SIEVE_MILVUS_URI"] and milvus.consistency == "Bounded"
    assert milvus.token.get_secret_value() == "root:not-a-real-token"
    assert milvus.collection_prefix == config["SIEVE_MILVUS_COLLECTION_PREFIX"] == "sieve_recent"


def test_milvus_token_can_come_from_an_existing_secret() -> None:
    result = _helm(
        "template", RELEASE, str(CHART), "--set", "index.backend=milvus",
        "--set", "milvus.token=root:not-a-real-token", "--set", "secrets.existingSecret=mine",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = tuple(as_mapping(d) for d in yaml.safe_load_all(result.stdout) if d)
    assert "not-a-real-token" not in result.stdout
    assert f"{RELEASE}-sieve" not in of_kind(docs, "Secret")
    assert {"secretRef": {"name": "mine"}} in container(docs, "moderator")["envFrom"]


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it. `helm install --dry-run` needs a cluster and `helm template` leaves
    NOTES out, so a copy of the chart renders it into a ConfigMap instead."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "test.notes" . | quote }}}\n'
    )
    show = ("--show-only", "templates/zz-notes.yaml")
    result = _helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, *show, *args)
    assert result.returncode == 0, result.stderr
    text: str = as_mapping(yaml.safe_load(result.stdout))["data"]["notes"]
    return text


def test_notes_name_the_index_backend(tmp_path: Path) -> None:
    assert "Index:  FAISS in every moderator replica" in render_notes(tmp_path / "faiss")
    milvus = render_notes(tmp_path / "milvus", *SCENARIOS["milvus"])
    assert "Index:  Milvus at http://milvus.milvus.svc.cluster.local:19530" in milvus
    assert "consistency Bounded" in milvus


def test_chart_refuses_inconsistent_values() -> None:
    no_repo = _helm("template", RELEASE, str(CHART), "--set", "modelRepository.persistence.enabled=false")
    assert no_repo.returncode != 0 and "trainer.enabled needs modelRepository.persistence" in no_repo.stderr
    sasl = _helm("template", RELEASE, str(CHART), "--set", "kafka.securityProtocol=SASL_SSL")
    assert sasl.returncode != 0 and "kafka.saslPassword" in sasl.stderr
    bad_key = _helm("template", RELEASE, str(CHART), "--set", "config.KAFKA_THING=1")
    assert bad_key.returncode != 0 and "only SIEVE_" in bad_key.stderr
    bad_backend = _helm("template", RELEASE, str(CHART), "--set", "index.backend=qdrant")
    assert bad_backend.returncode != 0 and "index.backend must be faiss or milvus" in bad_backend.stderr
    no_uri = _helm("template", RELEASE, str(CHART), "--set", "index.backend=milvus", "--set", "milvus.uri=")
    assert no_uri.returncode != 0 and "milvus.uri is required" in no_uri.stderr
