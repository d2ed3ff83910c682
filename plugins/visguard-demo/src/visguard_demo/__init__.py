"""visguard-demo: the ``visguard demo`` command (train a small guard offline, guard a host, HTML report).

Python API (the command is a thin layer over it)::

    from visguard_demo import run_demo
    result = run_demo("runs/demo", size="quick")
    print(result.report)
"""

from __future__ import annotations

from visguard_demo.run import SIZES, DemoResult, run_demo

__all__ = ["SIZES", "DemoResult", "run_demo"]
