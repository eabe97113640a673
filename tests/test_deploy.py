"""The deployment files: what can be checked without a Docker engine or a cluster.

Dashboards JSON up to date with its generator; Grafana provisioning consistent with the dashboards
and the compose mounts; the compose file parses and points at files that exist, with migrations
before the proxy; Kubernetes manifests valid against the Kubernetes schemas (kubernetes-validate),
the ServiceMonitor by shape; the Dockerfile installs the package the way the README does.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"


def load_generator():
    spec = importlib.util.spec_from_file_location("grafana_generate", DEPLOY / "grafana/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- Grafana ------------------------------------------------------------------------------------


def test_committed_dashboards_match_the_generator():
    files = load_generator().render()
    assert sorted(files) == sorted(p.name for p in (DEPLOY / "grafana/dashboards").glob("*.json"))
    for name, text in files.items():
        assert (DEPLOY / "grafana/dashboards" / name).read_text() == text, \
            f"{name} is stale: run python deploy/grafana/generate.py"


def test_every_metric_the_service_exports_is_on_a_dashboard():
    from prometheus_client.metrics import MetricWrapperBase

    from service.telemetry import metrics
    names = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    assert len(names) >= 30  # the module's metrics were found
    charted = "".join(p.read_text() for p in (DEPLOY / "grafana/dashboards").glob("*.json"))
    assert sorted(n for n in names if n not in charted) == []


def test_dashboards_use_the_provisioned_datasource():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    for path in (DEPLOY / "grafana/dashboards").glob("*.json"):
        board = json.loads(path.read_text())
        assert board["uid"].startswith("turngate-") and board["title"]
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] in uids, (path.name, panel["title"])
                assert target["refId"], (path.name, panel["title"])


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/turngate.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in compose()["services"]["grafana"]["volumes"])
    assert (DEPLOY / mounts[path]).resolve() == (DEPLOY / "grafana/dashboards").resolve()
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana/provisioning").resolve()


# -- docker compose -----------------------------------------------------------------------------


def test_compose_has_the_stack_and_its_files_exist():
    services = compose()["services"]
    assert {"turngate", "migrate", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount: must exist, relative to the compose file
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        if "build" in svc:
            context = DEPLOY / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file()
            assert svc["build"].get("args", {}).get("VARIANT", "cpu") in ("cpu", "gpu")
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load((DEPLOY / prom_mounts["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        assert str(Path("/etc/prometheus") / rule_file.split("#")[0].strip()) in prom_mounts
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "turngate:8000" in targets


def test_compose_runs_migrations_before_the_proxy():
    services = compose()["services"]
    migrate, proxy = services["migrate"], services["turngate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert proxy["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["image"] == proxy["image"]  # the same build migrates and serves
    assert migrate["environment"]["TURNGATE_DATABASE_URL"] == proxy["environment"]["TURNGATE_DATABASE_URL"]
    assert proxy["environment"]["TURNGATE_DATABASE_URL"].startswith("postgresql://")
    assert proxy["environment"]["TURNGATE_REDIS_URL"].startswith("redis://redis:")


def test_migration_command_exists_in_the_cli():
    from service.cli import app
    result = CliRunner().invoke(app, ["db", "--help"])
    if "upgrade" not in result.output:
        pytest.skip("`turngate db upgrade` is not in the CLI yet (the store's migrations land separately)")
    assert CliRunner().invoke(app, ["db", "upgrade", "--help"]).exit_code == 0


# -- Kubernetes ---------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_fits_the_kubernetes_schema(path):
    for doc in k8s_docs(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no offline schema; checked by shape below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_servicemonitor_selects_the_service_port():
    (monitor,) = k8s_docs(K8S / "servicemonitor.yaml")
    (service,) = k8s_docs(K8S / "base/service.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[sm]", endpoint["interval"])


def test_prometheusrule_wraps_the_alert_rules():
    spec = importlib.util.spec_from_file_location("to_rule", DEPLOY / "prometheus/to_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (K8S / "prometheusrule.yaml").read_text() == module.render(), \
        "stale: run python deploy/prometheus/to_prometheusrule.py"
    (rule,) = k8s_docs(K8S / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]


def workload() -> dict:
    (doc,) = k8s_docs(K8S / "base/statefulset.yaml")
    return doc


def test_deployment_probes_resources_and_wiring():
    deploy = workload()
    spec = deploy["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    # The ConfigMap it reads, and the Secret it reads (created by the operator, shaped like the example).
    refs = {(k, e[k]["name"]) for e in container["envFrom"] for k in e}
    assert refs == {("configMapRef", "turngate"), ("secretRef", "turngate")}
    (secret,) = k8s_docs(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "turngate"
    (hpa,) = k8s_docs(K8S / "base/hpa.yaml")
    (pdb,) = k8s_docs(K8S / "base/pdb.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == deploy["kind"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always proceed


def test_migration_job_uses_the_deployment_image_and_settings():
    (job,) = k8s_docs(K8S / "migrate-job.yaml")
    deploy = workload()
    (jc,) = job["spec"]["template"]["spec"]["containers"]
    (dc,) = deploy["spec"]["template"]["spec"]["containers"]
    assert jc["args"] == ["db", "upgrade"] and jc["image"] == dc["image"] and jc["envFrom"] == dc["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    assert "migrate-job.yaml" not in kustomization["resources"]  # run first, by rollout.sh
    rollout = (K8S / "rollout.sh").read_text()
    assert rollout.index("migrate-job.yaml") < rollout.index("wait --for=condition=complete") \
        < rollout.index("kubectl kustomize")


def test_kustomizations_list_existing_files():
    for path in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(path.read_text())["resources"]:
            assert (path.parent / resource).exists(), f"{path}: {resource}"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed (its offline kustomize is optional)")
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kustomize_renders_valid_manifests(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (deploy,) = [d for d in docs if d["kind"] == "StatefulSet"]
    limits = deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")


def test_rollout_script_parses():
    assert subprocess.run(["bash", "-n", str(K8S / "rollout.sh")], check=False).returncode == 0


# -- Shutdown, spool, secrets --------------------------------------------------------------------


def settings_from(env: dict[str, str], monkeypatch):
    """The Settings turngate would build from exactly these environment variables."""
    from service.settings import Settings

    for name in [n for n in os.environ if n.upper().startswith("TURNGATE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def shutdown_drain_s() -> float:
    """What turngate spends after the last turn on SIGTERM: the gate's background work, then the store."""
    from service.gate.pipeline import Gate
    from service.store.sink import StoreSink

    return (inspect.signature(Gate.drain).parameters["timeout"].default
            + inspect.signature(StoreSink).parameters["drain_timeout_s"].default)


