"""`visguard demo`: the whole offline demo runs, and its HTML report renders in headless Chromium.

The report test drives the real command (`python -m visguard.cli demo`, found through the
visguard-demo plugin's entry point) at its smallest size, opens the report in Debian's `chromium`,
and reads the *rendered* DOM: every image was decoded by the browser, and each request shows the
verdicts that the run recorded in requests.json. The same run's "next steps" commands are then run
exactly as printed, and its guard's saved processor is checked to bring the repository's example
images to the size the guard was trained at.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> SimpleNamespace:
    """The demo at its smallest size, in fast mode: its output directory, stdout and working directory."""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, "-m", "visguard.cli", "demo", "--size", "smoke", "--mode", "fast", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=900, env=env, check=False, cwd=Path.cwd(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Report:" in proc.stdout
    return SimpleNamespace(out=out, stdout=proc.stdout, cwd=Path.cwd(), env=env)


def printed_steps(stdout: str) -> list[str]:
    """The commands of the "Next steps" block the demo printed last (comment lines left out)."""
    head, sep, block = stdout.partition("Next steps (bash, from this directory):\n")
    assert sep, "the demo printed no next steps"
    lines = [line for line in block.splitlines() if line.strip()]
    assert all(line.startswith("  ") for line in lines), "the next steps are not the last thing printed"
    return [line.strip() for line in lines if not line.strip().startswith("#")]


@pytest.mark.slow
def test_demo_report_renders_images_and_verdicts_in_chromium(demo_run, tmp_path):
    recorded = json.loads((demo_run.out / "requests.json").read_text())
    summary = json.loads((demo_run.out / "eval" / "summary.json").read_text())
    assert len(recorded) >= 4 and summary["n"] > 0

    dom = rendered_dom(demo_run.out / "report.html", tmp_path / "profile")

    # The page's own script ran in the browser and found every image decoded (naturalWidth > 0).
    body = re.search(r'<body data-images-total="(\d+)" data-images-decoded="(\d+)"', dom)
    assert body, "the report's load script did not run"
    total, decoded = int(body.group(1)), int(body.group(2))
    n_plots = len(summary["files"]["plots"])
    assert n_plots >= 3  # confusion, per category / ROC, latency
    assert total == decoded == 2 * len(recorded) + n_plots
    assert "images decoded" not in dom  # the hook is attributes only, never shown to the reader

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
        for verdict in (row["pre"], row["post"]):
            if verdict and verdict["reasoning"]:  # reason mode: the whole reasoning, line breaks kept
                assert html.escape(verdict["reasoning"].strip(), quote=False) in section
        assert "The user saw" in section
        shown = row["shown"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert shown.strip()[:40] in section
    assert "trained on synthetic shapes" in dom
    assert "visguard demo --guard Tuwhy/Qwen2-VL-7B-MIRage" in dom  # the line for real checkpoints
    steps = re.search(r'<pre class="steps" id="next-steps">(.*?)</pre>', dom, re.S).group(1)
    assert [html.unescape(line) for line in steps.splitlines() if not line.startswith("<span")] == \
        printed_steps(demo_run.stdout)


@pytest.mark.slow
def test_demo_next_steps_run_as_printed(demo_run):
    steps = printed_steps(demo_run.stdout)
    checks = [c for c in steps if " check " in c]
    assert len(checks) == 2 and all("--mode fast" in c for c in checks)  # the mode the demo evaluated
    assert any("quickstart.py" in c for c in steps) and any(" eval " in c for c in steps)
    for command in steps:
        proc = subprocess.run(["bash", "-c", command], cwd=demo_run.cwd, env=demo_run.env, capture_output=True,
                              text=True, timeout=600, check=False)
        said = f"{command}\n-> {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        if " check " in command:  # exit 0 safe, 1 unsafe (2: error)
            label = re.search(r"^label\s+(safe|unsafe)$", proc.stdout, re.M)
            assert label and proc.returncode == (1 if label.group(1) == "unsafe" else 0), said
        elif "quickstart.py" in command:
            assert proc.returncode == 0 and proc.stdout.splitlines()[-1] in ("allowed", "blocked"), said
        else:
            out = Path(demo_run.cwd, shlex.split(command)[-1])
            assert proc.returncode == 0 and json.loads((out / "summary.json").read_text())["n"] == 12, said


@pytest.mark.slow
def test_demo_guard_processor_resizes_to_the_training_size(demo_run):
    """The examples' 112 px images reach the demo guard as the 56 px images it was trained on."""
    from PIL import Image
    from transformers import AutoProcessor
    from visguard_demo.run import EXAMPLE_IMAGES, MODEL

    check = next(c for c in printed_steps(demo_run.stdout) if " check " in c)
    argv = shlex.split(check)
    guard = argv[argv.index("--model") + 1]
    processor = AutoProcessor.from_pretrained(guard)
    patch = processor.image_processor.patch_size
    for name in EXAMPLE_IMAGES:
        image = Image.open(Path(demo_run.cwd, argv[argv.index("--mode") + 2]).parent / name).convert("RGB")
        assert image.size[0] > MODEL["image_size"]  # larger than the training images
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist()
        assert grid == [[1, MODEL["image_size"] // patch, MODEL["image_size"] // patch]]


@pytest.mark.slow
def test_demo_print_guard_path_names_the_trained_guard(demo_run):
    proc = subprocess.run([sys.executable, "-m", "visguard.cli", "demo", "--size", "smoke", "--print-guard-path"],
                          capture_output=True, text=True, timeout=300, env=demo_run.env, check=False)
    argv = shlex.split(next(c for c in printed_steps(demo_run.stdout) if " check " in c))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == argv[argv.index("--model") + 1] + "\n"  # the path alone: $(...) takes it as is


def test_demo_print_guard_path_before_training_is_one_line(tmp_path):
    env = {**os.environ, **OFFLINE, "VISGUARD_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "visguard.cli", "demo", "--size", "smoke", "--print-guard-path"],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "`visguard demo --size smoke` trains it" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


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


def test_demo_guard_trains_on_subset_items_and_its_cache_key_covers_them(tmp_path, monkeypatch):
    """The demo's training data adds each item's parts alone (issue 27: a guard that never saw a single
    image or the text alone cannot attribute), and the cached guard's key changes with that choice, so
    a guard trained on other data is never reused."""
    import visguard_demo.run as demo
    import visguard_testing.synthetic as syn

    monkeypatch.setenv("VISGUARD_CACHE", str(tmp_path))
    written: dict = {}

    class Stop(Exception):
        pass

    def fake_write_jsonl(root, n, **kwargs):
        written.update(kwargs, n=n)
        raise Stop

    monkeypatch.setattr(syn, "write_jsonl", fake_write_jsonl)
    with pytest.raises(Stop):
        demo.train_demo_guard("smoke", echo=lambda _: None)
    assert written["subsets"] is True and written["subsets_per_item"] == 1 and written["n"] == 16
    assert written["subsets_reasoning"] is False  # fast-mode examples only: attribution scores in fast mode
    key = demo.demo_guard_dir("smoke")
    monkeypatch.setattr(demo, "DATA", {**demo.DATA, "subsets": False})
    assert demo.demo_guard_dir("smoke") != key
    monkeypatch.undo()
    monkeypatch.setenv("VISGUARD_CACHE", str(tmp_path))
    assert demo.demo_guard_dir("smoke") == key
    monkeypatch.setattr(demo, "FINETUNE", {**demo.FINETUNE, "lr": 2e-3})  # the second phase is in the key too
    assert demo.demo_guard_dir("smoke") != key


def test_demo_guard_trains_in_two_phases(demo_run):
    """Phase 1 learns the pair rule on the two-image items alone, phase 2 continues from it on the
    items and their parts (plugins/visguard-demo run.py FINETUNE): the trained guard's own record
    names phase 1's guard as its base and counts the parts' examples."""
    from visguard_demo.run import FINETUNE

    argv = shlex.split(next(c for c in printed_steps(demo_run.stdout) if " check " in c))
    guard = Path(argv[argv.index("--model") + 1])
    pairs = guard.parent / "pairs-guard"
    first = json.loads((pairs / "visguard_train.json").read_text())
    second = json.loads((guard / "visguard_train.json").read_text())
    assert Path(second["config"]["base"]) == pairs and second["config"]["lr"] == FINETUNE["lr"]
    assert "/" not in "".join(json.loads(line)["id"] for line in Path(first["config"]["data"]).read_text().splitlines())
    assert second["records"] > first["records"]  # the parts alone came in phase 2
