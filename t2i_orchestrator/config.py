"""The orchestrator's configuration: flags, environment (``T2I_ORCHESTRATOR_*``) and a config file."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from discovery import RegistrySettings, normalize_url, registry_settings
from t2i_common.config import (
    COMMON_OPTIONS,
    LIMIT_OPTIONS,
    REGISTRY_OPTIONS,
    ConfigError,
    Option,
    limits_from,
    load_options,
    positive,
    secret_options,
    strong_secret,
)
from t2i_common.schemas import Limits

from .demo_model import DEMO_MODEL_ID
from .models import SAFETY_CHECKER_ID, ModelSpec, check_unique, load_models_file


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2i"


OPTIONS = (
    Option("host", "address to listen on", default="127.0.0.1"),
    Option("port", "port to listen on", type=int, default=8936),
    Option(
        "listen-fd",
        "serve on this inherited listening socket instead of binding --host/--port (how the gateway's --local-orchestrator "
        "starts a node: no other process can take its port meanwhile)",
        type=int,
    ),
    Option("models", "models file (JSON list in the shape of Livepeer's aiModels.json)", type=Path),
    Option("model", f"a warm model id (repeatable); with neither this nor --models: {DEMO_MODEL_ID}", repeat=True),
    Option("device", "auto, cpu, cuda or cuda:N", default="auto"),
    Option(
        "storage-dir",
        "folder for generated images (default: <cache-dir>/images; nodes on one machine may share it, as their ids are random, "
        "if they share --image-ttl too)",
        type=Path,
    ),
    Option("image-ttl", "seconds an image stays downloadable", type=positive(float), default=3600.0),
    Option("max-queue", "requests that may wait for the device; beyond: 503 with Retry-After", type=int, default=8),
    Option(
        "max-batch",
        "images one pipeline call may make for compatible requests waiting together, where this device measures "
        "that batching pays; 1: never batch (images bit-exact with an idle node's)",
        type=positive(int),
        default=8,
    ),
    Option("max-loaded-models", "models kept loaded; least recently used on-demand ones are evicted", type=positive(int), default=2),
    *secret_options("secret", "require 'Authorization: Bearer <secret>' on every endpoint but /health and /metrics"),
    Option("threads", "torch CPU threads (default: torch's choice, with passive OpenMP waiting)", type=positive(int)),
    Option("cache-dir", "where the demo model is built (default: $XDG_CACHE_HOME/t2i or ~/.cache/t2i)", type=Path),
    Option("lora-dir", "folder of LoRA adapters that requests may name by their folder name", type=Path),
    Option(
        "lora-hub",
        "LoRAs by Hugging Face repo id: off, cached (only those already in the cache), on (downloaded on first use), "
        "or comma-separated repo patterns allowed to download, e.g. 'nerijs/*,ByteDance/*'",
        default="cached",
    ),
    Option("lora-max-mb", "largest LoRA download, in MB", type=positive(float), default=512.0),
    Option(
        "lora-cache-mb",
        "LoRAs this node downloaded are kept to this many MB in the Hugging Face cache, the least recently used removed first",
        type=positive(float),
        default=4096.0,
    ),
    Option("lora-fetch-timeout", "seconds a request waits for a LoRA download", type=positive(float), default=120.0),
    Option(
        "safety-checker",
        "the safety checker for models without their own: a folder or Hugging Face repo id (loaded at start), or none",
        default=SAFETY_CHECKER_ID,
    ),
    Option("advertise-url", "base URL of this node in image URLs (default: the URL the request came to)"),
    Option(
        "register",
        "registry to join at start (with heartbeats) and leave at shutdown: a registry file or "
        "redis://[user:password@]host:6379/0 (rediss:// for TLS)",
    ),
    *REGISTRY_OPTIONS,
    Option("heartbeat-interval", "seconds between registry heartbeats", type=positive(float), default=10.0),
    Option("heartbeat-ttl", "seconds a Redis registry keeps this node after its last heartbeat", type=positive(float), default=30.0),
    Option("tls-cert", "certificate file (PEM): serve HTTPS", type=Path),
    Option("tls-key", "private key file (PEM) for --tls-cert", type=Path),
    Option("node-id", "name of this node in /capabilities (default: <hostname>:<port>)"),
    *LIMIT_OPTIONS,
    *COMMON_OPTIONS,
)


@dataclass(frozen=True)
class OrchestratorConfig:
    models: tuple[ModelSpec, ...] = (ModelSpec(DEMO_MODEL_ID, warm=True),)
    host: str = "127.0.0.1"
    port: int = 8936
    listen_fd: int | None = None
    device: str = "auto"
    storage_dir: Path = field(default_factory=lambda: default_cache_dir() / "images")
    image_ttl_s: float = 3600.0
    max_queue: int = 8
    max_batch: int = 8
    max_loaded_models: int = 2
    secret: str | None = None
    threads: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    lora_dir: Path | None = None
    lora_hub: str = "cached"
    lora_max_bytes: int = 512 * 2**20
    lora_cache_bytes: int = 4 * 2**30
    lora_fetch_timeout_s: float = 120.0
    safety_checker: str | None = SAFETY_CHECKER_ID  # None: no shared checker
    advertise_url: str | None = None
    node_id: str = field(default_factory=socket.gethostname)
    register: RegistrySettings | None = None
    heartbeat_interval_s: float = 10.0
    heartbeat_ttl_s: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = Limits()
    shutdown_grace_s: float = 120.0
    log_prompts: bool = False
    log_level: str = "info"


def load_config(argv: Sequence[str] | None = None) -> OrchestratorConfig:
    values = load_options(
        "t2i-orchestrator", "A text-to-image node: diffusers models behind the Livepeer AI API.", OPTIONS, argv, "T2I_ORCHESTRATOR"
    )
    specs: list[ModelSpec] = load_models_file(values["models"]) if values["models"] else []
    specs += [ModelSpec(model_id, warm=True) for model_id in values["model"] or []]
    if not specs:
        specs = [ModelSpec(DEMO_MODEL_ID, warm=True)]
    check_unique(specs, "--models/--model")
    for spec in specs:
        for key, path in (("path", spec.path), ("unet_path", spec.unet_path)):
            if path and not Path(path).exists():
                raise ConfigError(f"model {spec.model_id}: its {key} {path} does not exist")
    if values["max_queue"] < 0:
        raise ConfigError(f"--max-queue must be 0 or more, got {values['max_queue']}")
    register = registry_settings(values, "register")
    if register and not values["advertise_url"]:
        raise ConfigError("--register needs --advertise-url: the URL gateways should use to reach this node")
    advertise_url = None
    if values["advertise_url"]:
        try:  # stored as checked: the registry entry, its reports and its leave must all name one URL
            advertise_url = normalize_url(values["advertise_url"])
        except ValueError as exc:
            raise ConfigError(f"--advertise-url: {exc}") from None
    if register and register.is_redis and values["heartbeat_ttl"] <= values["heartbeat_interval"]:
        raise ConfigError("--heartbeat-ttl must be longer than --heartbeat-interval, or the node drops out between heartbeats")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    cache_dir = values["cache_dir"] or default_cache_dir()
    return OrchestratorConfig(
        models=tuple(specs),
        host=values["host"],
        port=values["port"],
        listen_fd=values["listen_fd"],
        device=values["device"],
        # Not named by anything that changes between runs (the port of an embedded node does), so that
        # every run sweeps what earlier runs left.
        storage_dir=values["storage_dir"] or cache_dir / "images",
        image_ttl_s=values["image_ttl"],
        max_queue=values["max_queue"],
        max_batch=values["max_batch"],
        max_loaded_models=values["max_loaded_models"],
        secret=strong_secret(values, "secret"),
        threads=values["threads"],
        cache_dir=cache_dir,
        lora_dir=values["lora_dir"],
        lora_hub=values["lora_hub"],
        lora_max_bytes=int(values["lora_max_mb"] * 2**20),
        lora_cache_bytes=int(values["lora_cache_mb"] * 2**20),
        lora_fetch_timeout_s=values["lora_fetch_timeout"],
        safety_checker=None if values["safety_checker"].lower() == "none" else values["safety_checker"],
        advertise_url=advertise_url,
        node_id=values["node_id"] or f"{socket.gethostname()}:{values['port']}",
        limits=limits_from(values),
        register=register,
        heartbeat_interval_s=values["heartbeat_interval"],
        heartbeat_ttl_s=values["heartbeat_ttl"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        shutdown_grace_s=values["shutdown_grace"],
        log_prompts=values["log_prompts"],
        log_level=values["log_level"],
    )
