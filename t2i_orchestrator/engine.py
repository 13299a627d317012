"""The seam between the HTTP node and the model code: a small Protocol, without torch.

``DiffusersEngine`` (``diffusers_engine.py``) is the real implementation; tests may use fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from t2i_common.errors import InternalError
from t2i_common.schemas import TextToImageRequest

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    picture: Image  # encoded as PNG by the node's store, off the device thread: the device moves on meanwhile
    seed: int
    nsfw: bool


@dataclass(frozen=True, slots=True)
class Generation:
    """One request's work: its images are seeds ``seed``, ``seed + 1``, ..."""

    request: TextToImageRequest
    model_id: str
    seed: int


class GenerationCancelled(Exception):
    """The request's client went away; generation stopped at a denoising step."""


class OutOfMemory(InternalError):
    """The device ran out of memory; its cache was freed and the node keeps serving.

    507 (Insufficient Storage), not a 500: the request's size, not the node, is at fault, and a gateway
    tries another node (one with more memory may hold it) without counting this one as failing."""

    status = 507


class ModelUnavailable(InternalError):
    """A model's files (or the safety checker's) cannot be found or read; the message says how to get them."""


class InferenceEngine(Protocol):
    """Loads models and generates images.

    Threading contract: ``start``, ``load``, ``unload_all`` and ``generate`` block and are only ever
    called from the node's one device thread, one call at a time, so an implementation needs no locks.
    ``device``, ``loaded_models`` and ``check`` are called on the event loop and must be cheap.
    """

    device: str

    def loaded_models(self) -> tuple[str, ...]: ...

    def start(self) -> None:
        """Load what any request may need (the shared safety checker), once, before the warm models."""
        ...

    def check(self, request: TextToImageRequest, model_id: str) -> None:
        """Raise a ``BadRequest`` for what the model cannot do (a family's step count, a safety check
        without a checker), so that the request is refused before it waits or loads anything."""
        ...

    def load(self, model_id: str) -> bool:
        """Make ``model_id`` ready (a no-op when it is loaded); True if it was loaded by this call."""
        ...

    def generate(
        self,
        request: TextToImageRequest,
        model_id: str,
        seed: int,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        """Generate ``request.num_images_per_prompt`` pictures (PIL images), image i with seed ``seed + i``.

        ``on_step(i, n)`` is called (on the device thread) after each of the n denoising steps. Raises ``GenerationCancelled`` once ``should_stop()`` turns true, ``OutOfMemory`` when the
        device runs out of memory, and other ``APIError``s for problems the client can act on.
        """
        ...

    def batch_key(self, generation: Generation) -> Hashable | None:
        """What must be equal for generations to share one pipeline call (model, size, steps, guidance,
        LoRAs, negative prompt or not, safety check); None: never batched. Cheap: called on the event loop."""
        ...

    def generate_batch(
        self,
        generations: Sequence[Generation],
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[GeneratedImage]]:
        """``generate`` for generations with one ``batch_key``, in one pipeline call; each one's images,
        in order. ``should_stop`` stops the whole call (the caller asks it once every member has left)."""
        ...

    def unload_all(self) -> None: ...
