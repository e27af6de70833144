"""deploy/kubernetes and the Dockerfile: valid, and in agreement with the server they run.

Offline: kubernetes-validate carries the Kubernetes JSON schemas, dockerfile-parse reads
the Dockerfile, and the rest is checked against the server's own config parser and the
`embedgate` command's own argument parser.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from embedgate.client.cli import build_parser
from embedgate.server.cli import CONFIG_ENV
from embedgate.server.config import CacheConfig, ConfigError, ServerConfig
from embedgate.server.edge.access import SERVICE_NAME
from embedgate.server.providers.registry import parse_config

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
# The oldest Kubernetes the manifests are written for (native sidecars, the preStop
# `sleep` action) and the newest whose schemas the pinned kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
MIB = 1024 * 1024
# The server's memory before its cache holds anything: about 90 MiB measured, rounded up.
IDLE_BYTES = 128 * MIB
# server.* keys that `embedgate serve` options override, and the options' names.
SERVER_OPTIONS = {
    "host": "host",
    "port": "port",
    "uds_path": "uds",
    "health_port": "health_port",
    "metrics_port": "metrics_port",
}
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})

Doc = dict[str, Any]


# -- reading the manifests ------------------------------------------------------------


@cache
def documents(path: Path) -> list[Doc]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert docs, f"{path.name}: no documents"
    return docs


def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") == "Pod":
        spec: Doc = doc["spec"]
        return spec
    if doc.get("kind") in WORKLOAD_KINDS:
        template: Doc = doc["spec"]["template"]["spec"]
        return template
    return None


def all_containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def image_name(image: str) -> str:
    """``registry.example.com/embedgate:0.1.0`` (or ``@sha256:...``) → ``embedgate``."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def is_embedgate(container: Doc) -> bool:
    return image_name(container["image"]) == "embedgate"


def embedgate_containers() -> list[tuple[Path, Doc, Doc]]:
    found = []
    for path in MANIFESTS:
        for doc in documents(path):
            pod = pod_spec(doc)
            if pod is not None:
                found += [(path, doc, c) for c in all_containers(pod) if is_embedgate(c)]
    return found


EMBEDGATES = embedgate_containers()
EMBEDGATE_IDS = [f"{path.name}:{c['name']}" for path, _, c in EMBEDGATES]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"want one {kind} {name!r} in the same file, found {len(matches)}"
    return matches[0]


