"""The Helm chart, rendered by the real helm v3 CLI and checked with kubernetes-validate and asserts.

Values files: the defaults, ``ci/kube-prometheus-stack-values.yaml`` (ServiceMonitor, rules and
dashboard next to kube-prometheus-stack in namespace monitoring, CASES C32),
``ci/existing-secret-values.yaml``, ``ci/password-values.yaml`` and ``ci/sharded-values.yaml``
(a StatefulSet of 4 pods, one shard each, docs/SCALING.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.cli import build_parser
from exporter.sharding import Shard, parse_shard

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dcs-migration-exporter"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dcs-migration-exporter.json"
SECRET_DIR = "/etc/dcs-migration-exporter/secrets"
NAMESPACE = "apps"
RELEASE = "rel"
FULLNAME = "rel-dcs-migration-exporter"

VALUES_FILES = {
    "defaults": None,
    "kube-prometheus-stack": CHART / "ci" / "kube-prometheus-stack-values.yaml",
    "existing-secret": CHART / "ci" / "existing-secret-values.yaml",
    "password": CHART / "ci" / "password-values.yaml",
    "sharded": CHART / "ci" / "sharded-values.yaml",
    "discovery": CHART / "ci" / "discovery-values.yaml",
}
SHARDED_REPLICAS = 4

Docs = list[dict[str, Any]]


@pytest.fixture
def helm(
    tool: Callable[[str], str], tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the helm CLI with its cache and config homes in tmp_path."""
    binary = tool("helm")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
        "HELM_DATA_HOME": str(tmp_path / "helm-data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *args], capture_output=True, text=True, env=env)

    return run


@pytest.fixture
def render(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., Docs]:
    """Render the chart (release rel, namespace apps) and return its objects."""

    def run(values: str | None = None, *extra: str, chart: Path = CHART) -> Docs:
        args = ["template", RELEASE, str(chart), "-n", NAMESPACE]
        if values is not None and VALUES_FILES[values] is not None:
            args += ["-f", str(VALUES_FILES[values])]
        result = helm(*args, *extra)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``)."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: Docs) -> dict[str, Any]:
    """The exporter container of the Deployment."""
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["exporter"]
    result: dict[str, Any] = containers[0]
    return result


# ---- tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_helm_lint_strict(
    values: str, helm: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """helm lint --strict passes with every values file."""
    args = ["lint", "--strict", str(CHART)]
    if VALUES_FILES[values] is not None:
        args += ["-f", str(VALUES_FILES[values])]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_kubernetes_validate_strict(
    values: str, helm: Callable[..., subprocess.CompletedProcess[str]], tool: Callable[[str], str]
) -> None:
    """Every rendered built-in object is valid for Kubernetes 1.33 with no unknown fields."""
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE]
    if VALUES_FILES[values] is not None:
        args += ["-f", str(VALUES_FILES[values])]
    rendered = helm(*args)
    assert rendered.returncode == 0, rendered.stderr
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.33.0", "-"],
        input=rendered.stdout,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    workload = "statefulset" if values == "sharded" else "deployment"
    assert f"passed for resource {workload}/{FULLNAME}" in result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_yamllint_accepts_values_and_rendered_output(
    values: str, helm: Callable[..., subprocess.CompletedProcess[str]], tool: Callable[[str], str]
) -> None:
    """yamllint finds no problem in the values file, Chart.yaml or the rendered manifests."""
    config = "{extends: default, rules: {line-length: {max: 160}, document-start: disable}}"
    files = [CHART / "Chart.yaml", CHART / "values.yaml"]
    if VALUES_FILES[values] is not None:
        files.append(VALUES_FILES[values])
    result = subprocess.run(
        [tool("yamllint"), "-s", "-d", config, *map(str, files)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE]
    if VALUES_FILES[values] is not None:
        args += ["-f", str(VALUES_FILES[values])]
    rendered = helm(*args).stdout
    # Rendered output: only syntax and structure matter (long lines come from the rules file).
    relaxed = (
        "{extends: default, rules: {line-length: disable, document-start: disable, "
        "comments: disable, comments-indentation: disable, indentation: {indent-sequences: whatever}}}"
    )
    result = subprocess.run(
        [tool("yamllint"), "-s", "-d", relaxed, "-"], input=rendered, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_render_only_the_core_objects(render: Callable[..., Docs]) -> None:
    """By default: ServiceAccount, Secret, ConfigMap, Service and Deployment, no CRD objects."""
    docs = render("defaults")
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "Deployment",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)


def test_pod_and_container_are_hardened(render: Callable[..., Docs]) -> None:
    """Non-root numeric UID, no privilege escalation, ALL capabilities dropped, seccomp, RO root."""
    docs = render("defaults")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_port_and_resources(render: Callable[..., Docs]) -> None:
    """Liveness on /healthz, readiness on /ready, port 9713 named metrics, memory limited."""
    c = container(render("defaults"))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 9713, "protocol": "TCP"}]
    assert c["resources"]["limits"]["memory"] == "128Mi"
    assert c["resources"]["requests"]["cpu"]
    assert "--config.file=/etc/dcs-migration-exporter/config.yaml" in c["args"]
    assert "--web.listen-address=:9713" in c["args"]


