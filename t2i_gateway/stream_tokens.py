"""Signed stream ids: any gateway holding the secret can find the image's orchestrator, statelessly.

A token carries the orchestrator's base URL (as discovery knows it, never as a node or client
claims it), the image's path there and an expiry, signed with HMAC-SHA256. A tampered, foreign or
expired token verifies as nothing, so ``/stream`` never fetches an address a client chose.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

MAX_TOKEN_LENGTH = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class StreamTarget:
    node_url: str
    path: str  # on the node, e.g. /stream/<id>/<name>.png


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamSigner:
    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)  # copied per token: the key is set up once
        self.ttl_s = ttl_s

    def sign(self, target: StreamTarget) -> str:
        payload = _b64(json.dumps([target.node_url, target.path, int(time.time() + self.ttl_s)], separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> StreamTarget | None:
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        payload, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            node_url, path, expires = json.loads(_unb64(payload))
        except (ValueError, binascii.Error, TypeError):
            return None
        if not isinstance(expires, int) or expires < time.time():
            return None
        return StreamTarget(node_url, path)

    def _mac(self, payload: str) -> str:
        mac = self._keyed.copy()
        mac.update(payload.encode())
        return _b64(mac.digest()[:18])
