"""Signed stream ids: any gateway holding the secret can find the image, statelessly.

A token carries where the image is, its id, name and format, and an expiry. Where is either the image
store (``STORED``: any gateway with the same ``--image-store`` serves it), or the node that made it,
as an opaque key (an HMAC of its URL as discovery knows it): a client learns no internal address from
it, and the gateway finds the node among those it knows now, so ``/stream`` only ever fetches
``/stream/<id>/<name>.<format>`` from a node of its own fleet, never an address a token (or a node's
answer) names. The whole token is signed with HMAC-SHA256: a tampered, foreign or expired one
verifies as nothing.
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

from t2i_common import IMAGE_PATH

MAX_TOKEN_LENGTH = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
STORED = "store"  # the source of an image in the image store; a node key is 24 other characters


@dataclass(frozen=True, slots=True)
class StreamTarget:
    source: str  # STORED, or StreamSigner.node_key of the node's URL
    image_id: str
    name: str
    format: str

    @property
    def stored(self) -> bool:
        return self.source == STORED

    @property
    def path(self) -> str:
        """On the node, and (under the store's prefix) the key of the stored object."""
        return f"/stream/{self.image_id}/{self.name}.{self.format}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamSigner:
    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)  # copied per token: the key is set up once
        self.ttl_s = ttl_s

    def node_key(self, node_url: str) -> str:
        """The opaque name a token gives the node at ``node_url``."""
        return self._mac(f"node {node_url}")

    def target(self, image_path: str, node_url: str | None = None) -> StreamTarget:
        """The image at ``image_path`` (of the node's image form, else ValueError) on the node at
        ``node_url``, or in the image store."""
        match = IMAGE_PATH.fullmatch(image_path)
        if match is None:
            raise ValueError(f"not a node's image path: {image_path[:200]!r}")
        return StreamTarget(self.node_key(node_url) if node_url else STORED, match[1], match[2], match[3])

    def sign(self, target: StreamTarget) -> str:
        fields = [target.source, target.image_id, target.name, target.format, int(time.time() + self.ttl_s)]
        payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> StreamTarget | None:
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        payload, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            source, image_id, name, fmt, expires = json.loads(_unb64(payload))
        except (ValueError, binascii.Error, TypeError):
            return None
        if not isinstance(expires, int) or expires < time.time():
            return None
        target = StreamTarget(str(source), str(image_id), str(name), str(fmt))
        return target if IMAGE_PATH.fullmatch(target.path) else None

    def _mac(self, payload: str) -> str:
        mac = self._keyed.copy()
        mac.update(payload.encode())
        return _b64(mac.digest()[:18])
