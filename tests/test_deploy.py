"""The deployment files: Kubernetes manifests in etc/k8s, images and Compose in etc/docker.

Offline and without torch: the manifests against the Kubernetes schemas (kubernetes-validate), the
Dockerfiles through hadolint, and every cross-reference that a typo would break only at deploy time:
the flags and variables the daemons accept, labels, ports, Secret and ConfigMap keys, grace periods,
the registry's address and password, the models that must be downloaded.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from t2i_common.config import load_options
from t2i_gateway import config as gateway_config
from t2i_orchestrator import config as orchestrator_config
from t2i_orchestrator.models import SAFETY_CHECKER_ID, SDXL_BASE_ID, SDXL_LIGHTNING_REPO, ModelSpec, load_models_file, profile_for

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "etc" / "k8s"
DOCKER = ROOT / "etc" / "docker"
NAMESPACE = "t2i"
# The Kubernetes version the manifests must be valid for: the oldest one they are meant to run on
# (kubernetes-validate 1.37 ships the schemas of 1.25 to 1.37).
KUBERNETES_VERSION = "1.31"
# The Prometheus Operator's kinds are custom resources: no schema ships for them, and kubernetes-validate
# raises SchemaNotFoundError (its command line only warns). test_pod_monitor_scrapes_both_daemons checks
# their structure by hand instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

DAEMONS = {
    "t2i-gateway": (gateway_config.OPTIONS, "T2I_GATEWAY"),
    "t2i-orchestrator": (orchestrator_config.OPTIONS, "T2I_ORCHESTRATOR"),
}
DOCKERFILES = {"t2i-gateway": DOCKER / "gateway.Dockerfile", "t2i-orchestrator": DOCKER / "orchestrator.Dockerfile"}
VAR_REFERENCE = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR); $$(VAR) is escaped


# --- reading the files -------------------------------------------------------------------------------


@functools.cache
def manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every object in etc/k8s but the kustomization."""
    found = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")]):
        if path.name != "kustomization.yaml":
            found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(found)


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name} in etc/k8s, found {len(matches)}"
    return matches[0]


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """('Kind/name', pod template) of every workload."""
    for _, doc in manifests():
        if doc["kind"] in WORKLOAD_KINDS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def image_name(image: str) -> str:
    """registry.example.net/t2i-gateway:0.1.0 -> t2i-gateway"""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def daemon_of(image: str, entrypoint: list[str] | None) -> str | None:
    """The daemon a container runs: its overridden entrypoint's, or else its image's (whose ENTRYPOINT it is)."""
    if entrypoint:
        name = Path(entrypoint[0]).name
        return name if name in DAEMONS else None
    name = image_name(image)
    return name if name in DAEMONS else None


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, with stand-ins for the values Kubernetes fills in."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            source = item["valueFrom"]
            field = source.get("fieldRef", {}).get("fieldPath")
            env[item["name"]] = {"status.podIP": "10.1.2.3", "metadata.name": "t2i-orchestrator-abc12"}.get(field, "stand-in")
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """What Kubernetes makes of $(VAR) in args, command and env values."""
    return VAR_REFERENCE.sub(lambda match: env.get(match[1], match[0]), text).replace("$$", "$")


def k8s_daemon_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(where, pod template, container, daemon) for every container that runs t2i-gateway or t2i-orchestrator."""
    for where, template in pod_templates():
        for container in containers(template):
            daemon = daemon_of(container["image"], container.get("command"))
            if daemon:
                yield f"{where} container {container['name']}", template, container, daemon


def k8s_args(container: dict[str, Any]) -> list[str]:
    env = k8s_env(container)
    return [expand(arg, env) for arg in [*container.get("command", [])[1:], *container.get("args", [])]]


@functools.cache
def dockerfile(path: Path) -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, rest) of a Dockerfile, continuation lines joined and comments left out."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return tuple(instructions)


def image_env(daemon: str) -> dict[str, str]:
    """The ENV of the daemon's image, which every container of it starts with."""
    env = {}
    for keyword, rest in dockerfile(DOCKERFILES[daemon]):
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, equals, value = token.partition("=")
                assert equals, f"{DOCKERFILES[daemon].name}: use ENV KEY=value, not {rest!r}"
                env[key] = value
    return env


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, with ${VAR...} interpolations replaced by a stand-in."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: re.sub(r"\$\{[^}]*\}", "stand-in", str(value)) for key, value in raw.items()}