def test_service_exposes_the_named_metrics_port(render: Callable[..., Docs]) -> None:
    """The Service's port is named metrics and targets the container's metrics port."""
    service = one(render("defaults"), "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9713, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/name": "dcs-migration-exporter",
        "app.kubernetes.io/instance": RELEASE,
    }


def test_checksums_follow_config_and_secret(render: Callable[..., Docs]) -> None:
    """checksum/config changes with the config only, checksum/secret with the credentials only."""

    def checksums(*extra: str) -> dict[str, str]:
        annotations = one(render("kube-prometheus-stack", *extra), "Deployment")["spec"][
            "template"
        ]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums()
    assert set(base) == {"checksum/config", "checksum/secret"}
    new_interval = checksums("--set", "config.polling.interval=1m")
    assert new_interval["checksum/config"] != base["checksum/config"]
    assert new_interval["checksum/secret"] == base["checksum/secret"]
    new_key = checksums("--set", "auth.secretKey=rotated")
    assert new_key["checksum/secret"] != base["checksum/secret"]
    assert new_key["checksum/config"] == base["checksum/config"]


def test_service_monitor_without_labels_by_default(render: Callable[..., Docs]) -> None:
    """Enabled with default values, the ServiceMonitor carries no release label (C32: opt-in)."""
    monitor = one(render("defaults", "--set", "serviceMonitor.enabled=true"), "ServiceMonitor")
    assert "release" not in monitor["metadata"]["labels"]
    assert monitor["metadata"]["namespace"] == NAMESPACE
    values = (CHART / "values.yaml").read_text()
    assert "additionalLabels: {release: kube-prometheus-stack}" in values


def test_notes_explain_the_release_label(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """NOTES.txt warns about missing tasks, credentials and the kube-prometheus-stack label."""
    notes = _notes(helm, tmp_path, "--set", "serviceMonitor.enabled=true")
    assert "WARNING: config.tasks is empty" in notes
    assert "WARNING: no credentials" in notes
    assert "serviceMonitor.additionalLabels.release=kube-prometheus-stack" in notes
    assert f"port-forward svc/{FULLNAME} 9713:9713" in notes


# ---- C32: next to kube-prometheus-stack ----------------------------------------------------------


def test_c32_service_monitor_is_selected_by_kube_prometheus_stack(
    render: Callable[..., Docs],
) -> None:
    """ServiceMonitor in monitoring with release label, matching the Service's labels and port name."""
    docs = render("kube-prometheus-stack")
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert service["metadata"]["namespace"] == NAMESPACE
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"], endpoint["path"]) == (
        "30s",
        "10s",
        "/metrics",
    )
    # job="dcs-migration-exporter", the job the DcsMigrationExporterDown alert watches.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "dcs-migration-exporter"
    assert 'up{job="dcs-migration-exporter"}' in RULES.read_text()


