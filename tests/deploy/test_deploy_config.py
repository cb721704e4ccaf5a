"""Static checks of the Docker deployment files (no Docker needed).

The Prometheus and Grafana images cannot be pulled in CI, so their configuration is
checked here: the Grafana dashboard JSON against the structure Grafana provisions
(panels, grid positions, Prometheus targets naming the server's metrics, a datasource
uid that the provisioned datasource defines), the compose file's services, volume,
profiles, health check and ports, and the Prometheus scrape targets.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from service.metrics import Metrics

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "supermask.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASH_PROVIDER = DOCKER / "grafana" / "provisioning" / "dashboards" / "supermask.yml"
PROMETHEUS = DOCKER / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]

#: what the dashboard must show, as metric names exported by service/metrics.py
REQUIRED_METRICS = {
    "latency per task": "supermask_request_duration_seconds_bucket",
    "swap-ins": "supermask_task_load_duration_seconds_count",
    "cache hits": "supermask_cache_hits_total",
    "cache misses": "supermask_cache_misses_total",
    "resident tasks": "supermask_resident_tasks",
    "process memory": "supermask_process_resident_memory_bytes",
    "backbone memory": "supermask_backbone_bytes",
    "cache memory": "supermask_cache_bytes",
    "hot tier promotions": "supermask_hot_promotion_duration_seconds_count",
    "hot tier promotion time": "supermask_hot_promotion_duration_seconds_bucket",
    "hot tier memory": "supermask_hot_bytes",
    "429s": "supermask_overloaded_requests_total",
    "requests in progress (queue)": "supermask_admitted_requests",
    "batch sizes": "supermask_inference_rows_bucket",
    "hot tier tasks": "supermask_hot_tasks",
    "warm tier tasks": "supermask_resident_tasks",
    "device tier tasks": "supermask_device_resident_tasks",
    "CPU precision": "supermask_cpu_precision_info",
}
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "row", "heatmap"}


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _exported_names() -> set[str]:
    """Every sample name the server's registry can export (histogram/counter suffixes included)."""
    m = Metrics()
    m.request_seconds.labels(task="t").observe(0.01)
    m.load_seconds.labels(task="t").observe(0.01)
    m.cache_hits.labels(task="t").inc()
    m.cache_misses.labels(task="t").inc()
    m.requests.labels(task="t", outcome="ok").inc()
    m.rows.labels(task="t").observe(1)
    m.resident_task_bytes.labels(task="t").set(1)
    m.hot_promotion_seconds.labels(task="t").observe(0.01)
    m.device_swap_in_seconds.labels(task="t").observe(0.01)
    m.cpu_precision.labels("fp32").set(1)
    names = set()
    if not sys.platform.startswith("linux"):  # the process collector exports nothing off Linux
        names.update(f"supermask_process_{n}" for n in ("resident_memory_bytes", "virtual_memory_bytes",
                                                        "cpu_seconds_total", "start_time_seconds"))
    for family in m.registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def _targets(dash: dict) -> list[tuple[dict, dict]]:
    out = []
    for panel in dash["panels"]:
        for child in [panel, *panel.get("panels", [])]:
            out.extend((child, t) for t in child.get("targets", []))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def datasource_uids() -> set[str]:
    doc = _load_yaml(DATASOURCES)
    assert doc["apiVersion"] == 1
    return {d["uid"] for d in doc["datasources"] if d["type"] == "prometheus"}


def test_dashboard_top_level(dashboard):
    for key, typ in {"uid": str, "title": str, "panels": list, "schemaVersion": int, "time": dict}.items():
        assert isinstance(dashboard.get(key), typ), key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["panels"]


def test_dashboard_panels_are_well_formed(dashboard):
    ids = []
    for p in dashboard["panels"]:
        ids.append(p["id"])
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p.get("title"), p
        g = p["gridPos"]
        assert set(g) >= {"x", "y", "w", "h"}
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, (p["title"], g)
        if p["type"] not in {"row", "text"}:
            assert p["targets"], p["title"]
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), p["title"]
            assert all(t.get("expr") for t in p["targets"]), p["title"]
    assert len(set(ids)) == len(ids), "panel ids must be unique"