def compose_env(service: str) -> dict[str, str]:
    """A compose service's environment as the container gets it with nothing set on the host."""
    env = compose()["services"][service]["environment"]
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items() if v is not None}


def test_pods_outlive_their_longest_turn_and_the_drain(monkeypatch):
    """Kubernetes kills a pod terminationGracePeriodSeconds after it starts stopping it, preStop
    included: that must cover the endpoint removal, a turn that just started, and the drain."""
    spec = workload()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5  # endpoint removal reaches kube-proxy and ingress in a few seconds
    (configmap,) = k8s_docs(K8S / "base/configmap.yaml")
    settings = settings_from(configmap["data"], monkeypatch)
    longest_turn = max(route.deadline_s for route in settings.routes)
    assert longest_turn >= 120  # the default deadline_s
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + longest_turn + shutdown_drain_s()


def test_compose_stops_after_the_longest_turn_and_the_drain(monkeypatch):
    proxy = compose()["services"]["turngate"]
    grace = re.fullmatch(r"(\d+)s", proxy["stop_grace_period"])
    settings = settings_from(compose_env("turngate"), monkeypatch)
    assert int(grace.group(1)) >= max(r.deadline_s for r in settings.routes) + shutdown_drain_s()


def test_spool_is_on_a_volume_that_outlives_the_pod():
    """An emptyDir is deleted with its pod; the spool's claim comes from volumeClaimTemplates."""
    deploy = workload()
    assert deploy["kind"] == "StatefulSet"
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    (configmap,) = k8s_docs(K8S / "base/configmap.yaml")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == configmap["data"]["TURNGATE_SPOOL_DIR"]]
    pod_volumes = {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert mount["name"] not in pod_volumes
    (claim,) = [c for c in deploy["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # A scale-down keeps the claim, so turns spooled on it are written when that ordinal returns.
    assert deploy["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    # The compose stack keeps it on a named volume, which outlives the container.
    volumes = compose()["services"]["turngate"]["volumes"]
    assert any(v.split(":")[0] in compose()["volumes"] and v.split(":")[1] == "/var/lib/turngate/spool"
               for v in volumes)


def test_statefulset_governing_service_is_headless_and_not_scraped_twice():
    deploy = workload()
    services = [d for p in (K8S / "base").glob("service*.yaml") for d in k8s_docs(p)]
    (governing,) = [s for s in services if s["metadata"]["name"] == deploy["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    (monitor,) = k8s_docs(K8S / "servicemonitor.yaml")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = [s for s in services if wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["turngate"]
    resources = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"]
    assert {"service.yaml", "service-headless.yaml", "statefulset.yaml"} <= set(resources)
    # No TURNGATE_SERVICE_HOST & co. injected into the pods by the Service named turngate.
    assert deploy["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_no_deploy_file_holds_a_secret_that_works(monkeypatch):
    """The example Secret's placeholders are refused at start, it is never applied for the
    operator, and the compose stack sets no secret and no development flag."""
    from service.settings import SettingsError

    (secret,) = k8s_docs(K8S / "secret.example.yaml")
    with pytest.raises(SettingsError) as refused:
        settings_from(secret["stringData"], monkeypatch)
    for name in ("TURNGATE_ADMIN_KEY", "TURNGATE_KEY_HASH_SECRET", "TURNGATE_UPSTREAM_API_KEY",
                 "the password in TURNGATE_DATABASE_URL"):
        assert name in str(refused.value)
    resources = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())["resources"]
    assert not any(k8s_docs(K8S / "base" / r)[0]["kind"] == "Secret" for r in resources)
    assert not re.search(r"apply[^\n]*secret", (K8S / "rollout.sh").read_text())
    for service in ("turngate", "migrate"):
        env = compose()["services"][service]["environment"]
        assert not {"TURNGATE_ADMIN_KEY", "TURNGATE_API_KEYS", "TURNGATE_UPSTREAM_API_KEY", "TURNGATE_DEV"} & set(env)
        settings_from(compose_env(service), monkeypatch)  # starts as shipped


def test_deploy_files_set_only_turngate_settings():
    """A misspelt variable in a manifest would be ignored with only a warning: none may be."""
    from service.config_checks import unknown_variables
    from service.settings import known_variables

    known = known_variables()
    (configmap,) = k8s_docs(K8S / "base/configmap.yaml")
    (secret,) = k8s_docs(K8S / "secret.example.yaml")
    for env in (configmap["data"], secret["stringData"], compose_env("turngate"), compose_env("migrate")):
        assert unknown_variables(env, known) == []


# -- Docker -------------------------------------------------------------------------------------


def dockerfile_runs() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_dockerfile_installs_the_package_like_the_readme():
    readme = (ROOT / "README.md").read_text()
    readme_targets = set(re.findall(r"pip install (?:-q )?(?:-e )?(\.)(?:\s|&&|$)", readme))
    assert readme_targets == {"."}, "README should install the package with pip install (-e) ."
    installs = [m for run in dockerfile_runs() for m in re.findall(r"pip install ([^&;]+)", run)]
    targets = [a.strip() for i in installs for a in i.split() if not a.startswith("-")]
    assert "." in targets  # the README's `pip install .`, not a hand-kept dependency list
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for target in targets:
        if target.startswith('".['):
            assert target.strip('"')[2:-1] in extras
        elif target != ".":  # anything else is pinned to the pyproject's own requirement
            assert target.strip('"') in extras["gpu"], target


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.MULTILINE)
    assert len(stages) >= 3 and stages[-1][1] == "runtime"
    final = text[text.rindex("\nFROM "):]
    user = re.search(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE) and "onnxruntime-gpu" in text and "nvidia/cuda:" in text
    assert "EXPOSE 8000" in final and '"--port", "8000"' in final


def test_gpu_image_pairs_the_pinned_onnxruntime_gpu_with_its_cuda():
    """onnxruntime-gpu 1.31.1 from PyPI links CUDA 13 (libcublasLt.so.13, libcudart.so.13) and
    cuDNN 9; on another CUDA major its CUDA provider does not load and the critic silently runs on
    the CPU. The image and the `gpu` extra install the same release, on a CUDA 13 cuDNN base."""
    docker = (ROOT / "Dockerfile").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert extra == ["onnxruntime-gpu==1.31.1"] and '"onnxruntime-gpu==1.31.1"' in docker
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", docker, re.MULTILINE)
    assert base and base.group(1) == "13"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore matching, enough for these patterns (no `!` exceptions in the file)."""
    for pattern in patterns:
        p = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(Path(path).name, p) \
                or any(fnmatch.fnmatch("/".join(path.split("/")[:i]), pattern)
                       for i in range(1, path.count("/") + 1)):
            return True
    return False


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for needed in ["pyproject.toml", "setup.py", "README.md", "service/app.py", "critic_models/__init__.py",
                   "critic_models/default/critic.json", "critic_models/default/model.onnx", "migrations/env.py"]:
        assert not _ignored(needed, patterns), needed
    for dropped in [".venv/bin/python", ".git/HEAD", "tests/test_proxy.py", "turngate.db",
                    "service/__pycache__/app.cpython-311.pyc"]:
        assert _ignored(dropped, patterns), dropped


def test_default_critic_ships_in_the_package(tmp_path):
    """The image gets the default critic through `pip install .`: the bundle must be package data."""
    bundle = ROOT / "critic_models/default"
    if not (bundle / "critic.json").exists():
        pytest.skip("critic_models/default/ not produced yet")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                          "-w", str(tmp_path), str(ROOT)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import zipfile
    (wheel,) = tmp_path.glob("turngate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in bundle.iterdir():
        assert f"critic_models/default/{f.name}" in names
