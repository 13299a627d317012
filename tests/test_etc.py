"""What operators get in etc/: every example loads, and the real tools accept the units and Prometheus files.

The image store is opt-in everywhere (commented out, or empty by default): each example also loads, and each
manifest validates, with its store settings turned on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from discovery.registry import read_registry
from metrics import GatewayMetrics, OrchestratorMetrics
from t2i_gateway import config as gateway_config
from t2i_gateway.image_store import StoreLocation
from t2i_orchestrator import config as orchestrator_config
from t2i_orchestrator.models import load_models_file

from .helpers import tool
from .test_deploy import KUBERNETES_VERSION

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
DOCKER = ETC / "docker"
K8S = ETC / "k8s"
# The gateway's options for the image store, and the variables of the standard AWS chain (botocore's) that
# the examples may set next to them.
STORE_OPTIONS = {"image-store", "s3-endpoint", "stream-redirect", "store-timeout"}
STORE_VARIABLES = {f"T2I_GATEWAY_{name.replace('-', '_').upper()}" for name in STORE_OPTIONS}
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"}
# Stands in for every secret that the examples leave to the operator (their placeholders are refused).
SECRET = "0123456789abcdef" * 4


def env_settings(text: str, *, commented: bool = False) -> dict[str, str]:
    """NAME=value lines of an environment file; with commented, those commented out (`#NAME=value`, `#   NAME=value`)."""
    pattern = r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    return dict(re.findall(pattern, text, re.MULTILINE))


def load_gateway(monkeypatch: pytest.MonkeyPatch, args: Sequence[str], env: dict[str, str]) -> gateway_config.GatewayConfig:
    """The gateway's configuration from these arguments and exactly these T2I_GATEWAY_* variables."""
    for name in list(os.environ):
        if name.startswith("T2I_GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("T2I_GATEWAY_"):
            monkeypatch.setenv(name, value)
    return gateway_config.load_config(list(args))


def api_keys_file(tmp_path: Path) -> Path:
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\nkey-one\n")
    return keys


def test_example_configs_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    node = orchestrator_config.load_config(["--config", str(ETC / "orchestrator.example.toml")])
    assert node.port == 8936 and node.models == tuple(load_models_file(ETC / "models.gpu.json"))
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\nkey-one\n")
    monkeypatch.setenv("T2I_GATEWAY_API_KEYS_FILE", str(keys))
    gateway = gateway_config.load_config(["--config", str(ETC / "gateway.example.toml")])
    assert gateway.api_keys_file == keys and len(gateway.orchestrators) == 2
    assert gateway.keys_file == Path("etc/keys.example.toml") and gateway.limits_redis is None
    assert gateway.image_store is None and not gateway.stream_redirect  # the store is opt-in
    assert [spec.model_id for spec in load_models_file(ETC / "models.demo.json")] == ["t2i/tiny-sd"]
    assert len(read_registry(ETC / "registry.example.json")) == 2


@pytest.mark.parametrize(("env_file", "module"), [("gateway.env", gateway_config), ("orchestrator.env", orchestrator_config)])
def test_environment_files_name_real_options(env_file: str, module: object) -> None:
    prefix = "T2I_GATEWAY_" if module is gateway_config else "T2I_ORCHESTRATOR_"
    known = {prefix + option.dest.upper() for option in module.OPTIONS}  # type: ignore[attr-defined]
    names = [line.split("=", 1)[0] for line in (ETC / env_file).read_text().splitlines() if line and not line.startswith("#")]
    assert names and set(names) <= known, set(names) - known
    # The settings offered commented out too: the daemon's own, or (the gateway's store) the AWS chain's.
    offered = set(env_settings((ETC / env_file).read_text(), commented=True))
    assert offered <= known | (AWS_VARIABLES if module is gateway_config else set()), offered - known


def test_example_config_with_the_store_turned_on_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = (ETC / "gateway.example.toml").read_text()
    offered = set(re.findall(r"^# ([a-z][a-z0-9-]*) = ", text, re.MULTILINE))
    assert STORE_OPTIONS <= offered, STORE_OPTIONS - offered
    (tmp_path / "gateway.toml").write_text(re.sub(r"^# ([a-z][a-z0-9-]* = .*)$", r"\1", text, flags=re.MULTILINE))
    settings = tomllib.loads((tmp_path / "gateway.toml").read_text())
    monkeypatch.chdir(ROOT)
    env = {"T2I_GATEWAY_API_KEYS_FILE": str(api_keys_file(tmp_path))}
    gateway = load_gateway(monkeypatch, ["--config", str(tmp_path / "gateway.toml")], env)
    assert gateway.image_store == StoreLocation.parse(settings["image-store"]) and gateway.s3_endpoint == settings["s3-endpoint"]
    assert gateway.stream_redirect is True and gateway.store_timeout_s == settings["store-timeout"]


def test_environment_file_with_the_store_turned_on_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = (ETC / "gateway.env").read_text()
    offered = env_settings(text, commented=True)
    assert STORE_VARIABLES <= set(offered) and {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(offered)
    env = {name: SECRET if "change-me" in value else value for name, value in {**env_settings(text), **offered}.items()}
    env["T2I_GATEWAY_API_KEYS_FILE"] = str(api_keys_file(tmp_path))
    gateway = load_gateway(monkeypatch, [], env)
    assert gateway.image_store == StoreLocation.parse(offered["T2I_GATEWAY_IMAGE_STORE"])
    assert gateway.s3_endpoint == offered["T2I_GATEWAY_S3_ENDPOINT"] and gateway.stream_redirect is True


def test_prometheus_config_and_alert_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=ETC / "prometheus", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_and_dashboard_use_only_metrics_that_exist() -> None:
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    OrchestratorMetrics(registry)
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    dashboard = json.loads((ETC / "grafana" / "t2i-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions.append((ETC / "prometheus" / "alerts.yml").read_text())
    used = {name for expression in expressions for name in re.findall(r"\bt2i_[a-z_]+", expression)}
    assert used and used <= exported, used - exported


def test_systemd_units_verify(tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze")
    for unit in sorted((ETC / "systemd").glob("*.service")):
        # The units name the installed paths; point them at this checkout's so that verify can check them.
        daemon = unit.stem
        text = unit.read_text().replace(f"/opt/t2i/venv/bin/{daemon}", str(Path(sys.executable).with_name(daemon)))
        (tmp_path / unit.name).write_text(text)
        done = subprocess.run(
            [systemd_analyze, "verify", "--man=no", str(tmp_path / unit.name)], capture_output=True, text=True, timeout=60
        )
        # verify only warns (exit 0) about unknown keys or bad values: its output must be empty too.
        assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stdout + done.stderr


# --- the image store in Compose -------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    return services


def interpolate(text: str, env: dict[str, str]) -> str:
    """What Compose makes of ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, operator, argument = match["name"], match["operator"] or "", match["argument"] or ""
        value = env.get(name)
        missing = value is None or (operator.startswith(":") and value == "")
        if missing and operator.endswith("?"):
            pytest.fail(f"Compose refuses to start: {name} is not set ({argument})")
        if missing and operator.endswith("-"):
            return argument
        return value or ""

    pattern = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}"
    return re.sub(pattern, one, text)


def compose_gateway(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> tuple[dict[str, str], gateway_config.GatewayConfig]:
    """The gateway service's environment when Compose reads these variables (.env), and its configuration."""
    service = compose_services()["gateway"]
    environment = {name: interpolate(str(value), env) for name, value in service["environment"].items()}
    args = [interpolate(arg, env) for arg in service["command"]]
    return environment, load_gateway(monkeypatch, args, environment)


def example_env() -> dict[str, str]:
    """etc/docker/example.env as an operator fills it in: every CHANGE-ME replaced, the rest as it is."""
    return {name: SECRET if "CHANGE-ME" in value else value for name, value in env_settings((DOCKER / "example.env").read_text()).items()}


def test_compose_store_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    store = {name for name, service in services.items() if "store" in service.get("profiles", [])}
    assert store, "no service in the `store` profile"
    for name, service in services.items():
        if service.get("profiles"):
            continue
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on as a mapping, so that each says whether it is required"
        for dependency, condition in depends_on.items():
            # `docker compose up` without the profile refuses a required dependency on a service left out.
            if services[dependency].get("profiles"):
                assert condition.get("required") is False, f"{name} requires {dependency}, which runs only with its profile"
    # As example.env comes (store variables empty): no store, and no store setting the gateway would refuse.
    environment, gateway = compose_gateway(monkeypatch, example_env())
    assert STORE_VARIABLES & set(environment), "the gateway's environment offers no store setting"
    assert gateway.image_store is None and not gateway.s3_endpoint and not gateway.stream_redirect


def test_compose_gateway_uses_the_bundled_store(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    offered = env_settings((DOCKER / "example.env").read_text(), commented=True)
    assert {"T2I_IMAGE_STORE", "T2I_S3_ENDPOINT"} <= set(offered), "example.env shows no values for the bundled store"
    env = {**example_env(), **offered, "T2I_STORE_ACCESS_KEY": "t2i-access", "T2I_STORE_SECRET_KEY": SECRET}
    environment, gateway = compose_gateway(monkeypatch, env)
    assert gateway.image_store is not None and gateway.s3_endpoint
    # The S3 service that the endpoint names: in the store profile, making the gateway's bucket at start, and
    # healthy (what the gateway waits for) only once the bucket exists.
    endpoint = urlsplit(gateway.s3_endpoint)
    assert endpoint.hostname in services, f"{gateway.s3_endpoint}: no such service"
    store = services[str(endpoint.hostname)]
    assert "store" in store["profiles"] and services["gateway"]["depends_on"][endpoint.hostname]["condition"] == "service_healthy"
    args = [interpolate(arg, env) for arg in store["command"]]
    assert args[0] == "mini", "SeaweedFS's all-in-one command, whose flags these are"
    flags = dict(arg[1:].split("=", 1) for arg in args[1:] if arg.startswith("-") and "=" in arg)
    assert endpoint.port == int(flags.get("s3.port", "8333"))
    assert gateway.image_store.bucket in flags["bucket"].split(",")
    health = " ".join(store["healthcheck"]["test"])
    assert f"127.0.0.1:{flags.get('filer.port', '8888')}/buckets/{gateway.image_store.bucket}/" in health
    # The gateway signs with the key pair that SeaweedFS takes as its admin's.
    store_env = {name: interpolate(str(value), env) for name, value in store["environment"].items()}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert environment[name] and environment[name] == store_env[name], name
    # Clients could not follow a redirect to http://seaweedfs:8333: downloads go through the gateway.
    assert not gateway.stream_redirect


# --- the image store in Kubernetes ----------------------------------------------------------------------

# The commented-out settings that turn the store on: env entries, and the ServiceAccount's IRSA annotation.
K8S_STORE_LINES = r"^(\s+)# (- name: [A-Z][A-Z0-9_]*|  value: .+|annotations:|  eks\.amazonaws\.com/role-arn: .+)$"


def k8s_gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gateway's pod template and container."""
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "t2i-gateway"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return template, container


def test_k8s_store_is_off_as_shipped_and_its_keys_come_from_an_optional_secret() -> None:
    text = (K8S / "gateway.yaml").read_text()
    _, container = k8s_gateway([doc for doc in yaml.safe_load_all(text) if doc])
    env = {item["name"]: item for item in container["env"]}
    assert not STORE_VARIABLES & set(env)
    # The EKS pod identity webhook sets the region only in pods whose spec names none.
    assert "AWS_DEFAULT_REGION" not in env
    refs = {name: item["valueFrom"]["secretKeyRef"] for name, item in env.items() if name in AWS_VARIABLES}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    applied = {
        doc["metadata"]["name"]
        for path in K8S.glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Secret"
    }
    for name, ref in refs.items():
        # Made by hand, as the comment says; absent, the pods start all the same (and use IRSA, if any).
        assert ref["optional"] is True and ref["name"] not in applied, name
        assert f"create secret generic {ref['name']}" in text and f"--from-literal={ref['key']}=" in text, name


def test_k8s_gateway_with_the_store_turned_on_validates_and_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = (K8S / "gateway.yaml").read_text()
    docs = [doc for doc in yaml.safe_load_all(re.sub(K8S_STORE_LINES, r"\1\2", text, flags=re.MULTILINE)) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    template, container = k8s_gateway(docs)
    env = {item["name"]: item for item in container["env"]}
    assert STORE_VARIABLES | {"AWS_DEFAULT_REGION"} <= set(env), set(env)
    unknown = {name for name in env if name.startswith("T2I_")} - {f"T2I_GATEWAY_{o.dest.upper()}" for o in gateway_config.OPTIONS}
    assert not unknown
    # The values convert as the gateway converts them (a Secret's value: a stand-in).
    values = {name: item.get("value", SECRET) for name, item in env.items()}
    args = [f"--api-keys-file={api_keys_file(tmp_path)}" if arg.startswith("--api-keys-file=") else arg for arg in container["args"]]
    gateway = load_gateway(monkeypatch, args, values)
    assert gateway.image_store == StoreLocation.parse(values["T2I_GATEWAY_IMAGE_STORE"]) and gateway.stream_redirect is True
    assert gateway.s3_endpoint == values["T2I_GATEWAY_S3_ENDPOINT"] and gateway.store_timeout_s == float(
        values["T2I_GATEWAY_STORE_TIMEOUT"]
    )
    # IRSA: the pods run as the ServiceAccount that the role annotation goes on, with no API token mounted.
    (account,) = [
        doc for doc in docs if doc["kind"] == "ServiceAccount" and doc["metadata"]["name"] == template["spec"]["serviceAccountName"]
    ]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert account["automountServiceAccountToken"] is False and template["spec"]["automountServiceAccountToken"] is False