def test_c32_prometheus_rule_is_selected_and_equals_the_rules_file(
    render: Callable[..., Docs], tool: Callable[[str], str], tmp_path: Path
) -> None:
    """The PrometheusRule has the release label and exactly the groups of deploy/prometheus/rules.yml."""
    rule = one(render("kube-prometheus-stack"), "PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    extracted = tmp_path / "from-chart.yml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(extracted)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_copies_of_rules_and_dashboard_are_identical() -> None:
    """helm/…/files/ holds byte-for-byte copies of the rules and the dashboard (cp them after edits)."""
    assert (CHART / "files" / "rules.yml").read_bytes() == RULES.read_bytes()
    assert (CHART / "files" / "dcs-migration-exporter.json").read_bytes() == DASHBOARD.read_bytes()


def test_dashboard_config_map_for_the_grafana_sidecar(render: Callable[..., Docs]) -> None:
    """The dashboard ConfigMap has grafana_dashboard: "1" and the dashboard JSON unchanged."""
    docs = render("kube-prometheus-stack")
    dashboard = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "DCS"}
    assert json.loads(dashboard["data"]["dcs-migration-exporter.json"]) == json.loads(
        DASHBOARD.read_text()
    )


# ---- credentials ---------------------------------------------------------------------------------


def _config(docs: Docs) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    return config


def test_aksk_secrets_are_files_and_never_in_argv(render: Callable[..., Docs]) -> None:
    """The secret key is a mounted file, the access key an env var from the Secret, argv is clean."""
    docs = render("kube-prometheus-stack")
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"access_key": "TESTACCESSKEY0000001", "secret_key": "test-secret-key-not-real"}
    assert _config(docs)["auth"] == {
        "access_key": "${DCS_ACCESS_KEY}",
        "secret_key_file": f"{SECRET_DIR}/secret_key",
    }
    c = container(docs)
    assert c["env"] == [
        {
            "name": "DCS_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": FULLNAME, "key": "access_key"}},
        }
    ]
    rendered_text = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    for value in data.values():
        assert value not in rendered_text
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == FULLNAME
    assert volume["secret"]["items"] == [{"key": "secret_key", "path": "secret_key"}]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "credentials")
    assert (mount["mountPath"], mount["readOnly"]) == (SECRET_DIR, True)


def test_existing_secret_is_used_and_no_secret_rendered(render: Callable[..., Docs]) -> None:
    """With existingSecret the chart makes no Secret and maps the given keys, security token included."""
    docs = render("existing-secret")
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert _config(docs)["auth"] == {
        "access_key": "${DCS_ACCESS_KEY}",
        "secret_key_file": f"{SECRET_DIR}/secret_key",
        "security_token_file": f"{SECRET_DIR}/security_token",
    }
    c = container(docs)
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "dcs-credentials", "key": "AK"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == "dcs-credentials"
    assert volume["secret"]["items"] == [
        {"key": "SK", "path": "secret_key"},
        {"key": "TOKEN", "path": "security_token"},
    ]


def test_password_auth_mounts_the_password_file(render: Callable[..., Docs]) -> None:
    """IAM password auth: username and domain in the config, the password only as a file."""
    docs = render("password")
    assert _config(docs)["auth"] == {
        "username": "dcs-monitor",
        "password_file": f"{SECRET_DIR}/password",
        "domain_name": "my-domain",
    }
    assert "env" not in container(docs)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["password"]).decode() == "test-password-not-real"
    assert "test-password-not-real" not in yaml.safe_dump(one(docs, "Deployment"))


# ---- the rendered config against the real exporter's --config.check -----------------------------


def _check_config_like_the_pod(docs: Docs, secret_data: dict[str, str], tmp_path: Path) -> str:
    """Run ``--config.check`` on the rendered config with the pod's files and env recreated."""
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for item in volume["secret"]["items"]:
        (secrets / item["path"]).write_text(secret_data[item["key"]])
    env = dict(os.environ)
    for var in container(docs).get("env", []):
        env[var["name"]] = secret_data[var["valueFrom"]["secretKeyRef"]["key"]]
    config_text = one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text.replace(SECRET_DIR, str(secrets)))
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_rendered_config_passes_config_check(render: Callable[..., Docs], tmp_path: Path) -> None:
    """The kube-prometheus-stack values give a config the exporter accepts, with its 2 tasks."""
    docs = render("kube-prometheus-stack")
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert "OK, 2 tasks" in _check_config_like_the_pod(docs, data, tmp_path)


