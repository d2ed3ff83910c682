"""visguard-vllm: the ``vllm`` guard backend (an in-process ``vllm.LLM`` engine).

This module is the plugin's entry point (group ``visguard``, name ``vllm``). It imports nothing
heavy: vLLM loads only when a backend is created, so the plugin installs and lists without vLLM
(``pip install visguard-vllm[vllm]`` on GPUs, ``[cpu]`` for the CPU wheel) and says what is missing
when used without it.

Usage::

    from visguard import Guard
    guard = Guard.from_pretrained("Tuwhy/Qwen2-VL-7B-MIRage", backend="vllm", tensor_parallel_size=2)
"""

from __future__ import annotations

from typing import Any

from visguard import hookimpl

__all__ = ["create_backend"]


def create_backend(model: str, **kwargs: Any) -> Any:
    """Factory registered as ``vllm``: see :class:`visguard_vllm.backend.VLLMBackend` for the arguments."""
    from visguard_vllm.backend import VLLMBackend

    return VLLMBackend(model, **kwargs)


@hookimpl
def register_backends(register):
    register("vllm", create_backend)
