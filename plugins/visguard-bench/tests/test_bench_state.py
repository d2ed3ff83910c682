"""The bench changes no process-wide state it does not restore, reads backends only through their public
diagnostics, and the core does not know it exists."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from visguard_bench.latency import LatencyBench, torch_threads

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = ROOT / "plugins" / "visguard-bench"
MEASUREMENTS = ("measure_fast", "measure_post", "measure_adaptive", "measure_batch", "measure_guarded",
                "measure_memory", "measure_scaling")


def _other_count() -> int:
    return 1 if torch.get_num_threads() != 1 else 2


def test_torch_threads_sets_then_restores_the_count():
    before, other = torch.get_num_threads(), _other_count()
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with torch_threads(None):  # no count asked: the block runs with the caller's, and a change inside is undone
        assert torch.get_num_threads() == before
        torch.set_num_threads(other)
    assert torch.get_num_threads() == before


def test_torch_threads_restores_the_count_when_the_block_raises():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="measurement failed"), torch_threads(_other_count()):
        raise RuntimeError("measurement failed")
    assert torch.get_num_threads() == before


def test_latency_bench_leaves_the_thread_count_as_it_found_it(monkeypatch):
    before, other = torch.get_num_threads(), _other_count()
    bench = LatencyBench("tiny", threads=other)
    assert torch.get_num_threads() == before  # building the bench sets nothing
    seen: list[int] = []
    for name in MEASUREMENTS:  # the measurements themselves are the smoke test's (test_bench_command.py)
        monkeypatch.setattr(bench, name, lambda: seen.append(torch.get_num_threads()))
    report = bench.run()
    assert seen == [other] * len(MEASUREMENTS) and report["machine"]["torch_threads"] == other
    assert torch.get_num_threads() == before

    def fails() -> None:
        seen.append(torch.get_num_threads())
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "measure_post", fails)
    with pytest.raises(RuntimeError, match="measurement failed"):
        bench.run()
    assert seen[-1] == other and torch.get_num_threads() == before


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_bench_reads_backends_only_through_public_diagnostics():
    private = ("_static_entry", "_dynamic_cache", "_cache_kwarg", "_position_ids", "cache_stats", "kv_cache")
    for path in _python_files(PLUGIN):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} reads backend internals (.{node.attr})")
            # `backend.model(**backend.encode(...))`: a forward of its own instead of the backend's forward_floor
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("model", "encode"):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} runs the model itself (.{node.func.attr}(...))")


def test_no_core_module_imports_the_bench_or_the_fixtures():
    offenders = []
    for path in _python_files(ROOT / "src" / "visguard"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("visguard_bench", "visguard_testing") or "bench_command" in n]
    assert not offenders
    assert not (ROOT / "src" / "visguard" / "default_plugins" / "bench_command.py").exists()


def test_visguard_help_lists_bench_only_with_the_plugin():
    def commands(load: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "VISGUARD_LOAD_PLUGINS"}
        if load is not None:
            env["VISGUARD_LOAD_PLUGINS"] = load
        code = "from visguard.cli import main; main(['--help'])"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split("Commands:", 1)[1]

    def listed(text: str) -> set[str]:
        return {line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()}

    assert "bench" not in listed(commands(""))  # built-in plugins only: the core has no bench
    others = "visguard-testing,visguard-train,visguard-demo,visguard-nsfw"
    assert "bench" not in listed(commands(others))  # every other distribution of this repository
    assert "bench" in listed(commands(f"{others},visguard-bench"))  # this distribution adds it