def mounted(pod: Doc, container: Doc, path: str) -> tuple[Doc, str]:
    """The volume that holds ``path`` in ``container``, and the path inside the volume."""
    target = PurePosixPath(path)
    for mount in container.get("volumeMounts", []):
        where = PurePosixPath(mount["mountPath"])
        if target.is_relative_to(where) and target != where:
            volume = next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
            return volume, str(target.relative_to(where))
    raise AssertionError(f"{container['name']}: nothing is mounted where {path} is")


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``256Mi``, ``500m``, ``2``) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G)?", str(value))
    assert match, f"not a quantity: {value!r}"
    number, unit = float(match[1]), match[2]
    if unit == "m":
        return number / 1000
    return number * units.get(unit or "", 1)


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """``argv`` as the image's entry point (``embedgate``) reads it."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pass
    pytest.fail(f"`embedgate {shlex.join(argv)}` is refused: {errors.getvalue().strip()}")


@dataclass(frozen=True)
class Deployed:
    """One embedgate container as a manifest deploys it."""

    manifest: Path
    workload: Doc
    container: Doc
    args: argparse.Namespace
    config_path: str
    configmap: Doc
    config: Doc  # the embedgate YAML in the ConfigMap, loaded
    server: Doc  # server.* as the process ends up with: defaults < the file < options

    @property
    def pod(self) -> Doc:
        pod = pod_spec(self.workload)
        assert pod is not None
        return pod

    @property
    def source(self) -> str:
        return f"{self.manifest.name}: ConfigMap {self.configmap['metadata']['name']}"


def deployed(manifest: Path, workload: Doc, container: Doc) -> Deployed:
    pod = pod_spec(workload)
    assert pod is not None
    assert "command" not in container, "the image's ENTRYPOINT (embedgate) must run"
    args = parse_cli(container.get("args", []))
    assert args.command == "serve"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path = args.config or env.get(CONFIG_ENV)
    assert config_path, f"{container['name']}: no --config and no {CONFIG_ENV}"
    volume, key = mounted(pod, container, config_path)
    assert "configMap" in volume, f"{config_path} is not mounted from a ConfigMap"
    for item in volume["configMap"].get("items", []):
        if item["path"] == key:
            key = item["key"]
    configmap = find(documents(manifest), "ConfigMap", volume["configMap"]["name"])
    assert key in configmap.get("data", {}), f"the ConfigMap has no key {key!r}"
    config = yaml.safe_load(configmap["data"][key])
    assert isinstance(config, dict)
    server = {name: field.default for name, field in ServerConfig.model_fields.items()}
    server.update(config.get("server") or {})
    for key_name, option in SERVER_OPTIONS.items():
        if getattr(args, option, None) is not None:
            server[key_name] = getattr(args, option)
    return Deployed(manifest, workload, container, args, config_path, configmap, config, server)


def the_deployed(index: int) -> Deployed:
    return deployed(*EMBEDGATES[index])


EACH_EMBEDGATE = pytest.mark.parametrize("index", range(len(EMBEDGATES)), ids=EMBEDGATE_IDS)
# Those with other containers in their pod.
SIDECARS = [
    index
    for index, (_, workload, _) in enumerate(EMBEDGATES)
    if len(all_containers(pod_spec(workload) or {"containers": []})) > 1
]


# -- the manifests are valid Kubernetes ---------------------------------------------------


def test_there_are_manifests_for_both_modes() -> None:
    """A sidecar (an embedgate container next to another) and a shared service (one
    behind a Service)."""
    names = {path.name for path in MANIFESTS}
    assert {"sidecar.yaml", "standalone.yaml"} <= names
    assert SIDECARS
    assert any(d["kind"] == "Service" for path in MANIFESTS for d in documents(path))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_document_is_valid_kubernetes(manifest: Path, version: str) -> None:
    """Each document against the API's schema, strictly: a misspelt field is an error,
    not a setting the API server silently drops."""
    for doc in documents(manifest):
        name = f"{manifest.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{name}: invalid for Kubernetes {version}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{name}: {error.message}")


def test_the_validator_rejects_unknown_fields() -> None:
    """The check above would pass anything if the schemas lost their strictness."""
    _, workload, _ = EMBEDGATES[0]
    broken = json.loads(json.dumps(workload))
    pod = pod_spec(broken)
    assert pod is not None
    pod["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# -- what embedgate is given --------------------------------------------------------------


@EACH_EMBEDGATE
def test_the_configmap_is_a_valid_embedgate_config(index: int) -> None:
    """The YAML in the ConfigMap passes the server's own validation."""
    it = the_deployed(index)
    try:
        parse_config(it.config, it.source)
    except ConfigError as error:
        pytest.fail(str(error))


@EACH_EMBEDGATE
def test_the_args_are_an_embedgate_serve_command(index: int) -> None:
    """The image's entry point is kept (no `command`); the args are a `serve` command
    that the real argument parser accepts, with the config file from the ConfigMap and
    JSON logs."""
    _, _, container = EMBEDGATES[index]
    assert "command" not in container
    args = parse_cli(container["args"])
    assert args.command == "serve"
    assert args.log_format == "json"
    assert args.config == deployed(*EMBEDGATES[index]).config_path


