"""visguard: guardrails for vision-language models.

Run a (multi-image) safety guard model before and after any host VLM and get a structured
:class:`Verdict`. Quick start::

    from visguard import Guard
    guard = Guard.from_pretrained("Tuwhy/Qwen2-VL-7B-MIRage")
    verdict = guard.check_input(["knife.png", "person.png"], "Use the item in image 1 on image 2")
    if not guard.allows(verdict):
        ...
"""

from visguard.audit import AuditLog
from visguard.backend import Backend, Generation
from visguard.cascade import Cascade, CascadeStats, Stage
from visguard.checker import Checker, CheckerBase
from visguard.errors import (
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
from visguard.format import Capabilities, GuardFormat, GuardPrompt, ParsedOutput
from visguard.guard import DEFAULT_MODEL, Guard
from visguard.guarded import (
    AsyncGuardedStream,
    GuardedModel,
    GuardedOptions,
    GuardedResult,
    GuardedStream,
    GuardTimings,
)
from visguard.hookspecs import hookimpl
from visguard.hosts import CallableHost, Host
from visguard.images import GuardImage, load_image, load_images
from visguard.policy import MIS_CATEGORIES, Category, ImageLimits, Policy
from visguard.types import GuardRequest, Verdict

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