def test_existing_secret_config_passes_config_check(
    render: Callable[..., Docs], tmp_path: Path
) -> None:
    """The existingSecret values give a config the exporter accepts once the Secret's keys exist."""
    docs = render("existing-secret")
    data = {"AK": "TESTACCESSKEY0000001", "SK": "test-sk", "TOKEN": "test-token"}
    assert "OK, 1 task" in _check_config_like_the_pod(docs, data, tmp_path)


def test_password_config_passes_config_check(render: Callable[..., Docs], tmp_path: Path) -> None:
    """The password values give a config the exporter accepts."""
    docs = render("password")
    data = {"password": "test-password-not-real"}
    assert "OK, 1 task" in _check_config_like_the_pod(docs, data, tmp_path)


def test_discovery_config_passes_config_check(render: Callable[..., Docs], tmp_path: Path) -> None:
    """A discovery section with no task list gives a config the exporter accepts."""
    docs = render("discovery")
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert "OK, 0 tasks" in _check_config_like_the_pod(docs, data, tmp_path)
    config = yaml.safe_load(one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    assert config["discovery"]["name_regex"] == "^orders-"


def test_default_config_is_refused_with_what_to_fill_in(
    render: Callable[..., Docs], tmp_path: Path
) -> None:
    """The default values' config fails --config.check naming the empty access key and task list."""
    docs = render("defaults")
    config_file = tmp_path / "config.yaml"
    (tmp_path / "secret_key").write_text("")
    config_file.write_text(
        one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"].replace(SECRET_DIR, str(tmp_path))
    )
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(config_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "DCS_ACCESS_KEY": ""},
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "tasks" in result.stderr and "non-empty" in result.stderr
    assert "auth.access_key" in result.stderr


# ---- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--set", "config.polling.timout=5s"], "timout"),
        (["--set-json", 'config.tasks=[{"id":12345}]'], "id"),
        (["--set", "auth.method=token"], "method"),
        (["--set", "config.cloud.project_id=not-hex"], "project_id"),
        (["--set", "serviceMonitr.enabled=true"], "serviceMonitr"),
        (["--set", "config.discovery.name_regx=x"], "name_regx"),
        # sharding.replicas must be an integer of at least 1; sharding has no other keys.
        (["--set", "sharding.replicas=0"], "sharding.replicas"),
        (["--set", "sharding.replicas=-2"], "sharding.replicas"),
        (["--set-string", "sharding.replicas=3"], "sharding.replicas"),
        (["--set", "sharding.enabled=yes please"], "sharding.enabled"),
        (["--set", "sharding.replica=3"], "replica"),
    ],
)
def test_schema_rejects_bad_values(
    args: list[str], mentions: str, helm: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """values.schema.json refuses typos and wrong types before anything is rendered."""
    result = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args)
    assert result.returncode == 1
    assert "values don't meet the specifications of the schema" in result.stderr
    assert mentions in result.stderr


# ---- sharding: a StatefulSet, one shard per pod (docs/SCALING.md) --------------------------------


@pytest.mark.parametrize("values", sorted(v for v in VALUES_FILES if v != "sharded"))
def test_unsharded_render_has_the_deployment_and_no_shard_objects(
    values: str, render: Callable[..., Docs]
) -> None:
    """With sharding disabled (the default) the chart renders the Deployment, no StatefulSet,
    no headless Service and no --shard argument."""
    for extra in ((), ("--set", "sharding.enabled=false")):
        docs = render(values, *extra)
        deployment = one(docs, "Deployment", FULLNAME)
        assert not [d for d in docs if d["kind"] == "StatefulSet"]
        assert not [
            d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
        ]
        [container] = _pod_template(deployment)["spec"]["containers"]
        assert _shard_values(container.get("args", [])) == []


def _pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = workload["spec"]["template"]
    return template


