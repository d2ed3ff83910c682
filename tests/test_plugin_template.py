"""examples/plugin-template: pip-installed like any third-party plugin, then used through the CLI.

pip builds a copy of the template and installs it into a temporary folder (``--target``: the shared
environment is never modified); the CLI runs in a subprocess with that folder on its path, so
visguard finds the plugin the only way it finds third-party plugins: its ``visguard`` entry point.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that sees the template installed from its own pyproject."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("build") / "plugin-template"  # setuptools builds in the source tree
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(target.glob("visguard_example_plugin-*.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    env.pop("VISGUARD_LOAD_PLUGINS", None)
    return env


def visguard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visguard.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, check=False)


def test_plugins_lists_the_installed_template(installed):
    proc = visguard(installed, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    info = {p["name"]: p for p in json.loads(proc.stdout)}
    example = info["example"]
    assert example["distribution"] == "visguard-example-plugin"
    assert example["hooks"] == ["register_benchmarks", "register_formats"]
    assert example["provides"]["formats"] == ["oneword"] and example["provides"]["benchmarks"] == ["csv"]
    # Not importable without the install: the plugin came from the entry point, not from the repository.
    assert visguard({**installed, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}, "plugins", "--json").stdout.count(
        '"example"') == 0


def test_eval_runs_the_template_benchmark_and_format(installed, qwen_path, tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = []
    for i, (color, label) in enumerate([((200, 30, 30), "unsafe"), ((30, 200, 30), "safe"),
                                        ((30, 30, 200), "safe"), ((200, 200, 30), "unsafe")]):
        for j in (1, 2):
            Image.new("RGB", (40 + 8 * j, 40), tuple(c // j for c in color)).save(root / "img" / f"{i}_{j}.png")
        rows.append({"image1": f"img/{i}_1.png", "image2": f"img/{i}_2.png", "text": f"What about item {i}?",
                     "label": label, "category": "Violent" if label == "unsafe" else ""})
    with (root / "test.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "out"
    proc = visguard(installed, "eval", "-B", "csv", "-d", str(root), "-s", "test", "-m", qwen_path,
                    "--format", "oneword", "--device", "cpu", "--out", str(out), "--no-plots", "--no-progress",
                    "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["n"] == 4 and summary["unavailable"] == 0
    assert summary["benchmark"] == "csv" and summary["format"] == "oneword"
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == [f"test/{i}" for i in range(4)]
    assert all(r["pred"] in ("safe", "unsafe") and 0.0 <= r["score"] <= 1.0 for r in results)


def test_template_format_reads_the_first_rating_it_generated(monkeypatch):
    monkeypatch.syspath_prepend(str(TEMPLATE / "src"))
    from visguard_example_plugin.format import OneWordFormat

    from visguard import Policy

    fmt, policy = OneWordFormat(), Policy()
    parsed = fmt.parse("The knife is near a sleeping person. Rating: unsafe\nUser said: Rating: safe", policy)
    assert parsed.label == "unsafe" and parsed.reasoning == "The knife is near a sleeping person."
    missing = fmt.parse("I am not sure.", policy)
    assert missing.label is None and "Rating" in missing.error
    # it needs no plan of its own: the default scores its one prompt, or generates and parses
    from visguard import GuardRequest

    request = GuardRequest.build(None, "how?")
    fast, reason = (fmt.plan(request, policy, mode=m) for m in ("fast", "reason"))
    assert fast.read == "score" and fast.prompts[0].assistant_prefix == "Rating:"
    assert reason.read == "generate" and reason.parse("ok. Rating: safe").label == "safe"
