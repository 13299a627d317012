"""Fakes for unit tests, named as such: no torch, no diffusers."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

from PIL import Image

from t2i_common.schemas import TextToImageRequest
from t2i_orchestrator.engine import GeneratedImage, GenerationCancelled


def solid_png(width: int, height: int, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeEngine:
    """An ``InferenceEngine`` that paints solid images; ``gate`` can hold generation to test queueing."""

    device = "fake"

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.stopped = threading.Event()  # set when a generation noticed should_stop
        self._loaded: tuple[str, ...] = ()

    def loaded_models(self) -> tuple[str, ...]:
        return self._loaded

    def load(self, model_id: str) -> bool:
        if model_id in self._loaded:
            return False
        self.loads.append(model_id)
        self._loaded += (model_id,)
        return True

    def generate(
        self, request: TextToImageRequest, model_id: str, seed: int, should_stop: Callable[[], bool]
    ) -> list[GeneratedImage]:
        self.load(model_id)
        self.started.set()
        while not self.gate.wait(0.01):
            if should_stop():
                self.stopped.set()
                raise GenerationCancelled()
        n = request.num_images_per_prompt
        return [GeneratedImage(solid_png(request.width, request.height, seed + i), seed + i, False) for i in range(n)]

    def unload_all(self) -> None:
        self._loaded = ()
