"""The gateway application's shared state: one typed key per resource, set up by ``create_app``."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from metrics import GatewayMetrics

from .config import GatewayConfig
from .image_store import S3ImageStore
from .limits import Limiter
from .nodes import NodePool
from .stream_tokens import StreamSigner
from .tenants import KeyFiles

CONFIG = web.AppKey("config", GatewayConfig)
METRICS = web.AppKey("metrics", GatewayMetrics)
POOL = web.AppKey("pool", NodePool)
SIGNER = web.AppKey("signer", StreamSigner)
SESSION = web.AppKey("session", aiohttp.ClientSession)
STORE = web.AppKey("store", S3ImageStore)  # only with --image-store
KEYS = web.AppKey("keys", KeyFiles)
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
