"""What operators get in etc/: every example loads, and the real tools accept the units and Prometheus files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from discovery.registry import read_registry
from metrics import GatewayMetrics, OrchestratorMetrics
from t2i_gateway import config as gateway_config
from t2i_orchestrator import config as orchestrator_config
from t2i_orchestrator.models import load_models_file

from .helpers import tool

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"


def test_example_configs_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    node = orchestrator_config.load_config(["--config", str(ETC / "orchestrator.example.toml")])
    assert node.port == 8936 and node.models == tuple(load_models_file(ETC / "models.gpu.json"))
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\nkey-one\n")
    monkeypatch.setenv("T2I_GATEWAY_API_KEYS_FILE", str(keys))
    gateway = gateway_config.load_config(["--config", str(ETC / "gateway.example.toml")])
    assert gateway.api_keys == {"key-one"} and len(gateway.orchestrators) == 2
    assert [spec.model_id for spec in load_models_file(ETC / "models.demo.json")] == ["t2i/tiny-sd"]
    assert len(read_registry(ETC / "registry.example.json")) == 2


@pytest.mark.parametrize(("env_file", "module"), [("gateway.env", gateway_config), ("orchestrator.env", orchestrator_config)])
def test_environment_files_name_real_options(env_file: str, module: object) -> None:
    prefix = "T2I_GATEWAY_" if module is gateway_config else "T2I_ORCHESTRATOR_"
    known = {prefix + option.dest.upper() for option in module.OPTIONS}  # type: ignore[attr-defined]
    names = [line.split("=", 1)[0] for line in (ETC / env_file).read_text().splitlines() if line and not line.startswith("#")]
    assert names and set(names) <= known, set(names) - known


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
