"""`visguard demo`: the whole offline demo runs, and its HTML report renders in headless Chromium.

The report test drives the real command (`python -m visguard.cli demo`, found through the
visguard-demo plugin's entry point) at its smallest size, opens the report in Debian's `chromium`,
and reads the *rendered* DOM: every image was decoded by the browser, and each request shows the
verdicts that the run recorded in requests.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("visguard_demo", reason="the visguard-demo plugin is not installed (make install)")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """Path of the Chromium binary, or skip with the way to install it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("headless Chromium not found: `make test` installs it (apt-get install -y chromium)")
    return path


def rendered_dom(report: Path, profile: Path) -> str:
    """The DOM of ``report`` after Chromium loaded it and ran its scripts."""
    proc = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         "--dump-dom", report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def request_sections(dom: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in
            re.finditer(r'<section class="request" id="request-(\d+)"[^>]*>(.*?)</section>', dom, re.S)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "visguard.cli", "demo", "--size", "smoke", "--mode", "fast", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Report:" in proc.stdout
    return out


@pytest.mark.slow
def test_demo_report_renders_images_and_verdicts_in_chromium(demo_run, tmp_path):
    recorded = json.loads((demo_run / "requests.json").read_text())
    summary = json.loads((demo_run / "eval" / "summary.json").read_text())
    assert len(recorded) >= 4 and summary["n"] > 0

    dom = rendered_dom(demo_run / "report.html", tmp_path / "profile")

    # The page's own script ran in the browser and found every image decoded (naturalWidth > 0).
    body = re.search(r'<body data-images-total="(\d+)" data-images-decoded="(\d+)"', dom)
    assert body, "the report's load script did not run"
    total, decoded = int(body.group(1)), int(body.group(2))
    n_plots = len(summary["files"]["plots"])
    assert n_plots >= 3  # confusion, per category / ROC, latency
    assert total == decoded == 2 * len(recorded) + n_plots
    assert f"{decoded} of {total} images decoded" in dom

    sections = request_sections(dom)
    assert sorted(sections) == list(range(1, len(recorded) + 1))
    for i, row in enumerate(recorded, start=1):
        section = sections[i]
        thumbs = re.findall(r'<img class="thumb" alt="image \d: ([^"]+)" src="data:image/png;base64,', section)
        assert thumbs == row["objects"]
        assert row["text"] in section
        pre = re.search(r'data-stage="input" data-label="(\w+)"', section)
        assert pre and pre.group(1) == row["pre"]["label"]
        assert f"P(unsafe) {row['pre']['score']:.3f}" in section
        post = re.search(r'data-stage="output" data-label="(\w+)"', section)
        if row["post"] is None:
            assert post is None and "did not run" in section
        else:
            assert post and post.group(1) == row["post"]["label"]
        assert "The user saw" in section
        shown = row["shown"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert shown.strip()[:40] in section
    assert "trained on synthetic shapes" in dom
    assert "visguard demo --guard Tuwhy/Qwen2-VL-7B-MIRage" in dom  # the line for real checkpoints


def test_demo_with_a_given_guard_skips_training(qwen_path, tmp_path):
    from visguard_demo import run_demo

    lines: list[str] = []
    result = run_demo(tmp_path / "out", size="smoke", guard_model=qwen_path, mode="fast", progress=False,
                      echo=lines.append)
    assert not result.trained and result.guard == qwen_path
    assert "no training" in lines[0] and not any("training items" in line for line in lines)
    assert result.report.is_file() and result.summary["n"] == 12
    assert all(r["pre"]["label"] in ("safe", "unsafe") and r["pre"]["score"] is not None for r in result.requests)
    for r in result.requests:  # sequential pre-check: the host answers only requests that passed it
        assert r["host_called"] == (r["pre"]["label"] == "safe") == (r["post"] is not None)


def test_demo_unknown_size_is_an_input_error(tmp_path):
    from visguard_demo import run_demo

    from visguard.core.errors import InputError

    with pytest.raises(InputError, match="unknown demo size 'huge'"):
        run_demo(tmp_path, size="huge")
