"""`visguard eval --vs`: several guards on the same items, one comparison table and one plot."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from visguard_testing.synthetic import write_mis_test_layout

from visguard import cli as cli_module
from visguard.cli import cli
from visguard.eval.compare import comparison_rows, comparison_table

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def plugin_commands():
    cli_module._register_plugin_commands()


def test_eval_compares_guards_side_by_side(qwen_path, tmp_path):
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    data = write_mis_test_layout(tmp_path / "syn", {"hard": 6}, seed=3)
    text_guard = str(cached_guard_checkpoint("qwen3"))
    image_guard = str(cached_guard_checkpoint("gemma3"))
    out = tmp_path / "cmp"
    args = ["eval", "-B", "mis", "-d", str(data), "-s", "hard", "-m", qwen_path, "--device", "cpu",
            "--vs", f"{text_guard}@qwen3guard", "--vs", f"{image_guard}@shieldgemma2", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| guard | n | accuracy | f1 | fpr | auroc | p50 ms | unavailable |" in result.stdout.splitlines()
    assert (out / "comparison.png").stat().st_size > 0 and (out / "comparison.md").is_file()
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [6, 6, 6]
    # MIS items carry two images and text: the text guard and the single-image classifier cannot judge
    # them and say so (every item unavailable, "input refused"), the MIS guard judges them.
    assert rows[0]["unavailable"] < 6 and rows[1]["unavailable"] == 6 and rows[2]["unavailable"] == 6
    refused = [json.loads(x) for x in next(out.glob("*qwen3*")).joinpath("results.jsonl").read_text().splitlines()]
    assert all("input refused" in r["error"] and "text guard" in r["error"] for r in refused)

    # --ignore-unread: the text guard reads the text; the classifier still refuses two images.
    out2 = tmp_path / "cmp2"
    result = CliRunner().invoke(cli, [*args[:-3], "--out", str(out2), "--no-progress", "--ignore-unread", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["comparison"]
    assert rows[1]["unavailable"] < 6 and rows[2]["unavailable"] == 6


def test_comparison_table_marks_undefined_metrics():
    rows = comparison_rows({"a": {"n": 2, "accuracy": 0.5, "f1": None, "fpr": 0.0, "auroc": None,
                                  "latency_ms": {"p50": 12.5}, "unavailable": 0}})
    table = comparison_table(rows)
    assert "| a | 2 | 0.5000 | - | 0.0000 | - | 12.5000 | 0 |" in table