def test_dashboard_datasources_match_provisioned_uid(dashboard, datasource_uids):
    assert datasource_uids, "no Prometheus datasource provisioned"
    seen = set()
    for panel, target in _targets(dashboard):
        for ds in (panel.get("datasource"), target.get("datasource")):
            if ds is not None:
                assert ds["type"] == "prometheus"
                seen.add(ds["uid"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            seen.add(var["datasource"]["uid"])
    assert seen and seen <= datasource_uids, (seen, datasource_uids)


def test_dashboard_shows_latency_swapins_cache_resident_memory(dashboard):
    exprs = " ".join(t["expr"] for _, t in _targets(dashboard))
    missing = {what: name for what, name in REQUIRED_METRICS.items() if name not in exprs}
    assert not missing, f"the dashboard does not show {missing}"
    latency = [t["expr"] for _, t in _targets(dashboard) if "supermask_request_duration_seconds_bucket" in t["expr"]]
    assert any("histogram_quantile" in e and "by (task, le)" in e for e in latency), "latency must be per task"


def test_dashboard_references_only_exported_metrics(dashboard):
    exported = _exported_names()
    used = set()
    for _, t in _targets(dashboard):
        used.update(re.findall(r"\bsupermask_[a-z_]+\b", t["expr"]))
    unknown = used - exported
    assert not unknown, f"the dashboard queries metrics the server does not export: {sorted(unknown)}"


def test_dashboard_provider_points_at_mounted_folder():
    doc = _load_yaml(DASH_PROVIDER)
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    compose = _load_yaml(COMPOSE)
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_prometheus_scrapes_the_server_metrics():
    doc = _load_yaml(PROMETHEUS)
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    job = jobs["supermask"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    compose = _load_yaml(COMPOSE)
    assert "server:8000" in targets and "server" in compose["services"]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in compose["services"], f"{target} is not a compose service"
        assert port == "8000"
    assert re.fullmatch(r"\d+[smh]", doc["global"]["scrape_interval"])


def test_compose_server_service():
    doc = _load_yaml(COMPOSE)
    server = doc["services"]["server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert "profiles" not in server, "the CPU server runs without a profile"
    # mask store on a named volume
    assert "masks:/data/masks" in server["volumes"]
    assert "masks" in doc["volumes"]
    # published on loopback by default
    (port,) = server["ports"]
    assert port.startswith("${SUPERMASK_BIND:-127.0.0.1}:") and port.endswith(":8000")
    # health check on /healthz
    assert "/healthz" in " ".join(server["healthcheck"]["test"])
    # no secret literal in the compose file: the token comes from the environment or a secret file
    env = server["environment"]
    assert env["SUPERMASK_ADMIN_TOKEN"] == "${SUPERMASK_ADMIN_TOKEN:-}"
    assert "admin_token" in server["secrets"]
    assert doc["secrets"]["admin_token"]["file"].startswith("${SUPERMASK_ADMIN_TOKEN_FILE:-")


def test_compose_gpu_and_monitoring_profiles():
    doc = _load_yaml(COMPOSE)
    gpu = doc["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("prometheus", "grafana"):
        assert doc["services"][name]["profiles"] == ["monitoring"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in doc["services"]["prometheus"]["volumes"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_classic_builder_non_root_healthcheck(path):
    text = path.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M), "no # syntax= lines (classic builder)"
    assert "--mount" not in text, "no RUN --mount (classic builder)"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert re.search(r"^VOLUME .*/data/masks", text, re.M)
    assert "COPY examples/masks/" in text
    assert "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text
    assert "ADMIN_TOKEN" not in text, "no admin token in the image"


def test_cpu_dockerfile_never_takes_the_cuda_torch():
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "COPY docker/wheels/" in text
    assert "torch.version.cuda" in text  # the build asserts it got a CPU torch
    assert "--constraint" in text  # the project install cannot replace torch


def test_cuda_runtime_stage_can_build_triton_launchers():
    """The fused kernel is JIT-compiled by Triton, whose launcher needs a C compiler and Python.h at run time."""
    text = (DOCKER / "Dockerfile.cuda").read_text()
    runtime = re.split(r"^FROM ", text, flags=re.M)[-1]  # the last stage is the image that runs
    installs = " ".join(re.findall(r"apt-get install [^&]*", runtime))
    for package in ("gcc", "libc6-dev", "python3-dev"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", installs), package


def test_dockerignore_keeps_the_context_small():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".venv", "runs", "masks", "**/__pycache__"):
        assert entry in lines, entry


def test_dashboard_has_a_replica_variable_every_query_honours(dashboard):
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert "replica" in names and "task" in names
    for panel, target in _targets(dashboard):
        assert 'replica=~"$replica"' in target["expr"], (panel["title"], target["expr"])
    by_replica = [t["expr"] for _, t in _targets(dashboard) if "by (replica" in t["expr"]]
    assert any("supermask_requests_total" in e for e in by_replica)


RAY_DIR = ROOT / "deploy" / "ray"


def test_serve_config_is_valid_and_its_args_are_settings(tmp_path):
    from service.settings import Settings

    doc = _load_yaml(RAY_DIR / "serve.yaml")
    (app,) = doc["applications"]
    assert app["import_path"] == "service.fleet.app:build_app" and app["route_prefix"] == "/"
    unknown = set(app["args"]) - set(Settings.model_fields)
    assert not unknown, f"serve.yaml args that are not Settings fields: {sorted(unknown)}"
    Settings(**app["args"])  # and valid ones
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed")
    schema.ServeDeploySchema.model_validate(doc)
    from service.fleet.app import build_app

    built = build_app({**app["args"], "store_url": tmp_path.as_uri()})  # the graph, built without a cluster
    assert len(list(tmp_path.glob("*.smask"))) == 6  # an empty store is seeded once, by the builder
    assert type(built).__name__ == "Application"
    names = {d["name"] for d in app["deployments"]}
    assert names <= {"SupermaskModel", "SupermaskIngress"}


def test_fleet_prometheus_config_scrapes_the_ingress_and_ray():
    doc = _load_yaml(RAY_DIR / "prometheus.yml")
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert jobs["supermask-fleet"]["metrics_path"] == "/metrics"
    assert jobs["ray"]["file_sd_configs"][0]["files"][0].endswith("prom_metrics_service_discovery.json")


def test_dashboard_shows_the_hot_tier_hit_ratio_and_promotion_time_per_task(dashboard):
    exprs = [t["expr"] for _, t in _targets(dashboard)]
    hit = [e for e in exprs if "supermask_hot_promotion_duration_seconds_count" in e
           and "supermask_requests_total" in e]
    assert hit and hit[0].startswith("1 - "), "the hot tier hit ratio: 1 - promotions / requests"
    assert any("histogram_quantile" in e and "supermask_hot_promotion_duration_seconds_bucket" in e
               and "by (task, le)" in e for e in exprs)


def test_no_scrape_target_is_down_on_a_cpu_deployment():
    """Prometheus (profile monitoring) names statically only services that run without a profile; the GPU server
    (profile gpu) is found by Docker's DNS, so its target exists only while it runs."""
    doc = _load_yaml(PROMETHEUS)
    services = _load_yaml(COMPOSE)["services"]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    for job in jobs.values():
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host = target.rsplit(":", 1)[0]
                if host in services:
                    assert not services[host].get("profiles"), f"{target} is down without its profile"
    gpu = [j for j in jobs.values() if any("server-gpu" in d["names"] for d in j.get("dns_sd_configs", []))]
    assert len(gpu) == 1, "the GPU server is scraped by DNS service discovery"
    (sd,) = gpu[0]["dns_sd_configs"]
    assert sd["type"] == "A" and sd["port"] == 8000 and services["server-gpu"]["profiles"] == ["gpu"]
    assert {"target_label": "device", "replacement": "cuda"} in gpu[0]["relabel_configs"]


def _torch_install_script() -> str:
    """The CPU Dockerfile's RUN instruction that installs torch, as the shell runs it (continuations joined)."""
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("RUN ") and "/tmp/wheels" in ln + lines[i + 1])
    body = []
    for ln in lines[start:]:
        body.append(ln.rstrip().removesuffix("\\"))
        if not ln.rstrip().endswith("\\"):
            break
    return " ".join(body).removeprefix("RUN ")  # Docker drops each backslash-newline: one line


def test_cpu_docker_build_fails_fast_naming_docker_wheels_when_the_cpu_index_is_unreachable(tmp_path):
    """The torch step run as the build runs it (bash -o pipefail), its index on a loopback port nobody listens
    on and a pip that would install anything: it stops with an error naming docker/wheels/ before calling
    pip, instead of falling back to PyPI's CUDA torch."""
    import os
    import subprocess

    from tests.conftest import free_port

    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG TORCH_LOCAL_VERSION=+cpu" in text  # no other index has the +cpu version: no PyPI fallback
    bin_dir, wheels = tmp_path / "bin", tmp_path / "wheels"
    bin_dir.mkdir()
    wheels.mkdir()
    calls = tmp_path / "pip-calls"
    (bin_dir / "pip").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 0\n")
    (bin_dir / "pip").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    script = _torch_install_script().replace("/tmp/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCH_VERSION": "2.13.0",
           "TORCH_LOCAL_VERSION": "+cpu", "TORCH_INDEX_URL": f"http://127.0.0.1:{free_port()}/whl/cpu"}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0, done.stdout
    assert "docker/wheels/" in done.stderr and "cannot be reached" in done.stderr
    assert not calls.exists(), f"pip was called: {calls.read_text()}"
    # with a wheel in docker/wheels/ the step installs that wheel and nothing else
    wheel = wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    subprocess.run(["bash", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert calls.read_text().split() == ["install", str(wheel)]
