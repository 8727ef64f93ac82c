"""deploy/ stays valid and in step with the code: Kubernetes manifests, compose file, image.

The kustomize overlays are rendered in Python (``render``: the few kustomize features deploy/k8s
uses), and the render is checked against ``kubectl kustomize`` where kubectl is installed. Every
rendered object is validated against the Kubernetes schemas (``kubernetes-validate``); KEDA's
ScaledObject, a CRD those schemas lack, gets an explicit check of its fields. Every environment
variable named in the manifests and in deploy/compose.yaml must be a setting of shared/config.py
(the valid names are derived from its loaders, not listed here) and parse as one; every
containerPort must be a port the code listens on by default or the one the manifest sets; every
probe path must be served by shared/health.py.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

import shared.config
from shared.config import MetricsConfig, RouterConfig, UpConfig, load_section
from shared.errors import ConfigError
from shared.names import Names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "keda", "hpa")
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVICES = ("ingest", "trainer", "inference", "router", "metrics")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
Obj = dict[str, Any]


# -- a small kustomize: resources, components, namespace, configMapGenerator, images, patches --
def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge for what deploy/k8s patches: maps merge, lists of named maps merge by
    name, any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(p, dict) and "name" in p for p in patch):
        merged = [copy.deepcopy(b) for b in base]
        for item in patch:
            index = next(
                (i for i, b in enumerate(merged) if isinstance(b, dict) and b.get("name") == item["name"]), None
            )
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def _containers(obj: Obj) -> Iterator[Obj]:
    """Every container (init containers included) of a workload's pod template."""
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def _patch(directory: Path, objects: list[Obj], patches: list[Obj]) -> None:
    for patch in patches:
        target, body = patch["target"], yaml.safe_load((directory / patch["path"]).read_text())
        hits = [
            i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == (target["kind"], target["name"])
        ]
        assert hits, f"{directory}: patch {patch['path']} matches nothing"
        for i in hits:
            objects[i] = _merge(objects[i], body)


def _set_images(objects: list[Obj], images: list[Obj]) -> None:
    for image in images:
        for container in (c for obj in objects for c in _containers(obj)):
            if container.get("image") == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"