def _shard_values(args: list[str]) -> list[str]:
    """The values of every --shard in a container's args (``--shard=X`` or ``--shard X``)."""
    found = [a.split("=", 1)[1] for a in args if a.startswith("--shard=")]
    found += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--shard"]
    return found


def test_sharded_renders_a_statefulset_instead_of_the_deployment(
    render: Callable[..., Docs],
) -> None:
    """N pods, Parallel, a headless governing Service, and no Deployment."""
    docs = render("sharded")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    sts = one(docs, "StatefulSet", FULLNAME)
    assert sts["apiVersion"] == "apps/v1"
    assert sts["metadata"]["namespace"] == NAMESPACE
    assert sts["spec"]["replicas"] == SHARDED_REPLICAS
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert "volumeClaimTemplates" not in sts["spec"]
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    labels = _pod_template(sts)["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "PrometheusRule",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "StatefulSet",
    ]


@pytest.mark.parametrize("replicas", [1, 3, 7])
def test_sharded_pods_run_shard_auto_with_the_replica_count(
    replicas: int, render: Callable[..., Docs]
) -> None:
    """Each pod gets exactly one --shard auto/N, N being the StatefulSet's replicas."""
    docs = render("sharded", "--set", f"sharding.replicas={replicas}")
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == replicas
    (exporter,) = _pod_template(sts)["spec"]["containers"]
    assert f"--shard=auto/{replicas}" in exporter["args"]
    assert _shard_values(exporter["args"]) == [f"auto/{replicas}"]