@EACH_EMBEDGATE
def test_every_file_the_config_names_is_mounted(index: int) -> None:
    """Each *_file in the config (vendor keys, tokens, certificates) is in a read-only
    mount; a file from a Secret is one of its listed items, and the header's `kubectl
    create secret` command creates that key."""
    it = the_deployed(index)
    text = it.manifest.read_text(encoding="utf-8")

    def files(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [v for k, v in node.items() if k.endswith("_file") and isinstance(v, str)]
            return found + [f for v in node.values() for f in files(v)]
        if isinstance(node, list):
            return [f for v in node for f in files(v)]
        return []

    named = files(it.config)
    assert named, "the example config reads no files: nothing to check"
    for path in named:
        volume, inside = mounted(it.pod, it.container, path)
        mount = next(m for m in it.container["volumeMounts"] if m["name"] == volume["name"])
        assert mount.get("readOnly") is True, f"{mount['mountPath']} should be read-only"
        if "secret" in volume:
            secret = volume["secret"]
            items = {item["path"]: item["key"] for item in secret.get("items", [])}
            assert inside in items, f"{path}: no item of Secret {secret['secretName']}"
            assert f"kubectl create secret generic {secret['secretName']}" in text
            assert re.search(rf"--from-(file|literal)={re.escape(items[inside])}=", text), (
                f"{it.manifest.name}: the header never creates key {items[inside]!r}"
            )
            # Secret files belong to root: the group (fsGroup) must be able to read them,
            # and nobody else should.
            mode = secret.get("defaultMode", 0o644)
            assert mode & 0o040, f"{secret['secretName']}: not readable by the group"
            assert not mode & 0o007, f"{secret['secretName']}: readable by anyone"
            assert it.pod["securityContext"]["fsGroup"] == it.pod["securityContext"]["runAsGroup"]


@EACH_EMBEDGATE
def test_probes_reach_the_health_service(index: int) -> None:
    """Native gRPC probes on the port that serves grpc.health.v1 to the pod's IP:
    startup and liveness ask for the whole server, readiness for the embedding service.
    A loopback gRPC listener (a sidecar's) cannot be probed, so the health-only
    listener then binds elsewhere."""
    it = the_deployed(index)
    server = it.server
    if server["health_port"] is not None:
        probe_port, probe_host = server["health_port"], server.get("health_host") or server["host"]
    else:
        probe_port, probe_host = server["port"], server["host"]
    assert probe_host not in LOOPBACK, "the kubelet probes the pod's IP, not loopback"
    probes: dict[str, Doc] = {}
    for kind in ("startup", "liveness", "readiness"):
        probe = it.container.get(f"{kind}Probe")
        assert probe is not None, f"no {kind} probe"
        probes[kind] = probe
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}
        assert probe["grpc"]["port"] == probe_port, f"{kind} probe"
    assert probes["startup"]["grpc"].get("service", "") == ""
    assert probes["liveness"]["grpc"].get("service", "") == ""
    assert probes["readiness"]["grpc"]["service"] == SERVICE_NAME
    # Models load before SERVING: the startup probe gives them a minute.
    startup = probes["startup"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 60


@EACH_EMBEDGATE
def test_declared_ports_and_scrape_annotations_match_the_listeners(index: int) -> None:
    """Named container ports are the ports the process listens on; Prometheus is told
    the metrics port, which binds beyond loopback."""
    it = the_deployed(index)
    server = it.server
    ports = {p["name"]: p["containerPort"] for p in it.container.get("ports", [])}
    expected = {"health": server["health_port"], "metrics": server["metrics_port"]}
    if server["host"] not in LOOPBACK:
        expected["grpc"] = server["port"]
    assert ports == {name: port for name, port in expected.items() if port is not None}
    assert server["metrics_port"] is not None
    assert (server.get("metrics_host") or server["host"]) not in LOOPBACK
    annotations = it.workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(server["metrics_port"])
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("index", SIDECARS, ids=[EMBEDGATE_IDS[i] for i in SIDECARS])
def test_a_sidecar_starts_before_and_stops_after_its_app(index: int) -> None:
    """Next to an app: a native sidecar whose startup probe holds the app back until
    SERVING; the app dials the Unix socket through the same emptyDir (or loopback)."""
    it = the_deployed(index)
    others = [c for c in all_containers(it.pod) if c is not it.container]
    assert it.container in it.pod.get("initContainers", []), "not a native sidecar"
    assert it.container["restartPolicy"] == "Always"
    uds = it.server["uds_path"]
    assert uds is not None
    socket_volume, _ = mounted(it.pod, it.container, uds)
    assert "emptyDir" in socket_volume
    for app in others:
        target = {e["name"]: e.get("value") for e in app.get("env", [])}["EMBEDGATE_TARGET"]
        assert target in (f"unix://{uds}", f"127.0.0.1:{it.server['port']}")
        if target.startswith("unix:"):
            assert mounted(it.pod, app, uds)[0] is socket_volume


@EACH_EMBEDGATE
def test_shutdown_fits_in_the_grace_period(index: int) -> None:
    """SIGKILL comes terminationGracePeriodSeconds after deletion: it must cover the
    longest preStop sleep and the server's shutdown_grace_s, with room to close."""
    it = the_deployed(index)
    sleeps = [
        c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        for c in all_containers(it.pod)
    ]
    assert max(sleeps) > 0, "no preStop sleep: Services would still route to a stopping pod"
    grace = it.pod["terminationGracePeriodSeconds"]
    assert grace >= max(sleeps) + float(it.server["shutdown_grace_s"]) + 5


@EACH_EMBEDGATE
def test_resources_are_bounded(index: int) -> None:
    """Requests and limits for CPU and memory; memory never overcommitted and enough for
    the process plus a full in-memory cache."""
    it = the_deployed(index)
    resources = it.container["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind
    assert quantity(resources["limits"]["memory"]) == quantity(resources["requests"]["memory"])
    assert quantity(resources["limits"]["cpu"]) >= quantity(resources["requests"]["cpu"])
    cache_settings = {name: field.default for name, field in CacheConfig.model_fields.items()}
    cache_settings.update(it.config.get("cache") or {})
    cache_bytes = cache_settings["max_bytes"] if cache_settings["enabled"] else 0
    assert quantity(resources["limits"]["memory"]) >= IDLE_BYTES + cache_bytes


# -- security -----------------------------------------------------------------------------


@cache
def image_user() -> int:
    """The final stage's USER, which must be the uid the stage creates."""
    last = stages()[-1]
    users = [i["value"] for i in last if i["instruction"] == "USER"]
    assert users, "the image must not run as root"
    uid = int(users[-1])
    created = [i["value"] for i in last if i["instruction"] == "RUN" and "useradd" in i["value"]]
    assert any(f"--uid {uid}" in command for command in created)
    return uid


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_pods_meet_the_restricted_pod_security_standard(manifest: Path) -> None:
    """Every container (the example app included): non-root as the image's user, no
    privilege escalation, no capabilities, RuntimeDefault seccomp, read-only root."""
    for doc in documents(manifest):
        pod = pod_spec(doc)
        if pod is None:
            continue
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key)
        for container in all_containers(pod):
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            name = f"{manifest.name}: {container['name']}"
            assert context.get("runAsNonRoot") is True, name
            assert context.get("runAsUser") == image_user(), name
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("readOnlyRootFilesystem") is True, name
            assert not context.get("privileged"), name
            assert context.get("capabilities") == {"drop": ["ALL"]}, name
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, name
            assert not [p for p in container.get("ports", []) if "hostPort" in p], name


# -- the shared service -------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_services_and_budgets_select_the_gateway(manifest: Path) -> None:
    """Each Service and PodDisruptionBudget selects exactly the gateway's pods; the
    Service's ports are named, go to named container ports, and say which protocol."""
    docs = documents(manifest)
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [(d, pod_spec(d)) for d in docs if d["kind"] in WORKLOAD_KINDS and pod_spec(d)]
        targets = [
            (d, pod)
            for d, pod in pods
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']}: selects no workload"
        pod = targets[0][1]
        assert pod is not None
        ports = {p["name"]: p for c in all_containers(pod) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port
            assert ports[port["targetPort"]]["containerPort"] > 0
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        assert by_name["grpc"]["port"] == 50051
        assert by_name["grpc"]["appProtocol"] == "grpc"
        assert by_name["grpc"]["targetPort"] == "grpc"
        if "metrics" in by_name:
            assert by_name["metrics"]["port"] == ports["metrics"]["containerPort"] == 9464
    for budget in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        labels = [
            d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOAD_KINDS
        ]
        selector = budget["spec"]["selector"]["matchLabels"]
        assert sum(selector.items() <= ls.items() for ls in labels) == 1


# -- the Dockerfile -----------------------------------------------------------------------

DOCKER_INSTRUCTIONS = frozenset(
    [
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    ]
)


@cache
def instructions() -> list[Doc]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"), env_replace=False)
    parsed: list[Doc] = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    return parsed


def stages() -> list[list[Doc]]:
    out: list[list[Doc]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def final(name: str) -> Doc:
    found = [i for i in stages()[-1] if i["instruction"] == name]
    assert found, f"the final stage has no {name}"
    return found[-1]


def exec_form(value: str) -> list[str]:
    """A JSON-array instruction argument (exec form: no shell in between)."""
    parsed = json.loads(value)
    assert isinstance(parsed, list)
    assert all(isinstance(part, str) for part in parsed)
    return parsed


def healthcheck() -> tuple[dict[str, str], list[str]]:
    match = re.fullmatch(
        r"(?P<options>.*?)\s*\bCMD\s+(?P<command>\[.*\])", final("HEALTHCHECK")["value"]
    )
    assert match, "HEALTHCHECK ... CMD [exec form]"
    options = dict(
        option.removeprefix("--").split("=", 1) for option in shlex.split(match["options"])
    )
    return options, exec_form(match["command"])


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


def test_the_dockerfile_parses() -> None:
    """Known instructions only; exec-form ENTRYPOINT, CMD and health check; every COPY
    source exists and is not .dockerignored; COPY --from names an earlier stage; the
    base image comes from a declared ARG."""
    assert instructions()[0]["instruction"] in {"ARG", "FROM"}
    unknown = {i["instruction"] for i in instructions()} - DOCKER_INSTRUCTIONS
    assert not unknown
    exec_form(final("ENTRYPOINT")["value"])
    exec_form(final("CMD")["value"])
    healthcheck()
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in ignored if p.startswith("!")], "exceptions: extend this check"
    args = {i["value"].split("=")[0] for i in instructions() if i["instruction"] == "ARG"}
    stage_names: set[str] = set()
    for stage in stages():
        head = stage[0]["value"].split()
        base = head[0]
        if base.startswith("${"):
            assert base.removeprefix("${").removesuffix("}") in args
        for instruction in stage:
            if instruction["instruction"] != "COPY":
                continue
            words = shlex.split(instruction["value"])
            flags = [w for w in words if w.startswith("--")]
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources, instruction["value"]
            origin = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if origin:
                assert origin[0] in stage_names, f"COPY --from={origin[0]}: no such stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
                parts = PurePosixPath(source).parts
                prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
                hit = [p for p in ignored if any(fnmatch.fnmatch(x, p) for x in prefixes)]
                assert not hit, f"COPY {source}: excluded by .dockerignore {hit}"
        if len(head) == 3 and head[1].upper() == "AS":
            stage_names.add(head[2])


DEPLOYMENT = ROOT / "docs/deployment.md"


def docker_section() -> str:
    guide = DEPLOYMENT.read_text(encoding="utf-8")
    match = re.search(r"^## Docker\n(.*?)(?=^## )", guide, re.S | re.M)
    assert match, "docs/deployment.md has no '## Docker' section"
    return match[1]


def test_the_dockerfile_does_what_the_readme_says() -> None:
    """docs/deployment.md's Docker section and the Dockerfile agree: the `embedgate` entry point
    (the console script of the distribution the image installs), `serve` on the address
    and port the guide gives and `docker run -p` publishes, the build argument for the
    local model, a non-root user, and a health check that is a real `embedgate health`
    command asking the gRPC health service on that port within Docker's timeout."""
    section = docker_section()
    entry = exec_form(final("ENTRYPOINT")["value"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert entry == ["embedgate"]
    assert entry[0] in scripts["project"]["scripts"]

    serve = parse_cli(exec_form(final("CMD")["value"]))
    assert serve.command == "serve"
    address = re.search(r"serves on `([^`]+):(\d+)`", section)
    assert address, "the guide says where the image serves"
    assert (serve.host, serve.port) == (address[1], int(address[2]))
    published = re.findall(r"docker run .*?-p (\d+):(\d+)", section)
    assert published
    assert {int(inside) for _, inside in published} == {serve.port}
    assert final("EXPOSE")["value"].split() == [str(serve.port)]

    assert image_user() != 0
    assert "non-root user" in section
    build_args = dict(re.findall(r"--build-arg (\w+)=(\S+)", section))
    declared = dict(i["value"].split("=", 1) for i in instructions() if i["instruction"] == "ARG")
    runs = " ".join(i["value"] for i in instructions() if i["instruction"] == "RUN")
    for name, value in build_args.items():
        assert name in declared, f"the guide passes --build-arg {name}; the Dockerfile has no ARG"
        assert declared[name] != value, f"the guide's --build-arg {name}={value} is the default"
        assert re.search(rf"\$\{{?{name}\b", runs), f"no RUN uses {name}"
    assert CONFIG_ENV in section

    assert "`embedgate health`" in section
    options, command = healthcheck()
    assert command[0] == entry[0]
    check = parse_cli(command[1:])
    assert check.command == "health"
    host, _, port = check.target.rpartition(":")
    assert host in LOOPBACK
    assert int(port) == serve.port
    assert check.service in ("", SERVICE_NAME)
    assert check.timeout < seconds(options["timeout"]), "Docker would kill the check first"


# -- the deployment guide -------------------------------------------------------------


def test_the_guide_points_to_the_manifests() -> None:
    """docs/deployment.md: '## Kubernetes' follows '## Docker'; every path it names
    exists; the deploy README explains every manifest."""
    guide = DEPLOYMENT.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", guide, re.M)
    assert headings[headings.index("Docker") + 1] == "Kubernetes"
    section = re.search(r"^## Kubernetes\n(.*)", guide, re.S | re.M)
    assert section
    paths = re.findall(r"deploy/kubernetes/[\w./-]*", section[1])
    assert paths
    for path in paths:
        assert (ROOT / path.rstrip(".")).exists(), path
    guide = (KUBERNETES / "README.md").read_text(encoding="utf-8")
    for manifest in MANIFESTS:
        assert manifest.name in guide
