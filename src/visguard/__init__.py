"""visguard: guardrails for vision-language models.

Run a (multi-image) safety guard model before and after any host VLM and get a structured
:class:`Verdict`. Quick start::

    from visguard import Guard
    guard = Guard.from_pretrained("Tuwhy/Qwen2-VL-7B-MIRage")
    verdict = guard.check_input(["knife.png", "person.png"], "Use the item in image 1 on image 2")
    if not guard.allows(verdict):
        ...
"""

from visguard.core.errors import (
    BackendError,
    GuardrailViolation,
    GuardUnavailableError,
    ImageInputError,
    InputError,
    InputTooLongError,
    PluginError,
    UnsupportedRequestError,
    VisguardError,
)
from visguard.core.images import GuardImage, ImageLimits, load_image, load_images
from visguard.core.policy import MIS_CATEGORIES, Category, Policy
from visguard.core.types import GuardRequest, Verdict
from visguard.engine.backend import Backend, Generation
from visguard.engine.cascade import Cascade, CascadeStats, Stage
from visguard.engine.checker import Checker, CheckerBase
from visguard.engine.format import Capabilities, GuardFormat, GuardPrompt, ParsedOutput
from visguard.engine.guard import DEFAULT_MODEL, Guard
from visguard.hookspecs import hookimpl
from visguard.hosting.audit import AuditLog
from visguard.hosting.guarded import (
    AsyncGuardedStream,
    GuardedModel,
    GuardedOptions,
    GuardedResult,
    GuardedStream,
    GuardTimings,
)
from visguard.hosting.hosts import CallableHost, Host

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "MIS_CATEGORIES",
    "AsyncGuardedStream",
    "AuditLog",
    "Backend",
    "BackendError",
    "CallableHost",
    "Capabilities",
    "Cascade",
    "CascadeStats",
    "Category",
    "Checker",
    "CheckerBase",
    "Generation",
    "Guard",
    "GuardFormat",
    "GuardImage",
    "GuardPrompt",
    "GuardRequest",
    "GuardTimings",
    "GuardUnavailableError",
    "GuardedModel",
    "GuardedOptions",
    "GuardedResult",
    "GuardedStream",
    "GuardrailViolation",
    "Host",
    "ImageInputError",
    "ImageLimits",
    "InputError",
    "InputTooLongError",
    "ParsedOutput",
    "PluginError",
    "Policy",
    "Stage",
    "UnsupportedRequestError",
    "Verdict",
    "VisguardError",
    "__version__",
    "hookimpl",
    "load_image",
    "load_images",
]
