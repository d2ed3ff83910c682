"""`visguard bench --size tiny --json`: a smoke run of every measurement (keys and sanity, never speed), and what
the tiny size's output says about its ratios."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from visguard_bench.latency import RATIO_KEYS, SIZES, summarize
from visguard_bench.report import format_markdown, format_report

from visguard.cli import _register_plugin_commands, cli


@pytest.mark.slow
def test_bench_tiny_json_has_every_ratio_and_describes_the_run():
    import torch

    _register_plugin_commands()
    threads = torch.get_num_threads()
    result = CliRunner().invoke(cli, ["bench", "--size", "tiny", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    # --threads holds for the run only: a later test in this process trains with the process's own count
    # (left at 1, it changed the isolated training test's float order and its accuracy, 0.91 -> 0.655).
    assert torch.get_num_threads() == threads
    report = json.loads(result.stdout)
    for key in RATIO_KEYS:  # at the top level, each a positive finite number
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert set(RATIO_KEYS) <= set(report["ratios"])
    assert report["size"] == "tiny" and report["notes"] == [SIZES["tiny"].note]
    assert "fixed" in report["notes"][0] and "nothing about caching" in report["notes"][0]
    # the table and the Markdown say it too, before the ratios a reader would misread
    table, markdown = format_report(report), format_markdown(report)
    note_at = table.index("NOTE: size tiny")
    assert note_at < table.index("ratios (fixed overheads at this size, not caching")
    assert "fixed" in table[note_at:note_at + 300]
    assert markdown.index("> **Note:** size tiny") < markdown.index("| ratio | value |")
    machine, model = report["machine"], report["model"]
    assert machine["cores"] >= 1 and machine["torch_threads"] == 1 and len(machine["load_average_before"]) == 3
    assert model["architecture"] == "qwen2_vl" and model["parameters"] > 0 and model["format"] == "visguard v2"
    tokens = report["prompt_tokens"]
    assert 0 < tokens["static_prefix"] < tokens["total"] and tokens["request"] == tokens["total"] - tokens["static_prefix"]
    for name, stats in report["timings"].items():
        assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"], name
        assert stats["throughput_per_s"] > 0
    adaptive = report["adaptive"]
    assert adaptive["confident"] >= 0.8 * adaptive["items"]  # the set the ratio is defined on
    assert report["host"]["new_tokens"] >= 16
    assert report["memory"]["images"] == 8 and report["memory"]["fast_check_peak_mb"] > 0
    scaling = report["scaling"]
    assert [r["images"] for r in scaling["images"]] == [1, 2]
    assert scaling["images"][1]["tokens"] > scaling["images"][0]["tokens"]
    assert [r["batch"] for r in scaling["batch"]] == [1, 2]


def test_bench_table_and_help():
    _register_plugin_commands()
    help_text = CliRunner().invoke(cli, ["bench", "--help"]).output
    assert "--size" in help_text and "--json" in help_text and "floor" in help_text
    assert "nothing about caching" in " ".join(help_text.split())


def test_summary_percentiles():
    s = summarize([float(x) for x in range(1, 101)], tokens=10)
    assert s["p50_ms"] == pytest.approx(50.5) and s["p95_ms"] == pytest.approx(95.05) and s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5) and s["throughput_per_s"] == pytest.approx(1000 / 50.5)
    assert summarize([3.0])["p99_ms"] == 3.0


def _report(size: str, notes: list[str]) -> dict:
    """A report of the shape LatencyBench.run returns, with made-up numbers (formatting only)."""
    stats = {"p50_ms": 2.0, "p95_ms": 3.0, "p99_ms": 3.5, "mean_ms": 2.2, "throughput_per_s": 450.0, "tokens": 10.0,
             "cpu_mean_ms": 1.9}
    return {
        "size": size, "notes": notes,
        "machine": {"cpu": "cpu", "usable_cores": 2, "torch": "2", "torch_threads": 1,
                    "load_average_before": (0.5, 0.5, 0.5), "load_average_after": (0.6, 0.5, 0.5)},
        "model": {"architecture": "qwen2_vl", "hidden_size": 64, "num_layers": 2, "vocab_size": 151000,
                  "parameters": 1e6, "image_px": 64, "format": "visguard v2"},
        "timings": {"fast check (guard.check_input)": stats},
        "ratios": {"fast_over_floor": 1.4, "post_reuse_over_cold": 1.1},
    }


def test_only_a_size_with_a_note_is_flagged():
    assert SIZES["tiny"].note and not SIZES["small"].note and not SIZES["default"].note
    plain = format_report(_report("default", []))
    assert "NOTE" not in plain and "\nratios:\n" in plain
    assert "Note" not in format_markdown(_report("default", []))
    flagged = format_report(_report("tiny", [SIZES["tiny"].note]))
    assert "NOTE: size tiny is a smoke run" in flagged and "\nratios:\n" not in flagged
    assert all(len(line) <= 100 for line in flagged.splitlines()[3:7])  # the note is wrapped
