"""deploy/kubernetes/ and the Dockerfile, checked without a cluster or Docker.

Every manifest is validated against the Kubernetes schemas (kubernetes-validate, which bundles
them: offline, strict, so a misspelt field fails too); then what no schema can see: that the
kustomization applies every manifest, that probes and Services name ports the containers declare,
that the servers' and bridges' arguments parse with tokenwire's own parser into settings that
fit the probes, ports, mounts (chats' KV on a writable volume), CPU limit and termination grace,
that the router's haproxy.cfg passes `haproxy -c` and mirrors clients/haproxy_config.py, that
the autoscaler scales the server Deployment on a metric the server exports, and that the image
does not run as root.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tokenwire import affinity
from tokenwire.server.app import KV_FLUSH_S
from tokenwire.server.settings import parse_bytes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The schemas of Kubernetes 1.31 (the oldest release supported here) and of the newest one bundled.
OLDEST_KUBERNETES = "1.31"
ON_THEIR_OWN = {"pull-models-job.yaml"}  # applied by hand (docs/deploy.md), not by kustomize
NAMESPACE = "tokenwire"
FLUSH_S = 15  # allowed for the chat store's flush after the drain
POST_CANCEL_S = 10  # server/app.py drain(): cancelled handlers get this long to store their replies
WORKLOADS = ("Deployment", "StatefulSet", "Job")


@functools.cache
def manifests() -> dict[str, list[dict]]:
    """deploy/kubernetes/*.yaml but the kustomization -> their documents (read once: do not modify)."""
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(DEPLOY.glob("*.yaml")) if path.name != "kustomization.yaml"}


@functools.cache
def resources() -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str, name: str) -> dict:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def ports_of(c: dict) -> dict[str | int, int]:
    """A container's ports by name and by number -> number."""
    ports: dict[str | int, int] = {}
    for p in c.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def pre_stop_sleep(c: dict) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def container_env(workload: dict, c: dict) -> dict[str, str]:
    """The environment the kubelet would give the container: literal values, Secrets' values (from
    the Secret manifests here), the CPU limit, the namespace."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = one("Secret", ref["name"]).get("stringData", {})
            assert ref["key"] in data or ref.get("optional"), \
                f"{var['name']}: Secret {ref['name']} has no {ref['key']}"
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref.get("containerName") == c["name"], ref
            env[var["name"]] = str(cpu_cores(c["resources"]["limits"]["cpu"]))
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace", source
            env[var["name"]] = NAMESPACE
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


def cpu_cores(quantity: str) -> int:
    """limits.cpu through resourceFieldRef with divisor 1: whole cores, rounded up."""
    text = str(quantity)
    millis = int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)
    return -(-millis // 1000)


def parse_cli(args: list[str], env: dict[str, str], monkeypatch):
    """`tokenwire ARGS` with the container's environment: the argparse namespace."""
    from tokenwire.clients.cli import build_parser

    for name in list(os.environ):
        if name.startswith("TOKENWIRE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return build_parser().parse_args(args)
    except SystemExit:  # argparse said why on stderr
        pytest.fail(f"`tokenwire {shlex.join(args)}` does not parse (see the captured stderr)")


# ---- the schemas and the kustomization ----------------------------------------------------------

def test_every_manifest_passes_the_kubernetes_schemas() -> None:
    try:
        from kubernetes_validate import utils as kv
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: `make setup` installs the dev extra")
    found = manifests()
    assert found, "no manifests in deploy/kubernetes"
    for version in (OLDEST_KUBERNETES, kv.major_minor(kv.latest_version())):
        for name, docs in found.items():
            for doc in docs:
                what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as exc:
                    path = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{what} does not validate against Kubernetes {version}: {path}: {exc.message}")
                except kv.SchemaNotFoundError as exc:
                    pytest.fail(f"{what}: {exc.message}")


def test_the_kustomization_applies_every_manifest_once() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(manifests()) - ON_THEIR_OWN
    keys = [(r["kind"], r["metadata"]["name"]) for r in resources()]
    assert len(keys) == len(set(keys)), "two resources of one kind share a name"
    assert one("Namespace", NAMESPACE)
    for name in ON_THEIR_OWN:  # applied without kustomize: they name the namespace themselves
        assert all(doc["metadata"].get("namespace") == NAMESPACE for doc in manifests()[name])
    images = {c["image"].split(":")[0] for r in resources() if r["kind"] in WORKLOADS
              for c in pod_spec(r)["containers"]}
    assert "tokenwire" in images and "tokenwire" in {i["name"] for i in kustomization["images"]}


# ---- ports, probes, Services -------------------------------------------------------------------

def test_probes_point_at_declared_container_ports() -> None:
    checked = 0
    for workload in (r for r in resources() if r["kind"] in WORKLOADS):
        for c in pod_spec(workload)["containers"]:
            ports = ports_of(c)
            if workload["kind"] != "Job":
                assert {"readinessProbe", "livenessProbe"} <= set(c), f"{workload['metadata']['name']}/{c['name']}"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action in probe:
                        port = probe[action]["port"]
                        assert port in ports, f"{workload['metadata']['name']}/{c['name']} {kind} port {port!r} " \
                                              f"is not one of its ports {sorted(map(str, ports))}"
                        if action == "grpc":
                            assert isinstance(port, int), "a gRPC probe takes a port number, not a name"
                        checked += 1
    assert checked >= 8

    server = container(one("Deployment", "tokenwire-server"), "server")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[kind]["grpc"]["port"] == ports_of(server)["grpc"], "the servers are probed by gRPC health"
    bridge = container(one("Deployment", "tokenwire-bridge"), "bridge")
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert bridge["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_services_select_pods_and_name_their_ports() -> None:
    workloads = [r for r in resources() if r["kind"] in ("Deployment", "StatefulSet")]
    for service in (r for r in resources() if r["kind"] == "Service"):
        selector = service["spec"]["selector"]
        chosen = [w for w in workloads
                  if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)} workloads"
        ports = {k: v for c in pod_spec(chosen[0])["containers"] for k, v in ports_of(c).items()}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {service['metadata']['name']}: {port['targetPort']!r}"
            assert ports[port["targetPort"]] == port["port"], "Services keep the containers' port numbers"
    for workload in workloads:  # and each selector picks its own pods
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()
    for name in ("tokenwire-server", "tokenwire-bridge", "tokenwire-postgres"):  # DNS lists the pods
        assert one("Service", name)["spec"]["clusterIP"] == "None"
    assert one("StatefulSet", "tokenwire-postgres")["spec"]["serviceName"] == "tokenwire-postgres"


# ---- the server and the bridge, as tokenwire reads their arguments ------------------------------

def test_the_server_deployment_fits_its_settings(monkeypatch) -> None:
    from tokenwire.clients.cli import _server_config
    from tokenwire.hosts import bind_refusal, is_loopback, split_list

    deployment = one("Deployment", "tokenwire-server")
    c = container(deployment, "server")
    env = container_env(deployment, c)
    args = expand(c["args"], env)
    namespace = parse_cli(args, env, monkeypatch)
    assert namespace.command == "serve"
    config = _server_config(namespace)
    ports = ports_of(c)

    assert config.port == ports["grpc"] and config.metrics_port == ports["metrics"]
    assert not is_loopback(config.host) and not bind_refusal(config.host, split_list(config.allowed_hosts)), \
        "the metrics listener would refuse to start on that address"
    assert config.threads == cpu_cores(c["resources"]["limits"]["cpu"]) >= 1, "onnxruntime threads = the CPU limit"
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert config.database.startswith("postgresql://"), "replicas share one PostgreSQL"
    assert "--database" not in " ".join(c["args"]), "the database URL (a password) comes from the Secret's env"

    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    budget = pre_stop_sleep(c) + config.drain_s + FLUSH_S + KV_FLUSH_S
    assert grace > budget, f"terminationGracePeriodSeconds {grace} must exceed preStop + --drain + flush = {budget}"
    assert grace >= budget + POST_CANCEL_S, "and leave the cancelled replies their time to be stored"
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= config.drain_s, \
        "liveness must not give up on a replica while it drains"

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    models = next(m for m in mounts.values() if Path(m["mountPath"]) == Path(config.models_dir))
    assert models.get("readOnly"), "the servers only read the model store"
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "tokenwire-models"
    assert one("PersistentVolumeClaim", "tokenwire-models")
    security = pod_spec(deployment)["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    # The root file system is read-only: chats' KV needs a writable volume of its own, bigger than its budget.
    kv = next(m for m in mounts.values() if config.kv_root.is_relative_to(m["mountPath"]))
    assert not kv.get("readOnly") and config.kv_root != Path(kv["mountPath"]), "the server makes its 0700 folder"
    assert 0 < config.kv_disk_budget_bytes < parse_bytes(volumes[kv["name"]]["emptyDir"]["sizeLimit"].rstrip("i"))


def test_the_database_url_names_the_postgres_service() -> None:
    from urllib.parse import urlsplit

    url = urlsplit(one("Secret", "tokenwire-server")["stringData"]["database-url"])
    postgres = one("StatefulSet", "tokenwire-postgres")
    env = {v["name"]: v.get("value") for v in container(postgres, "postgres")["env"]}
    assert (url.hostname, url.port) == ("tokenwire-postgres", ports_of(container(postgres, "postgres"))["postgres"])
    assert url.username == env["POSTGRES_USER"] and url.path == "/" + env["POSTGRES_DB"]
    assert url.password == one("Secret", "tokenwire-postgres")["stringData"]["password"]
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_bridge_deployment_fits_its_settings(monkeypatch) -> None:
    from tokenwire.bridge.config import BridgeSettings
    from tokenwire.server import settings

    deployment = one("Deployment", "tokenwire-bridge")
    c = container(deployment, "bridge")
    env = container_env(deployment, c)
    namespace = parse_cli(expand(c["args"], env), env, monkeypatch)
    assert namespace.command == "bridge"
    bridge = settings.from_namespace(BridgeSettings, namespace)
    bridge.validate()  # raises where `tokenwire bridge` would refuse to start
    assert bridge.http_port == ports_of(c)["http"]
    host, port = bridge.grpc_target.rsplit(":", 1)
    grpc_door = one("Service", "tokenwire-grpc")
    assert host == grpc_door["metadata"]["name"] and int(port) == grpc_door["spec"]["ports"][0]["port"], \
        "the bridges reach the servers through the router's gRPC front door"


def test_the_pull_job_fills_the_store_the_servers_read(monkeypatch) -> None:
    job = one("Job", "tokenwire-pull-models")
    c = container(job, "pull")
    namespace = parse_cli(expand(c["args"], container_env(job, c)), {}, monkeypatch)
    assert namespace.command == "pull" and namespace.name
    (mount,) = c["volumeMounts"]
    assert Path(namespace.models_dir) == Path(mount["mountPath"]) and not mount.get("readOnly")
    claim = next(v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]
    assert claim["claimName"] == "tokenwire-models"
    assert "export" in c["image"] or "builder" in c["image"], "pull needs the export extra: the builder image"


# ---- the router ---------------------------------------------------------------------------------

def haproxy_cfg() -> str:
    return one("ConfigMap", "tokenwire-router")["data"]["haproxy.cfg"]


def sections(config: str) -> dict[str, list[str]]:
    """haproxy.cfg's sections ("defaults", "backend servers_by_load", ...) -> their lines, stripped,
    comments and blank lines left out."""
    out: dict[str, list[str]] = {}
    current = ""
    for raw in config.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.strip().startswith("#") else ""
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = line.strip()
            out[current] = []
        else:
            out[current].append(" ".join(line.split()))
    return out


def test_the_router_configuration_passes_haproxy_check(tmp_path) -> None:
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    assert haproxy, "HAProxy is not installed: `make haproxy` installs Debian's"
    router = one("Deployment", "tokenwire-router")
    c = container(router, "haproxy")
    env = container_env(router, c)
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_cfg())
    checked = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **env})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr

    # The command reads the ConfigMap where the Deployment mounts it.
    config_file = Path(c["command"][c["command"].index("-f") + 1])
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert config_file == Path(mount["mountPath"]) / "haproxy.cfg"
    assert next(v for v in pod_spec(router)["volumes"] if v["name"] == "config")["configMap"]["name"] == \
        "tokenwire-router"


def test_the_router_mirrors_the_local_cluster_and_finds_the_pods() -> None:
    from tokenwire.clients.haproxy_config import Replica, render

    ours = sections(haproxy_cfg())
    local = sections(render([Replica("r1", 1001, 1002, 1003)], 8080, 50050, 8404))
    assert set(local["defaults"]) <= set(ours["defaults"]), "timeouts, retries and redispatch as `tokenwire cluster`"
    for name in ("backend bridges", "backend servers_by_affinity", "backend servers_by_load"):
        kept = [line for line in local[name] if not line.startswith(("server ", "default-server "))]
        assert set(kept) <= set(ours[name]), f"{name}: balance, hashing and checks as `tokenwire cluster`"
    assert f"balance hdr({affinity.HEADER})" in ours["backend servers_by_affinity"]
    assert "hash-type consistent" in ours["backend servers_by_affinity"]
    routed = f"use_backend servers_by_affinity if {{ req.hdr({affinity.HEADER}) -m found }}"
    assert routed in ours["frontend grpc_front"]
    assert "init-addr none" in " ".join(ours["defaults"]), "a start (and haproxy -c) needs no DNS answer"

    # Each bind is a port of the router's container, and the front doors' Services lead to them.
    router = container(one("Deployment", "tokenwire-router"), "haproxy")
    ports = ports_of(router)
    binds = {name: int(line.split()[1].rsplit(":", 1)[1]) for name, lines in ours.items()
             for line in lines if line.startswith("bind ")}
    assert binds == {"frontend http_front": ports["http"], "frontend grpc_front": ports["grpc"],
                     "frontend stats": ports["stats"]}
    for service, door in (("tokenwire-http", "http"), ("tokenwire-grpc", "grpc")):
        assert ports[one("Service", service)["spec"]["ports"][0]["targetPort"]] == ports[door]
    assert "proto h2" in " ".join(ours["frontend grpc_front"])

    # The server-template slots resolve the headless Services' names, on their ports; the servers'
    # slots carry h2 and are checked on the metrics port; there are enough slots for the autoscalers.
    def templates(backend: str) -> list[list[str]]:
        return [shlex.split(line) for line in ours[backend] if line.startswith("server-template ")]

    server = container(one("Deployment", "tokenwire-server"), "server")
    for backend, service, port_name in (("backend servers_by_affinity", "tokenwire-server", "grpc"),
                                        ("backend servers_by_load", "tokenwire-server", "grpc"),
                                        ("backend bridges", "tokenwire-bridge", "http")):
        (template,) = templates(backend)
        _, _, slots, address, *options = template
        port = next(p["port"] for p in one("Service", service)["spec"]["ports"] if p["name"] == port_name)
        assert address == f"{service}.${{POD_NAMESPACE}}.svc.${{CLUSTER_DOMAIN}}:{port}", address
        assert int(slots) >= one("HorizontalPodAutoscaler", service)["spec"]["maxReplicas"], \
            f"{backend}: fewer slots than the autoscaler's maxReplicas"
        assert "check" in options
        if service == "tokenwire-server":
            assert options[options.index("proto") + 1] == "h2"
            assert int(options[options.index("port") + 1]) == ports_of(server)["metrics"]
            assert options[options.index("check-proto") + 1] == "h1"
    env = {v["name"] for v in router["env"]}
    assert {"POD_NAMESPACE", "CLUSTER_DOMAIN"} <= env


# ---- disruption and scaling ---------------------------------------------------------------------

def test_the_autoscaler_scales_the_servers_on_queue_depth() -> None:
    from tokenwire.server.metrics import PrometheusMetrics

    hpa = one("HorizontalPodAutoscaler", "tokenwire-server")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "tokenwire-server")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    exported = {m.name for m in PrometheusMetrics().registry.collect()}
    adapter_name = metric["pods"]["metric"]["name"]
    assert adapter_name == "tokenwire_num_requests_waiting"
    assert "tokenwire:num_requests_waiting" in exported, "the metric the adapter renames is the server's"
    deployment = one("Deployment", "tokenwire-server")
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    for other in (r for r in resources() if r["kind"] == "HorizontalPodAutoscaler"):
        ref = other["spec"]["scaleTargetRef"]
        assert one(ref["kind"], ref["name"]), f"{other['metadata']['name']} scales nothing"

    pdb = one("PodDisruptionBudget", "tokenwire-server")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a node drain could never evict a server"
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert adapter_name in doc and "tokenwire:num_requests_waiting" in doc, "docs/deploy.md gives the adapter rule"


# ---- the image ----------------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments) with continuations joined, in
    stages: the first holds the global ARGs before the first FROM, each FROM starts another."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def test_the_image_runs_tokenwire_as_a_user_and_keeps_models_on_a_volume(monkeypatch) -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the image must name a user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root user (runAsNonRoot can check it)"
    pod_users = {pod_spec(r)["securityContext"]["runAsUser"] for r in resources() if r["kind"] in WORKLOADS
                 and container_image(r) == "tokenwire"}
    assert pod_users == {int(user)}

    args = dict((word, rest) for word, rest in final if word in ("ENTRYPOINT", "CMD"))
    assert yaml.safe_load(args["ENTRYPOINT"]) == ["tokenwire"]
    command = yaml.safe_load(args["CMD"])
    namespace = parse_cli(command, {}, monkeypatch)
    assert namespace.command == "serve" and namespace.host == "0.0.0.0"

    arg_lines = [rest for stage in stages for word, rest in stage if word == "ARG"]
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in arg_lines
    extras = next(rest.split("=", 1)[1] for rest in arg_lines if rest.startswith("EXTRAS="))
    assert "postgres" in extras.split(",") and "export" not in extras.split(","), "serving needs no torch"
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "TOKENWIRE_MODELS=/models" in env

    # The build context: what `pip install .` needs, nothing else (no .venv, no model store).
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]} | \
        {folder.split("/")[0] + "/" for folder in project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= {line[1:] for line in ignore if line.startswith("!")}


def container_image(workload: dict) -> str:
    return pod_spec(workload)["containers"][0]["image"].split(":")[0]