def as_list(command: str | list[str] | None) -> list[str] | None:
    return shlex.split(command) if isinstance(command, str) else command


def compose_daemon(service: dict[str, Any]) -> str | None:
    entrypoint = as_list(service.get("entrypoint"))
    if entrypoint:
        return daemon_of("", entrypoint)
    if "build" in service:
        dockerfile_path = Path(service["build"]["dockerfile"])
        return next((daemon for daemon, path in DOCKERFILES.items() if path.name == dockerfile_path.name), None)
    return daemon_of(service["image"], None)


def compose_daemons() -> Iterator[tuple[str, dict[str, Any], str]]:
    for name, service in compose()["services"].items():
        daemon = compose_daemon(service)
        if daemon:
            yield name, service, daemon


def flags(args: list[str]) -> list[str]:
    return [arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")]


def settings(daemon: str, args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The daemon's settings from these args and this environment (its image's ENV under it), as it resolves them."""
    options, prefix = DAEMONS[daemon]
    for key in list(os.environ):
        if key.startswith(prefix + "_"):
            monkeypatch.delenv(key)
    for key, value in {**image_env(daemon), **env}.items():
        if key.startswith(prefix + "_"):
            monkeypatch.setenv(key, value)
    return load_options(daemon, "", options, args, prefix)


def known_flags(daemon: str) -> set[str]:
    options, _ = DAEMONS[daemon]
    return {"config"} | {option.name for option in options} | {f"no-{option.name}" for option in options if option.flag}


def known_env(daemon: str) -> set[str]:
    options, prefix = DAEMONS[daemon]
    return {f"{prefix}_CONFIG"} | {f"{prefix}_{option.dest.upper()}" for option in options}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions) matches these labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]:
            return False
    return True


def port_exists(port: int | str, container: dict[str, Any]) -> bool:
    ports = container.get("ports", [])
    return any(p.get("name") == port for p in ports) if isinstance(port, str) else any(p["containerPort"] == port for p in ports)


def pods_of(selector: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(where, template) for where, template in pod_templates() if selects(selector, template["metadata"].get("labels", {}))]


def hf_downloads(script: str) -> list[str]:
    """The repositories that the `hf download` lines of a shell script fetch; fails on a misused --include."""
    repos = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] != ["hf", "download"]:
            continue
        positional, words = [], words[2:]
        while words:
            word = words.pop(0)
            if word in ("--include", "--exclude", "--revision", "--repo-type", "--type", "--token", "--max-workers"):
                words.pop(0)
            elif not word.startswith("--"):
                positional.append(word)
        # `hf` takes one pattern per --include; further words are file names, and with file names it
        # ignores --include altogether (and downloads no weights).
        assert not any("*" in word for word in positional[1:]), f"{line!r}: give each pattern its own --include"
        repos.append(positional[0])
    return repos


def repos_needed(spec: ModelSpec) -> set[str]:
    """What a models-file entry needs in the Hugging Face cache."""
    if spec.path:
        return set()
    if profile_for(spec).loader == "sdxl-lightning":
        return {SDXL_BASE_ID, SDXL_LIGHTNING_REPO}
    return {spec.model_id}


def duration_s(text: str) -> float:
    """A Compose duration: 150s, 2m30s, 1h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def pre_stop_s(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def venv_tool(name: str) -> str:
    """A checking tool installed in the virtualenv (next to this Python) or on PATH; as tests/helpers.py's tool()."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: install the test extra")
        pytest.skip(f"{name} is not installed here (the test extra installs it)")
    return path


# --- Kubernetes ----------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file listed twice"
    missing = [name for name in listed if not (K8S / name).is_file()]
    assert not missing, f"listed in kustomization.yaml but not there: {missing}"
    on_disk = {path.name for path in K8S.iterdir() if path.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), f"not listed in kustomization.yaml: {sorted(on_disk - set(listed))}"
    assert kustomization["namespace"] == NAMESPACE
    used = {image_name(c["image"]) for _, t in pod_templates() for c in containers(t)}
    assert {image_name(image["name"]) for image in kustomization.get("images", [])} <= used


def test_manifests_match_the_kubernetes_schemas() -> None:
    validated, custom = [], []
    for file, doc in manifests():
        where = f"{file}: {doc['kind']}/{doc['metadata']['name']}"
        error = None
        try:
            # strict: unknown fields (a typo, a field of another version) are errors too.
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS, f"{where}: no schema for {doc['apiVersion']} {doc['kind']}"
            custom.append(where)
        except kubernetes_validate.ValidationError as exc:
            error = f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}"
        else:
            validated.append(where)
        assert error is None, error
    assert len(validated) >= 10 and custom, (validated, custom)


def test_everything_is_in_the_namespace() -> None:
    assert named("Namespace", NAMESPACE)
    outside = [
        f"{file}: {doc['kind']}/{doc['metadata']['name']}"
        for file, doc in manifests()
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != NAMESPACE
    ]
    assert not outside, f"not in namespace {NAMESPACE}: {outside}"


def test_workloads_select_their_own_pods() -> None:
    for _, doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            assert selects(doc["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"]), doc["metadata"]["name"]
    assert named("Deployment", "t2i-gateway")["spec"]["replicas"] == 2
    assert named("Deployment", "redis")["spec"]["replicas"] == 1


def test_pods_run_as_non_root_without_privileges() -> None:
    # The namespace enforces the "restricted" Pod Security Standard: a pod that breaks it is refused at apply time.
    assert named("Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    image_users = {daemon: next(rest for keyword, rest in dockerfile(path) if keyword == "USER") for daemon, path in DOCKERFILES.items()}
    for where, template in pod_templates():
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 1) != 0, where
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert template["spec"].get("automountServiceAccountToken") is False, where
        for container in containers(template):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where} {container['name']}"
            assert "ALL" in context.get("capabilities", {}).get("drop", []), f"{where} {container['name']}"
            assert context.get("readOnlyRootFilesystem") is True, f"{where} {container['name']}"
            assert "limits" in container.get("resources", {}) and "requests" in container["resources"], f"{where} {container['name']}"
            image = image_name(container["image"])
            if image in image_users:  # the uid the image was built for, which owns its folders
                assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == image_users[image], f"{where} {container['name']}"


def test_daemon_containers_use_only_flags_and_variables_the_daemons_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = set()
    for where, _, container, daemon in k8s_daemon_containers():
        seen.add(daemon)
        unknown = set(flags(k8s_args(container))) - known_flags(daemon)
        assert not unknown, f"{where}: {daemon} has no flag(s) {sorted(unknown)}"
        assert "envFrom" not in container, f"{where}: name each variable, so that this test can check it"
        names = {item["name"] for item in container.get("env", [])}
        unknown = {name for name in names if name.startswith("T2I_")} - known_env(daemon)
        assert not unknown, f"{where}: {daemon} reads no variable(s) {sorted(unknown)} (its own start with {DAEMONS[daemon][1]}_)"
        settings(daemon, k8s_args(container), k8s_env(container), monkeypatch)  # every value converts as the daemon does
    assert seen == set(DAEMONS)


def test_variable_references_are_defined() -> None:
    # $(VAR) that names no variable of the container stays as it is: the daemon would get the literal text.
    for where, template in pod_templates():
        for container in containers(template):
            defined: list[str] = []
            for item in container.get("env", []):
                for name in VAR_REFERENCE.findall(item.get("value", "")):
                    assert name in defined, f"{where} {container['name']}: env {item['name']} uses $({name}) before it is defined"
                defined.append(item["name"])
            for arg in [*container.get("command", []), *container.get("args", [])]:
                for name in VAR_REFERENCE.findall(arg):
                    assert name in defined, f"{where} {container['name']}: {arg!r} uses $({name}), which its env does not define"


def test_node_advertises_its_pod_ip_and_the_port_it_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for where, _, container, daemon in k8s_daemon_containers():
        values = settings(daemon, k8s_args(container), k8s_env(container), monkeypatch)
        assert values["host"] == "0.0.0.0", f"{where}: listens on {values['host']} only"
        assert any(p["containerPort"] == values["port"] and p.get("name") == "http" for p in container["ports"]), where
        if daemon != "t2i-orchestrator":
            continue
        assert values["register"] and values["advertise_url"], where
        raw = next(arg for arg in container["args"] if arg.startswith("--advertise-url"))
        assert raw == f"--advertise-url=http://$(POD_IP):{values['port']}", raw
        pod_ip = next(item for item in container["env"] if item["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_services_select_pods_that_have_their_ports() -> None:
    for service in objects("Service"):
        name = service["metadata"]["name"]
        pods = pods_of({"matchLabels": service["spec"]["selector"]})
        assert pods, f"Service {name} selects no pod"
        for where, template in pods:
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(port_exists(target, c) for c in template["spec"]["containers"]), f"Service {name}: {where} has no port {target}"


def test_probes_use_container_ports() -> None:
    probed = 0
    for where, template in pod_templates():
        for container in containers(template):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe:
                    action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                    assert action and port_exists(action["port"], container), f"{where} {container['name']} {kind}: port {action}"
                    probed += 1
    assert probed >= 7


def test_daemon_probes() -> None:
    for where, _, container, daemon in k8s_daemon_containers():
        # Readiness on /health; liveness elsewhere: /health is 503 whenever no node is ready (gateway) or
        # while draining, which must not restart the process.
        assert container["readinessProbe"]["httpGet"]["path"] == "/health", where
        assert container["livenessProbe"].get("httpGet", {}).get("path") != "/health", where
        if daemon == "t2i-orchestrator":
            startup = container["startupProbe"]
            assert startup["httpGet"]["path"] == "/health", where
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, f"{where}: allow 10 minutes to load models"


def test_secret_configmap_and_claim_references_exist() -> None:
    secrets = {s["metadata"]["name"]: {*s.get("stringData", {}), *s.get("data", {})} for s in objects("Secret")}
    config_maps = {c["metadata"]["name"]: set(c.get("data", {})) for c in objects("ConfigMap")}
    claims = {c["metadata"]["name"] for c in objects("PersistentVolumeClaim")}
    kinds = {"secretKeyRef": secrets, "configMapKeyRef": config_maps}
    for where, template in pod_templates():
        for container in containers(template):
            for item in container.get("env", []):
                for ref_kind, known in kinds.items():
                    ref = item.get("valueFrom", {}).get(ref_kind)
                    if ref and not ref.get("optional"):
                        assert ref["key"] in known.get(ref["name"], ()), f"{where}: {item['name']} needs key {ref['key']} of {ref['name']}"
            for source in container.get("envFrom", []):
                for ref_kind, known in (("secretRef", secrets), ("configMapRef", config_maps)):
                    if ref_kind in source and not source[ref_kind].get("optional"):
                        assert source[ref_kind]["name"] in known, where
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            volumes = {volume["name"] for volume in template["spec"].get("volumes", [])}
            assert mounts <= volumes, f"{where} {container['name']}: mounts missing volumes {mounts - volumes}"
        for volume in template["spec"].get("volumes", []):
            for field, known, key in (("secret", secrets, "secretName"), ("configMap", config_maps, "name")):
                if field in volume and not volume[field].get("optional"):
                    name = volume[field][key]
                    assert name in known, f"{where}: volume {volume['name']} needs {field} {name}"
                    for item in volume[field].get("items", []):
                        assert item["key"] in known[name], f"{where}: volume {volume['name']} needs key {item['key']} of {name}"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: no claim {volume['persistentVolumeClaim']}"


def test_example_secret_is_clearly_a_placeholder() -> None:
    for secret in objects("Secret"):
        for key, value in secret.get("stringData", {}).items():
            assert "CHANGE-ME" in value, f"Secret {secret['metadata']['name']}: {key} must be an obvious placeholder"


def test_termination_grace_covers_the_shutdown_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    for where, template, container, daemon in k8s_daemon_containers():
        grace = settings(daemon, k8s_args(container), k8s_env(container), monkeypatch)["shutdown_grace"]
        needed = grace + pre_stop_s(container)
        period = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert period >= needed + 10, f"{where}: terminationGracePeriodSeconds {period} < preStop + --shutdown-grace {needed} + a margin"


def test_daemons_share_the_registry_the_node_secret_and_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = next(c for _, t in pod_templates() for c in containers(t) if image_name(c["image"]) == "redis")
    redis_password = next(item["valueFrom"]["secretKeyRef"] for item in redis["env"] if f"$({item['name']})" in redis["args"])
    secret_refs: dict[str, dict[str, Any]] = {}
    for where, _, container, daemon in k8s_daemon_containers():
        values = settings(daemon, k8s_args(container), k8s_env(container), monkeypatch)
        url = values["registry" if daemon == "t2i-gateway" else "register"]
        match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?/\d+", url or "")
        assert match, f"{where}: registry {url!r} is not a redis:// URL"
        service = named("Service", match[1])
        assert int(match[2] or 6379) in [p["port"] for p in service["spec"]["ports"]], f"{where}: {url}"
        backends = pods_of({"matchLabels": service["spec"]["selector"]})
        assert any(image_name(c["image"]) == "redis" for _, t in backends for c in containers(t)), f"{where}: {url}"
        refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"] if "secretKeyRef" in item.get("valueFrom", {})}
        prefix = DAEMONS[daemon][1]
        assert refs[f"{prefix}_REGISTRY_PASSWORD"] == redis_password, f"{where}: not Redis's requirepass"
        secret_refs[daemon] = refs[f"{prefix}_ORCHESTRATOR_SECRET" if daemon == "t2i-gateway" else f"{prefix}_SECRET"]
    assert secret_refs["t2i-gateway"] == secret_refs["t2i-orchestrator"], "the gateway's --orchestrator-secret must be the node's --secret"


def test_redis_admits_only_the_daemons() -> None:
    for policy in objects("NetworkPolicy"):
        targets = pods_of(policy["spec"]["podSelector"])
        assert targets, f"NetworkPolicy {policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            admitted = {where for peer in rule["from"] if "podSelector" in peer for where, _ in pods_of(peer["podSelector"])}
            assert admitted >= {"Deployment/t2i-gateway", "Deployment/t2i-orchestrator"}, admitted
            for port in rule.get("ports", []):
                assert all(any(port_exists(port["port"], c) for c in t["spec"]["containers"]) for _, t in targets), port


def test_models_configmap_loads_and_the_job_downloads_every_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ((where, template, container, daemon),) = [entry for entry in k8s_daemon_containers() if entry[3] == "t2i-orchestrator"]
    values = settings(daemon, k8s_args(container), k8s_env(container), monkeypatch)
    models_path = Path(str(values["models"]))
    mount = next(m for m in container["volumeMounts"] if models_path.parent == Path(m["mountPath"]))
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["configMap"]["items"] if i["path"] == models_path.name)
    (tmp_path / "models.json").write_text(named("ConfigMap", volume["configMap"]["name"])["data"][item["key"]])
    specs = load_models_file(tmp_path / "models.json")
    assert any(spec.warm for spec in specs), f"{where}: no warm model"
    needed = set().union(*(repos_needed(spec) for spec in specs))
    if values["safety_checker"].lower() != "none":
        needed.add(values["safety_checker"])
    assert values["safety_checker"] == SAFETY_CHECKER_ID
    job = named("Job", "t2i-model-download")["spec"]["template"]
    downloaded = {repo for c in containers(job) for repo in hf_downloads("\n".join(c.get("command", []) + c.get("args", [])))}
    assert needed <= downloaded, f"the Job does not download {sorted(needed - downloaded)}"
    (job_container,) = containers(job)
    hf_home = {item["name"]: item.get("value") for item in job_container["env"]}["HF_HOME"]
    assert hf_home == k8s_env(container)["HF_HOME"], "the Job and the node must agree on HF_HOME"
    for pod in (job, template):
        cache = next(v["name"] for v in pod["spec"]["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "t2i-hf-cache")
        assert any(m["name"] == cache and m["mountPath"] == hf_home for c in containers(pod) for m in c["volumeMounts"])


def test_gpu_node_requests_one_gpu() -> None:
    (container,) = [c for _, _, c, daemon in k8s_daemon_containers() if daemon == "t2i-orchestrator"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"].get("nvidia.com/gpu", 1) == 1


def test_pod_monitor_scrapes_both_daemons() -> None:
    # A custom resource (no schema above): its required structure, and that it finds what it should.
    monitors = objects("PodMonitor")
    assert monitors
    scraped = set()
    for monitor in monitors:
        spec = monitor["spec"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert NAMESPACE in spec.get("namespaceSelector", {}).get("matchNames", [NAMESPACE])
        assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "podMetricsEndpoints", "podTargetLabels", "sampleLimit"}
        pods = pods_of(spec["selector"])
        assert pods and spec["podMetricsEndpoints"]
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            assert isinstance(endpoint["port"], str), "podMetricsEndpoints name ports"
            for where, template in pods:
                assert any(port_exists(endpoint["port"], c) for c in template["spec"]["containers"]), f"{where}: no port {endpoint['port']}"
        for where, template in pods:
            if "jobLabel" in spec:
                assert spec["jobLabel"] in template["metadata"]["labels"], where
            scraped |= {daemon_of(c["image"], c.get("command")) for c in template["spec"]["containers"]}
    assert scraped == set(DAEMONS), scraped


# --- Docker --------------------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = venv_tool("hadolint")
    done = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES.values())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfiles_run_their_daemon_as_non_root() -> None:
    for daemon, path in DOCKERFILES.items():
        instructions = dockerfile(path)
        keywords = [keyword for keyword, _ in instructions]
        rest = {keyword: value for keyword, value in instructions}  # the last of each
        assert rest["ENTRYPOINT"] == f'["{daemon}"]', path.name
        options, prefix = DAEMONS[daemon]
        port = next(option.default for option in options if option.name == "port")
        assert rest["EXPOSE"] == str(port), path.name
        assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), f"{path.name}: USER after the last RUN"
        assert not rest["USER"].startswith(("0", "root")), path.name
        env = image_env(daemon)
        unknown = {name for name in env if name.startswith("T2I_")} - known_env(daemon)
        assert not unknown, f"{path.name}: {daemon} reads no variable(s) {sorted(unknown)}"
        assert env[f"{prefix}_HOST"] == "0.0.0.0", f"{path.name}: the daemon must listen on every interface in a container"


def test_gateway_image_has_no_torch() -> None:
    runs = " ".join(rest for keyword, rest in dockerfile(DOCKERFILES["t2i-gateway"]) if keyword == "RUN")
    assert "pip install" in runs and "[orchestrator]" not in runs and "torch" not in runs
    base = next(rest for keyword, rest in dockerfile(DOCKERFILES["t2i-gateway"]) if keyword == "FROM")
    assert base.startswith("python:") and "-slim" in base, base


def test_orchestrator_image_installs_cuda_torch_first() -> None:
    instructions = dockerfile(DOCKERFILES["t2i-orchestrator"])
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-runtime-" in args["CUDA_IMAGE"]
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    assert args["TORCH_VERSION"] == pins["torch"], "keep the image's torch the version the tests run with"
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run and "--index-url" in run)
    package_at = next(i for i, run in enumerate(runs) if "[orchestrator]" in run)
    assert torch_at < package_at
    env = image_env("t2i-orchestrator")
    volumes = [rest for keyword, rest in instructions if keyword == "VOLUME"]
    assert volumes == [f'["{env["HF_HOME"]}"]'], "the model cache is a volume"


def test_dockerignore_lets_the_package_in() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = setup["options"]["packages"].split()
    for path in DOCKERFILES.values():
        lines = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
        assert lines[[line.strip() for line in lines].index("*")] == "*", path.name  # everything else stays out
        wanted = {f"!{name}" for name in [*packages, "setup.py", "setup.cfg", "README.md", "constraints.txt"]}
        assert wanted <= set(lines), f"{path.name}.dockerignore leaves out {sorted(wanted - set(lines))}"


# --- Compose -------------------------------------------------------------------------------------------


def test_compose_daemons_use_only_flags_and_variables_they_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = set()
    for name, service, daemon in compose_daemons():
        seen.add(daemon)
        args = as_list(service.get("command")) or []
        unknown = set(flags(args)) - known_flags(daemon)
        assert not unknown, f"compose service {name}: {daemon} has no flag(s) {sorted(unknown)}"
        env = compose_env(service)
        unknown = {key for key in env if key.startswith("T2I_")} - known_env(daemon)
        assert not unknown, f"compose service {name}: {daemon} reads no variable(s) {sorted(unknown)}"
        values = settings(daemon, args, env, monkeypatch)
        assert duration_s(service["stop_grace_period"]) >= values["shutdown_grace"] + 10, f"compose service {name}: stop_grace_period"
        url = values["registry" if daemon == "t2i-gateway" else "register"]
        match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::\d+)?/\d+", url or "")
        assert match and match[1] in compose()["services"], f"compose service {name}: registry {url}"
        assert str(values["port"]) in service["healthcheck"]["test"][-1], name
        if daemon == "t2i-gateway":
            assert any(str(port).endswith(f":{values['port']}") for port in service["ports"]), name
        else:
            assert values["advertise_url"] == f"http://{name}:{values['port']}", name
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]) == DOCKERFILES[daemon], name
    assert seen == set(DAEMONS)


def test_compose_secrets_and_interpolations_come_from_the_example_env() -> None:
    text = (DOCKER / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    lines = (DOCKER / "example.env").read_text().splitlines()
    example = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    assert used and used <= example, f"not in etc/docker/example.env: {sorted(used - example)}"
    services = compose()["services"]
    # The gateway sends the node's secret: both from the same variable.
    gateway, node = services["gateway"]["environment"], services["orchestrator"]["environment"]
    assert gateway["T2I_GATEWAY_ORCHESTRATOR_SECRET"] == node["T2I_ORCHESTRATOR_SECRET"]
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_compose_downloads_the_warm_models_into_the_nodes_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    node = services["orchestrator"]
    hf_home = image_env("t2i-orchestrator")["HF_HOME"]
    assert f"hf-cache:{hf_home}" in node["volumes"] and "hf-cache" in compose()["volumes"]
    values = settings("t2i-orchestrator", as_list(node["command"]) or [], compose_env(node), monkeypatch)
    mount = next(v for v in node["volumes"] if v.split(":")[1] == str(values["models"]))
    specs = load_models_file(DOCKER / mount.split(":")[0])
    needed = set().union(*(repos_needed(spec) for spec in specs if spec.warm)) | {values["safety_checker"]}
    downloaded = {
        repo
        for service in services.values()
        if f"hf-cache:{hf_home}" in service.get("volumes", [])
        for repo in hf_downloads("\n".join(as_list(service.get("command")) or []))
    }
    assert needed <= downloaded, f"not downloaded: {sorted(needed - downloaded)}"
    assert node["depends_on"]["models"]["condition"] == "service_completed_successfully"
