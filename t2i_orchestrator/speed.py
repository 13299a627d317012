"""How fast this node generates, per model: what gateways schedule by.

Work is counted in megapixel-steps (width x height / 10^6 x steps x images): a denoising step's cost grows
with the pixels it processes, and a request's with its steps and images. Each model's speed is a moving
average of seconds per megapixel-step over real calls (a batch counts as the work of all its requests),
leaving out the first call after a load (warm-up, autotuning): ``/capabilities`` reports it with the
work the node holds, in seconds, so that a gateway can send a request where it will finish first.
"""

from __future__ import annotations

from collections.abc import Mapping

from t2i_common.schemas import TextToImageRequest

SMOOTHING = 0.3  # weight of each new call: a node that slows down (heat, a neighbour) is followed in a few calls


def work_of(request: TextToImageRequest, default_steps: int) -> float:
    """A request's work in megapixel-steps."""
    steps = request.num_inference_steps or default_steps
    return request.width * request.height / 1e6 * steps * request.num_images_per_prompt


class SpeedMeter:
    def __init__(self, default_steps: Mapping[str, int]) -> None:
        self.default_steps = dict(default_steps)  # model -> the steps of a request that names none
        self._speed: dict[str, float] = {}  # model -> seconds per megapixel-step
        self._load_s: dict[str, float] = {}  # model -> seconds its last load took
        self._warm: set[str] = set()  # models with a call since their load: their next calls count

    def work(self, request: TextToImageRequest, model_id: str) -> float:
        return work_of(request, self.default_steps.get(model_id, 1))

    def loaded(self, model_id: str, seconds: float) -> None:
        self._load_s[model_id] = seconds
        self._warm.discard(model_id)

    def record(self, model_id: str, work: float, seconds: float) -> None:
        """A call of ``work`` megapixel-steps took ``seconds``."""
        if model_id not in self._warm:
            self._warm.add(model_id)  # the first call after a load: warm-up, not speed
            return
        if work <= 0:
            return
        measured = seconds / work
        known = self._speed.get(model_id)
        self._speed[model_id] = measured if known is None else (1 - SMOOTHING) * known + SMOOTHING * measured

    def speed(self, model_id: str) -> float | None:
        return self._speed.get(model_id)

    def load_s(self, model_id: str) -> float | None:
        return self._load_s.get(model_id)

    def expected_s(self, model_id: str, work: float, fallback_s: float) -> float:
        """How long ``work`` should take here; ``fallback_s`` while the model's speed is unknown."""
        speed = self._speed.get(model_id)
        return fallback_s if speed is None else work * speed