def render(directory: Path) -> list[Obj]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[Obj] = []
    for entry in kust.get("resources", []) + kust.get("components", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else _load(path)
    for gen in kust.get("configMapGenerator", []):
        data = dict(literal.split("=", 1) for literal in gen.get("literals", []))
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    _patch(directory, objects, kust.get("patches", []))
    _set_images(objects, kust.get("images", []))
    for obj in objects:
        if "namespace" in kust and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kust["namespace"]
    return objects


def overlay(name: str) -> list[Obj]:
    return render(K8S / "overlays" / name)


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def compose() -> Obj:
    data: Obj = yaml.safe_load(COMPOSE.read_text())
    return data


# -- what the code says -----------------------------------------------------------------------
def setting_loaders() -> dict[str, type[msgspec.Struct]]:
    """Env prefix → settings class, from the ``load_*_config`` functions of shared/config.py."""
    found: dict[str, type[msgspec.Struct]] = {}
    for name, fn in vars(shared.config).items():
        if not (name.startswith("load_") and name.endswith("_config") and callable(fn)):
            continue
        prefix = re.search(r'env_prefix="([A-Z_]+)"', inspect.getsource(fn))
        cls = typing.get_type_hints(fn)["return"]
        assert prefix, f"{name}: no env_prefix"
        found[prefix.group(1)] = cls
    return found


def setting_names() -> dict[str, tuple[str, type[msgspec.Struct]]]:
    """Every valid AIMESH_* variable → (its field, its settings class)."""
    names = {}
    for prefix, cls in setting_loaders().items():
        for field in cls.__struct_fields__:
            names[f"{prefix}{field.upper()}"] = (field, cls)
    return names


# Read by shared/config.py outside a settings class: the config file and the standard NATS_URL.
EXTRA_ENV = frozenset({"AIMESH_CONFIG", "NATS_URL"})


def check_env(env: dict[str, str | None], where: str) -> None:
    """Each name is a setting; the literal values of each settings class parse together."""
    valid = setting_names()
    unknown = sorted(set(env) - valid.keys() - EXTRA_ENV)
    assert not unknown, f"{where}: {unknown} are not settings of shared/config.py"
    literal = {k: v for k, v in env.items() if v is not None}
    for prefix, cls in setting_loaders().items():
        mine = {k: v for k, v in literal.items() if k in valid and valid[k][1] is cls and k.startswith(prefix)}
        if mine:
            load_section(cls, "x", env_prefix=prefix, env=mine, toml={})  # raises ConfigError


def health_paths() -> set[str]:
    return set(re.findall(r'add_get\("(/[a-z]+)"', (ROOT / "shared" / "health.py").read_text()))


def container_env(container: Obj, objects: list[Obj]) -> dict[str, str | None]:
    """The container's environment: envFrom ConfigMaps, then env (None: from a Secret or field)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(find(objects, "ConfigMap", ref)["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


# -- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_python_render_matches_kubectl_kustomize(name: str) -> None:
    tool = shutil.which("kubectl") or shutil.which("kustomize")
    if tool is None:
        pytest.skip("neither kubectl nor kustomize on PATH: the Python render is checked on its own")
    cmd = [tool, "kustomize" if tool.endswith("kubectl") else "build", str(K8S / "overlays" / name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # kustomize suffixes a generated ConfigMap's name (and its references) with a content hash.
    text = re.sub(r"\b(aimesh-mesh)-[a-z0-9]{10}\b", r"\1", proc.stdout)

    def key(o: Obj) -> str:
        return f"{o['kind']}/{o['metadata']['name']}"

    theirs = {key(o): o for o in yaml.safe_load_all(text) if o}
    ours = {key(o): o for o in overlay(name)}
    assert theirs.keys() == ours.keys()
    for k, obj in ours.items():
        assert json.dumps(obj, sort_keys=True) == json.dumps(theirs[k], sort_keys=True), k


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(name: str) -> None:
    objects = overlay(name)
    crds = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            crds.append(obj)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} in overlay {name}: {exc.message} at {list(exc.path)}")
    assert {o["kind"] for o in crds} <= {"ScaledObject"}, [o["kind"] for o in crds]
    for obj in crds:
        check_scaled_object(obj, objects)
    assert {o["metadata"]["name"] for o in workloads(objects)} == set(SERVICES)


KEDA_JETSTREAM_FIELDS = {
    "natsServerMonitoringEndpoint": True,  # required?
    "account": False,
    "stream": True,
    "consumer": True,
    "lagThreshold": True,
    "activationLagThreshold": False,
    "useHttps": False,
}


def durable_consumer_pattern() -> re.Pattern[str]:
    """The name inference workers give their durable consumer, read from the service's code."""
    source = (ROOT / "services" / "inference" / "service.py").read_text()
    match = re.search(r'durable=f"([a-z]+)-\{deployment\.model\}-\{deployment\.version\}"', source)
    assert match, "services/inference/service.py no longer names its durable consumer <word>-<model>-<version>"
    return re.compile(rf"{match.group(1)}-[A-Za-z0-9_-]+-[A-Za-z0-9_-]+")


def check_scaled_object(obj: Obj, objects: list[Obj]) -> None:
    """KEDA's ScaledObject (keda.sh/v1alpha1): the fields KEDA requires, a target that exists,
    and nats-jetstream triggers naming the mesh's real stream and consumers."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    spec = obj["spec"]
    target = spec["scaleTargetRef"]
    workload = find(objects, target.get("kind", "Deployment"), target["name"])
    assert workload["metadata"]["name"] == "inference"
    assert 0 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    assert spec["triggers"], "a ScaledObject needs at least one trigger"
    prefix = find(objects, "ConfigMap", "aimesh-mesh")["data"]["AIMESH_PREFIX"]
    consumer = durable_consumer_pattern()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert set(meta) <= KEDA_JETSTREAM_FIELDS.keys(), set(meta) - KEDA_JETSTREAM_FIELDS.keys()
        assert {f for f, required in KEDA_JETSTREAM_FIELDS.items() if required} <= set(meta)
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        assert meta["stream"] == Names(prefix).requests_stream
        assert consumer.fullmatch(meta["consumer"]), meta["consumer"]
        host, port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)
        assert port == "8222" and host.startswith("nats-headless."), meta["natsServerMonitoringEndpoint"]
        int(meta["lagThreshold"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_one_autoscaler_owns_the_inference_replicas(name: str) -> None:
    """KEDA or an HPA on Kubernetes, never both, and aimesh's own autoscaler off."""
    objects = overlay(name)
    scalers = [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    assert len(scalers) == (1 if name in ("keda", "hpa") else 0)
    metrics = find(objects, "Deployment", "metrics")
    env = container_env(next(c for c in _containers(metrics) if c["name"] == "metrics"), objects)
    autoscale = load_section(
        shared.config.AutoscaleConfig,
        "autoscale",
        env_prefix="AIMESH_AUTOSCALE_",
        env={k: v for k, v in env.items() if v is not None},
        toml={},
    )
    assert env.get("AIMESH_AUTOSCALE_ENABLED") == "false" and not autoscale.enabled


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_env_var_in_the_manifests_is_a_setting(name: str) -> None:
    objects = overlay(name)
    for obj in workloads(objects):
        for container in _containers(obj):
            check_env(container_env(container, objects), f"{obj['metadata']['name']}/{container['name']}")
    mesh = find(objects, "ConfigMap", "aimesh-mesh")["data"]
    assert mesh["AIMESH_JS_REPLICAS"] == "3"


def test_every_env_var_in_the_compose_file_is_a_setting() -> None:
    services = compose()["services"]
    for name, service in services.items():
        env = service.get("environment", {})
        if name.startswith("nats-"):
            assert set(env) == {"NATS_SERVER_NAME"}
            continue
        check_env({k: None if "${" in str(v) else str(v) for k, v in env.items()}, f"compose {name}")
        assert env["AIMESH_JS_REPLICAS"] == "3"
    assert services["metrics"]["environment"]["AIMESH_AUTOSCALE_ENABLED"] == "false"


def test_the_valid_names_come_from_the_code() -> None:
    """The derivation finds every settings section: a sanity check of the checker itself."""
    names = setting_names()
    for expected in ("AIMESH_NATS_URL", "AIMESH_JS_REPLICAS", "AIMESH_ROUTER_PORT", "AIMESH_AUTOSCALE_ENABLED"):
        assert expected in names
    assert "AIMESH_ROUTER_PROT" not in names
    with pytest.raises(AssertionError, match="not settings"):
        check_env({"AIMESH_ROUTER_PROT": "1"}, "probe")
    with pytest.raises(ConfigError):
        check_env({"AIMESH_ROUTER_PORT": "eighty"}, "probe")


def default_ports(service: str) -> set[int]:
    """The ports a service listens on with no settings: its HTTP port, if it has one."""
    return {"router": {RouterConfig().port}, "metrics": {MetricsConfig().port}}.get(service, set())


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_port_is_one_the_code_listens_on(name: str) -> None:
    objects = overlay(name)
    paths = health_paths()
    for obj in workloads(objects):
        service = obj["metadata"]["name"]
        container = next(c for c in _containers(obj) if c["name"] == service)
        assert container["args"] == [f"services.{service}"]
        assert importlib.util.find_spec(f"services.{service}.__main__"), service
        env = container_env(container, objects)
        set_ports = {int(v) for k, v in env.items() if k.endswith("_PORT") and v is not None}
        allowed = default_ports(service) | set_ports
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports, service
        for port in ports.values():
            assert port in allowed, f"{service}: containerPort {port} is neither a default ({allowed}) nor set"
        # The HTTP port the service is told to use (or its default) is declared.
        for section in ("ROUTER", "METRICS"):
            if service == section.lower():
                assert int(env.get(f"AIMESH_{section}_PORT") or min(default_ports(service))) in ports.values()
        assert ports["health"] == int(env["AIMESH_HEALTH_PORT"] or 0)
        assert env["AIMESH_HEALTH_HOST"] == "0.0.0.0", "the kubelet probes the pod IP"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in paths, f"{service} {probe}: {get['path']} is not served by shared/health.py"
            assert get["port"] in ports or get["port"] in ports.values()
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_probe_paths_are_read_from_the_health_server() -> None:
    assert health_paths() == {"/livez", "/readyz"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_ports_policies_and_disruption_budgets(name: str) -> None:
    objects = overlay(name)
    router = next(c for c in _containers(find(objects, "Deployment", "router")) if c["name"] == "router")
    router_port = next(p["containerPort"] for p in router["ports"] if p["name"] == "http")
    service = find(objects, "Service", "router")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    backend = find(objects, "Ingress", "router")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "router" and backend["port"]["name"] == service["spec"]["ports"][0]["name"]
    assert find(objects, "Service", "metrics")["spec"]["ports"][0]["port"] == MetricsConfig().port
    for obj in workloads(objects):
        pdb = find(objects, "PodDisruptionBudget", obj["metadata"]["name"])
        assert pdb["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "aimesh", "outside the default-deny policy"
        secret = obj["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
        assert secret == f"aimesh-nkey-{obj['metadata']['name']}", "each role mounts only its own seed"
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    deny = policies["aimesh-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    nats = policies["aimesh-nats-and-dns"]["egress"][0]
    assert nats["ports"] == [{"protocol": "TCP", "port": UpConfig().port}], "NATS's client port"
    assert policies["router-ingress"]["ingress"][0]["ports"][0]["port"] == router_port
    assert policies["metrics-scrape"]["ingress"][0]["ports"][0]["port"] == MetricsConfig().port


@pytest.mark.parametrize("name", OVERLAYS)
def test_trainers_ask_for_a_gpu_only_in_the_gpu_overlay(name: str) -> None:
    objects = overlay(name)
    trainer = find(objects, "StatefulSet", "trainer")
    container = next(c for c in _containers(trainer) if c["name"] == "trainer")
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if name == "gpu" else None)
    env = {e["name"]: e for e in container["env"]}
    assert env["AIMESH_TRAINER_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    images = {c["image"] for o in workloads(objects) for c in _containers(o)}
    assert all(":" in image for image in images), images
    assert any(image.endswith("-gpu") for image in images) == (name == "gpu")


def test_the_nats_helm_values_give_three_servers_with_jetstream() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] and config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"]
    assert config["merge"]["$include"].endswith("nats-server.conf")
    assert config["merge"]["max_payload"] == shared.config.DEFAULT_NATS_MAX_PAYLOAD


def test_compose_runs_a_nats_cluster_and_every_service_with_health_checks() -> None:
    data = compose()
    services = data["services"]
    nodes = sorted(n for n in services if n.startswith("nats-"))
    assert nodes == ["nats-1", "nats-2", "nats-3"]
    conf = (DEPLOY / "nats" / "nats-server.conf").read_text()
    assert "jetstream" in conf and "include ./aimesh-auth.conf" in conf
    assert f"max_payload: {shared.config.DEFAULT_NATS_MAX_PAYLOAD}" in conf
    for node in nodes:
        assert f"nats://{node}:6222" in conf
        assert any(v.endswith("/etc/nats/aimesh-auth.conf:ro") for v in services[node]["volumes"])
    paths = health_paths()
    commands = set()
    for name, service in services.items():
        if name.startswith("nats-"):
            continue
        (command,) = service["command"]
        commands.add(command.removeprefix("services."))
        role = command.removeprefix("services.")
        assert importlib.util.find_spec(f"{command}.__main__"), command
        probe = " ".join(service["healthcheck"]["test"])
        used = set(re.findall(r"/[a-z]+(?=['\"])", probe))
        assert used and used <= paths, f"{name}: {probe}"
        env = service["environment"]
        assert f":{env['AIMESH_HEALTH_PORT']}/" in probe
        assert env["AIMESH_NATS_NKEY"] == f"/run/secrets/{role}.nk"
        (secret,) = service["secrets"]
        assert data["secrets"][secret["source"]]["file"] == f"./creds/{role}.nk"
        assert all(f"nats://{n}:4222" in env["AIMESH_NATS_URL"] for n in nodes)
        assert {"nats-1", "nats-2", "nats-3"} <= set(service["depends_on"])
    assert commands == set(SERVICES)
    router = services["router"]
    assert router["ports"] == [f"${{AIMESH_ROUTER_PUBLISH:-{RouterConfig().port}}}:{RouterConfig().port}"]
    assert router["environment"]["AIMESH_ROUTER_PORT"] == str(RouterConfig().port)


def test_the_image_runs_the_services_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages[-1] == "runtime" and "gpu" in stages and "build" in stages
    runtime = text.split("AS runtime", 1)[1]
    assert 'ENTRYPOINT ["python", "-m"]' in runtime and "USER 10001:10001" in runtime
    assert re.search(r"pip install --index-url \"\$\{TORCH_INDEX\}\" \"torch==\$\{TORCH_VERSION\}\"", text)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    torch_pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert torch_pin and f"ARG TORCH_VERSION={torch_pin.group(1)}" in text
    for path in re.findall(r"/(livez|readyz)", text):
        assert f"/{path}" in health_paths()
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0] == "**" or "**" in ignore
    for needed in ("pyproject.toml", "aimesh/", "shared/", "services/", "zoo/"):
        assert f"!{needed}" in ignore


def _base_image_reason(builder: str, image: str) -> str | None:
    """None when the builder has or can pull ``image``, else why not."""
    have = subprocess.run([builder, "inspect", "--type", "image", image], capture_output=True, timeout=60)
    if have.returncode == 0:
        return None
    pull = subprocess.run([builder, "pull", "--quiet", image], capture_output=True, text=True, timeout=600)
    if pull.returncode == 0:
        return None
    return f"{builder} cannot pull the base image {image}: {pull.stderr.strip().splitlines()[-1:]}"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_builds_with_buildah(tmp_path: Path) -> None:
    """Builds deploy/Dockerfile's default (CPU) target (its build stage imports the services and
    torch). Needs buildah, and network access to the base image's registry and to the package
    indexes (PyPI, download.pytorch.org)."""
    builder = shutil.which("buildah")
    if builder is None:
        pytest.skip("no buildah on PATH: `apt-get install buildah` (Debian) to build the image here")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base
    reason = _base_image_reason(builder, base.group(1))
    if reason:
        pytest.skip(reason)
    tag = "localhost/aimesh-test:cpu"
    build = subprocess.run(
        [builder, "bud", "--layers", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    # The build stage already imported the services and torch; check the runtime's settings.
    info = subprocess.run([builder, "inspect", "--type", "image", tag], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    config = json.loads(info.stdout)["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["python", "-m"]