def test_sharded_pod_template_is_the_deployments_plus_the_shard_flag(
    render: Callable[..., Docs],
) -> None:
    """Same pod as the Deployment: security contexts, probes, checksums, env, volumes; only args differ."""
    sharded = _pod_template(one(render("sharded"), "StatefulSet"))
    plain = _pod_template(one(render("sharded", "--set", "sharding.enabled=false"), "Deployment"))
    (exporter,) = sharded["spec"]["containers"]
    (plain_exporter,) = plain["spec"]["containers"]
    assert exporter["args"] == [*plain_exporter["args"], f"--shard=auto/{SHARDED_REPLICAS}"]
    assert {**exporter, "args": None} == {**plain_exporter, "args": None}
    assert {**sharded["spec"], "containers": None} == {**plain["spec"], "containers": None}
    assert sharded["metadata"] == plain["metadata"]
    assert set(sharded["metadata"]["annotations"]) == {"checksum/config", "checksum/secret"}
    assert exporter["securityContext"]["readOnlyRootFilesystem"] is True
    assert exporter["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sharded["spec"]["securityContext"]["runAsNonRoot"] is True
    assert sharded["spec"]["automountServiceAccountToken"] is False
    assert exporter["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert exporter["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert {v["name"] for v in sharded["spec"]["volumes"]} == {"config", "credentials", "tmp"}


def test_sharded_extra_args_come_after_the_shard_flag(render: Callable[..., Docs]) -> None:
    """extraArgs still reach the container, after the chart's own flags."""
    sts = one(render("sharded", "--set", "extraArgs={--log.level=debug}"), "StatefulSet")
    (exporter,) = _pod_template(sts)["spec"]["containers"]
    assert exporter["args"][-2:] == [f"--shard=auto/{SHARDED_REPLICAS}", "--log.level=debug"]


def test_sharded_service_monitor_selects_the_scrape_service_only(
    render: Callable[..., Docs],
) -> None:
    """The ServiceMonitor matches the metrics Service, which selects every pod; not the headless one."""
    docs = render("sharded")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    match = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if match.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [FULLNAME]
    scrape = selected[0]
    assert "clusterIP" not in scrape["spec"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in {p["name"] for p in scrape["spec"]["ports"]}
    # Every pod of the StatefulSet is an endpoint of the scrape Service, so each is its own target.
    pod = _pod_template(one(docs, "StatefulSet"))
    assert scrape["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {"name": "metrics", "containerPort": 9713, "protocol": "TCP"} in pod["spec"][
        "containers"
    ][0]["ports"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert scrape["metadata"]["labels"]["app.kubernetes.io/name"] == "dcs-migration-exporter"


@pytest.mark.parametrize(
    ("extra", "pod_prefix"),
    [
        ((), FULLNAME),
        (("--set", "fullnameOverride=dcs-exporter-7"), "dcs-exporter-7"),
    ],
)
def test_sharded_pod_names_give_one_shard_each(
    extra: tuple[str, ...], pod_prefix: str, render: Callable[..., Docs]
) -> None:
    """The pod names rel-dcs-migration-exporter-0..N-1 map to shards 0..N-1 of N; pod N is refused."""
    sts = one(render("sharded", *extra), "StatefulSet")
    assert sts["metadata"]["name"] == pod_prefix
    (exporter,) = _pod_template(sts)["spec"]["containers"]
    (shard,) = _shard_values(exporter["args"])
    pods = [f"{pod_prefix}-{ordinal}" for ordinal in range(sts["spec"]["replicas"])]
    assert [parse_shard(shard, pod) for pod in pods] == [
        Shard(ordinal, SHARDED_REPLICAS) for ordinal in range(SHARDED_REPLICAS)
    ]
    with pytest.raises(ValueError, match="only 4"):
        parse_shard(shard, f"{pod_prefix}-{SHARDED_REPLICAS}")


def test_sharded_args_parse_with_the_real_cli(
    render: Callable[..., Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered args, in pod rel-dcs-migration-exporter-2 (HOSTNAME), give --shard 2/4."""
    sts = one(render("sharded"), "StatefulSet")
    (exporter,) = _pod_template(sts)["spec"]["containers"]
    monkeypatch.setenv("HOSTNAME", f"{FULLNAME}-2")
    args = build_parser().parse_args(exporter["args"])
    assert args.shard == Shard(2, SHARDED_REPLICAS)
    assert args.config_file == "/etc/dcs-migration-exporter/config.yaml"


def test_sharded_config_passes_config_check(render: Callable[..., Docs], tmp_path: Path) -> None:
    """The sharded values give a config the exporter accepts (every pod gets the same config)."""
    docs = render("sharded")
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    sts = one(docs, "StatefulSet")
    as_deployment = [{**sts, "kind": "Deployment"}, *(d for d in docs if d is not sts)]
    assert "OK, 3 tasks" in _check_config_like_the_pod(as_deployment, data, tmp_path)


def test_sharded_name_too_long_for_a_statefulset_is_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """Pod labels hold <StatefulSet name>-<hash>: names over 52 characters fail at render time."""
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "sharding.enabled=true"]
    ok = helm(*args, "--set", "fullnameOverride=" + "a" * 52)
    assert ok.returncode == 0, ok.stderr
    long = helm(*args, "--set", "fullnameOverride=" + "a" * 53)
    assert long.returncode == 1
    assert "longer than 52 characters" in long.stderr


def _notes(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, *extra: str
) -> str:
    """NOTES.txt rendered through a copy of the chart.

    helm template does not print NOTES.txt (and there is no cluster for a dry-run install), so a
    copy of the chart renders it into a ConfigMap through tpl.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-rendered.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '{{ tpl (.Files.Get "notes.txt") . | indent 4 }}\n'
    )
    result = helm(
        "template", RELEASE, str(chart), "-n", NAMESPACE, *extra,
        "--show-only", "templates/notes-rendered.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes: str = yaml.safe_load(result.stdout)["data"]["notes"]
    return notes


def test_notes_describe_the_shard_mode(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """NOTES.txt names the StatefulSet, its --shard auto/N and how to reach one shard's pod."""
    notes = _notes(helm, tmp_path, "-f", str(VALUES_FILES["sharded"]))
    assert f"Sharded: StatefulSet {FULLNAME} with 4 pods" in notes
    assert "--shard auto/4" in notes
    assert f"port-forward pod/{FULLNAME}-K 9713:9713" in notes
    assert "WARNING: replicaCount" not in notes
    plain = _notes(helm, tmp_path / "plain", "--set", "replicaCount=2")
    assert "Sharded" not in plain
    assert "WARNING: replicaCount is 2, so every replica polls every task" in plain
    assert "replicaCount" not in _notes(helm, tmp_path / "one")
