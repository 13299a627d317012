"""The gateway's configuration: flags, environment (``T2I_GATEWAY_*``) and a config file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from discovery import RegistrySettings, normalize_url, registry_settings
from discovery.registry import RegistryError, read_registry
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

from .image_store import StoreLocation
from .tenants import KeysError, read_keys

OPTIONS = (
    Option("host", "address to listen on", default="127.0.0.1"),
    Option("port", "port to listen on", type=int, default=8935),
    Option("orchestrator", "orchestrator base URL (repeatable)", repeat=True),
    Option(
        "registry",
        "where orchestrators register: a registry file (re-read when it changes) or redis://[user:password@]host:6379/0 "
        "(rediss:// for TLS)",
    ),
    *REGISTRY_OPTIONS,
    Option(
        "heartbeat-ttl",
        "seconds after which a registry-file entry without a fresh heartbeat is ignored; with Redis, how long the last "
        "known nodes are kept after Redis comes back from an outage",
        type=positive(float),
        default=30.0,
    ),
    Option(
        "orchestrator-ca", "CA certificate (PEM) that https:// orchestrators' certificates must chain to (default: the system's)", type=Path
    ),
    Option("local-orchestrator", "also start an orchestrator with the demo model as a managed child process", flag=True, default=False),
    *secret_options("orchestrator-secret", "bearer secret sent to orchestrators"),
    Option("api-key", "API key that clients must send as 'Authorization: Bearer <key>' (repeatable)", repeat=True),
    Option("api-keys-file", "file of API keys, one per line (re-read when it changes, and on SIGHUP)", type=Path),
    Option(
        "keys-file",
        "TOML file of named API keys (their secrets' SHA-256) with limits, models and queue weights (see the README's "
        "'Keys, limits and usage'); re-read when it changes, and on SIGHUP",
        type=Path,
    ),
    Option(
        "limits-redis",
        "redis://host:6379/0 (rediss:// for TLS; with the --registry-* options): count keys' limits and usage there, "
        "shared by every gateway that names it (default: the --registry's Redis if it is one, else this gateway alone)",
    ),
    Option("public-url", "base of image URLs, e.g. https://gateway.example.net (default: the URL the request came to)"),
    *secret_options("stream-secret", "secret that signs /stream ids; gateways behind one load balancer must share it (default: random)"),
    Option("image-ttl", "seconds a returned image URL stays valid", type=positive(float), default=3600.0),
    Option(
        "image-store",
        "s3://BUCKET/PREFIX: move each image into this S3 bucket before answering, so that its url outlives the node "
        "(credentials and region from the standard AWS chain); default: images stay on their node",
    ),
    Option("s3-endpoint", "URL of an S3-compatible service for --image-store (MinIO, SeaweedFS, R2, ...); default: AWS"),
    Option(
        "stream-redirect",
        "answer /stream of a stored image with a redirect to a presigned URL of the store, valid 5 minutes, instead of "
        "streaming it through the gateway (the store's endpoint must be reachable by clients)",
        flag=True,
        default=False,
    ),
    Option(
        "store-timeout",
        "seconds the image store may take per call; beyond, a request is answered with the node's image urls",
        type=positive(float),
        default=10.0,
    ),
    Option("max-streams", "image downloads (/stream) served at once; beyond, 503 at once", type=positive(int), default=256),
    Option(
        "stream-write-timeout",
        "seconds a client may take to accept each chunk of an image download; beyond, the download is cut off "
        "(a client that never reads holds no socket or node connection for long)",
        type=positive(float),
        default=30.0,
    ),
    Option("max-in-flight", "text-to-image requests handled at once; beyond, 503 at once", type=positive(int), default=256),
    Option(
        "body-timeout",
        "seconds a request's body may take to arrive, once its headers have; beyond, 408 (a slow sender holds no slot for long)",
        type=positive(float),
        default=10.0,
    ),
    Option(
        "max-queued",
        "requests that may wait at the gateway, in arrival order, for a slot when every suitable node is full; "
        "beyond, 503 at once; 0: never wait",
        type=int,
        default=64,
    ),
    Option(
        "node-queue",
        "requests the gateway leaves waiting on a node beyond the one it runs (default: as many as the node takes); "
        "0 keeps every wait at the gateway, where keys are served in turn (one more goes as the node's work is about to "
        "end, so that its device does not wait for it); a batching node needs its batch size",
        type=int,
    ),
    Option("queue-timeout", "seconds a request waits for a free slot before its 503", type=positive(float), default=30.0),
    Option("max-attempts", "orchestrators tried per request", type=positive(int), default=3),
    Option(
        "max-suspended-share",
        "at most this share of the nodes serving a model is suspended for failed requests (a node whose probe fails is "
        "suspended whatever the share)",
        type=float,
        default=0.5,
    ),
    Option(
        "request-timeout", "overall deadline of a request, generation and retries included (seconds)", type=positive(float), default=300.0
    ),
    Option("connect-timeout", "seconds to connect to an orchestrator", type=positive(float), default=2.0),
    Option(
        "probe-interval",
        "seconds between /capabilities probes of an idle orchestrator (longer in a fleet of more than 50x as many nodes: at most 50 probes/s)",
        type=positive(float),
        default=5.0,
    ),
    Option("probe-timeout", "seconds a /capabilities probe may take before the node counts as down", type=positive(float), default=3.0),
    Option("default-model", "model for requests that name none (default: the model warm on most orchestrators)"),
    Option("metrics-port", "serve GET /metrics on this port alone (for operators), not on the public one", type=int),
    Option("metrics-host", "address of --metrics-port", default="127.0.0.1"),
    Option("tls-cert", "certificate file (PEM): serve HTTPS", type=Path),
    Option("tls-key", "private key file (PEM) for --tls-cert", type=Path),
    *LIMIT_OPTIONS,
    *COMMON_OPTIONS,
)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8935
    orchestrators: tuple[str, ...] = ()
    registry: RegistrySettings | None = None
    heartbeat_ttl_s: float = 30.0
    orchestrator_ca: Path | None = None
    local_orchestrator: bool = False
    orchestrator_secret: str | None = None
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    keys_file: Path | None = None
    limits_redis: RegistrySettings | None = None
    public_url: str | None = None
    stream_secret: str | None = None
    image_ttl_s: float = 3600.0
    image_store: StoreLocation | None = None
    s3_endpoint: str | None = None
    stream_redirect: bool = False
    store_timeout_s: float = 10.0
    max_streams: int = 256
    stream_write_timeout_s: float = 30.0
    max_in_flight: int = 256
    body_timeout_s: float = 10.0
    max_queued: int = 64
    queue_timeout_s: float = 30.0
    node_queue: int | None = None
    max_attempts: int = 3
    max_suspended_share: float = 0.5
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 2.0
    probe_interval_s: float = 5.0
    probe_timeout_s: float = 3.0
    default_model: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace_s: float = 120.0
    log_prompts: bool = False
    log_level: str = "info"


def load_config(argv: Sequence[str] | None = None) -> GatewayConfig:
    values = load_options(
        "t2i-gateway", "The text-to-image gateway: finds orchestrators, picks one, retries, proxies images.", OPTIONS, argv, "T2I_GATEWAY"
    )
    try:
        orchestrators = tuple(dict.fromkeys(normalize_url(url) for url in values["orchestrator"] or []))
    except ValueError as exc:
        raise ConfigError(f"--orchestrator: {exc}") from None
    if not (orchestrators or values["registry"] or values["local_orchestrator"]):
        raise ConfigError("nothing to route to: give --orchestrator URL, --registry FILE or --local-orchestrator")
    api_keys = tuple(values["api_key"] or [])
    try:
        read_keys(api_keys, values["api_keys_file"], values["keys_file"])
    except KeysError as exc:
        raise ConfigError(str(exc)) from None
    registry = registry_settings(values, "registry")
    if registry and not registry.is_redis:
        try:
            read_registry(Path(registry.location))  # a missing file is fine: nodes will create it
        except RegistryError as exc:
            raise ConfigError(f"--registry {registry.location}: {exc}") from None
    if values["orchestrator_ca"] and not values["orchestrator_ca"].is_file():
        raise ConfigError(f"--orchestrator-ca: {values['orchestrator_ca']} is not a file")
    if values["node_queue"] is not None and values["node_queue"] < 0:
        raise ConfigError(f"--node-queue must be 0 or more, got {values['node_queue']}")
    if values["max_queued"] < 0:
        raise ConfigError(f"--max-queued must be 0 or more, got {values['max_queued']}")
    if not 0 <= values["max_suspended_share"] <= 1:
        raise ConfigError(f"--max-suspended-share must be between 0 and 1, got {values['max_suspended_share']}")
    limits_redis = registry_settings(values, "limits-redis")
    if limits_redis and not limits_redis.is_redis:
        raise ConfigError("--limits-redis: a redis:// or rediss:// URL, as in redis://127.0.0.1:6379/0")
    image_store = None
    if values["image_store"]:
        try:
            image_store = StoreLocation.parse(values["image_store"])
        except ValueError as exc:
            raise ConfigError(f"--image-store: {exc}") from None
    if values["s3_endpoint"] and not (image_store and values["s3_endpoint"].startswith(("http://", "https://"))):
        raise ConfigError("--s3-endpoint needs --image-store, and is an http:// or https:// URL")
    if values["stream_redirect"] and not image_store:
        raise ConfigError("--stream-redirect needs --image-store: only stored images have a URL to redirect to")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    return GatewayConfig(
        host=values["host"],
        port=values["port"],
        orchestrators=orchestrators,
        registry=registry,
        heartbeat_ttl_s=values["heartbeat_ttl"],
        orchestrator_ca=values["orchestrator_ca"],
        local_orchestrator=values["local_orchestrator"],
        orchestrator_secret=strong_secret(values, "orchestrator-secret"),
        api_keys=api_keys,
        api_keys_file=values["api_keys_file"],
        keys_file=values["keys_file"],
        limits_redis=limits_redis or (registry if registry and registry.is_redis else None),
        public_url=values["public_url"].rstrip("/") if values["public_url"] else None,
        stream_secret=strong_secret(values, "stream-secret"),
        image_ttl_s=values["image_ttl"],
        image_store=image_store,
        s3_endpoint=values["s3_endpoint"],
        stream_redirect=values["stream_redirect"],
        store_timeout_s=values["store_timeout"],
        max_streams=values["max_streams"],
        stream_write_timeout_s=values["stream_write_timeout"],
        max_in_flight=values["max_in_flight"],
        body_timeout_s=values["body_timeout"],
        max_queued=values["max_queued"],
        max_suspended_share=values["max_suspended_share"],
        queue_timeout_s=values["queue_timeout"],
        node_queue=values["node_queue"],
        max_attempts=values["max_attempts"],
        request_timeout_s=values["request_timeout"],
        connect_timeout_s=values["connect_timeout"],
        probe_interval_s=values["probe_interval"],
        probe_timeout_s=values["probe_timeout"],
        default_model=values["default_model"],
        metrics_port=values["metrics_port"],
        metrics_host=values["metrics_host"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        limits=limits_from(values),
        shutdown_grace_s=values["shutdown_grace"],
        log_prompts=values["log_prompts"],
        log_level=values["log_level"],
    )
