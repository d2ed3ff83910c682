"""Every example in examples/ runs in CI, on the tiny local checkpoints instead of the real models.

Python examples run in process (``runpy``) with their documented environment variables pointing at
the tiny random-weight Qwen2-VL; the multi-GPU shell recipe is checked against `visguard train`'s
own options. A last test fails when an example is added without a test that runs it.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_example(name: str, monkeypatch, capsys, *args: str, **env: str) -> str:
    """Run examples/``name`` as ``python examples/name args...`` with ``env``; returns its stdout."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = EXAMPLES / name
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    capsys.readouterr()
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_quickstart(qwen_path, monkeypatch, capsys):
    out = run_example("quickstart.py", monkeypatch, capsys, VISGUARD_EXAMPLE_GUARD=qwen_path)
    pre = re.search(r"pre-check:  (safe|unsafe)  P\(unsafe\)=(\d\.\d{3})", out)
    assert pre, out
    assert re.search(r"post-check: (safe|unsafe)  P\(unsafe\)=\d\.\d{3}", out), out
    assert out.rstrip().endswith("allowed" if pre.group(1) == "safe" else "blocked")


def test_guarded_stream(qwen_path, monkeypatch, capsys):
    out = run_example("guarded_stream.py", monkeypatch, capsys,
                      VISGUARD_EXAMPLE_GUARD=qwen_path, VISGUARD_EXAMPLE_HOST=qwen_path)
    m = re.search(r"blocked=(True|False) reason=(\w+) stage=(\w+) post-checks=(\d+)", out)
    assert m, out
    pre = re.search(r"pre-check (safe|unsafe) P\(unsafe\)=\d\.\d{3}", out)
    assert pre, out
    if pre.group(1) == "unsafe":
        assert m.group(1) == "True" and m.group(3) == "input"
    else:  # the answer was streamed and checked at least once
        assert int(m.group(4)) >= 1


def test_openai_client_through_the_guarded_proxy(qwen_path, monkeypatch, capsys):
    from visguard import Guard, plugins
    from visguard.integrations.openai.server.app import ServeSettings, create_app
    from visguard.integrations.openai.server.upstream import ServerThread, create_upstream_app

    host = plugins.get("hosts", "transformers")(qwen_path, device="cpu", max_new_tokens=8)
    guard = Guard.from_pretrained(qwen_path, device="cpu")
    try:
        with ServerThread(create_upstream_app(host, model_name="tiny-host")) as upstream:
            app = create_app(guard, upstream.url + "/v1", settings=ServeSettings(), host_options={"model": "tiny-host"})
            with ServerThread(app) as proxy:
                out = run_example("openai_client.py", monkeypatch, capsys,
                                  VISGUARD_PROXY_URL=proxy.url + "/v1", VISGUARD_PROXY_MODEL="tiny-host")
    finally:
        guard.close()
        host.close()
    finish = re.search(r"finish_reason=(stop|length|content_filter): ", out)
    assert finish, out
    vg = re.search(r"visguard: blocked=(True|False) pre-check=(safe|unsafe) P\(unsafe\)=[\d.]+ post-check=(\w+)", out)
    assert vg, out
    assert (finish.group(1) == "content_filter") == (vg.group(1) == "True")
    assert "streamed: " in out


def test_evaluate_mis(qwen_path, monkeypatch, capsys, tmp_path):
    from visguard_testing.synthetic import write_mis_test_layout

    root = write_mis_test_layout(tmp_path / "mis", {"hard": 8})
    out = run_example("evaluate_mis.py", monkeypatch, capsys, str(root), "hard",
                      VISGUARD_EXAMPLE_GUARD=qwen_path, VISGUARD_EXAMPLE_OUT=str(tmp_path / "eval"))
    assert re.search(r"^8 items: accuracy \d\.\d{3}, F1 \d\.\d{3}, AUROC \d\.\d{3}, unavailable 0$", out, re.M), out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 8 and summary["benchmark"] == "mis"
    assert sorted(Path(p).name for p in summary["files"]["plots"]) >= ["confusion_matrix.png", "latency.png"]


@pytest.mark.slow
def test_train_guard_on_mis_layout(monkeypatch, capsys, tmp_path):
    out = run_example("train_guard.py", monkeypatch, capsys,
                      VISGUARD_EXAMPLE_OUT=str(tmp_path / "guard"), VISGUARD_EXAMPLE_ITEMS="16")
    assert re.search(r"trained [\d,]+ parameters on 16 examples", out), out
    assert re.search(r"^(safe|unsafe) P\(unsafe\)=\d\.\d{3}$", out, re.M), out
    assert (tmp_path / "mis_train" / "mis_train.json").is_file()  # the MIS training layout was used
    assert json.loads((tmp_path / "guard" / "visguard_train.json").read_text())["records"] == 16


def test_multi_gpu_recipe_uses_only_real_train_options():
    script = EXAMPLES / "train_multi_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    bad = subprocess.run(["bash", str(script), "nope"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr
    from visguard_train.cli import train

    known = {opt for p in train.params for opt in p.opts}
    lines = script.read_text().replace("\\\n", " ").splitlines()  # join continued lines
    launches = [shlex.split(line) for line in lines if line.strip().startswith(("torchrun ", "accelerate launch "))]
    assert {args[0] for args in launches} == {"torchrun", "accelerate"}
    for args in launches:
        train_args = args[args.index("visguard_train") + 1:]
        used = {a for a in train_args if a.startswith("--")}
        assert {"--data", "--base", "--output"} <= used <= known, used - known
    assert json.loads((EXAMPLES / "ds_zero3.json").read_text())["zero_optimization"]["stage"] == 3


def test_every_example_is_run_by_a_test():
    """An example nobody runs rots: each examples/*.py and *.sh must be named by a test file."""
    tests = [*ROOT.glob("tests/*.py"), *ROOT.glob("plugins/*/tests/*.py")]
    text = "\n".join(t.read_text() for t in tests)
    missing = [p.name for p in [*EXAMPLES.glob("*.py"), *EXAMPLES.glob("*.sh")] if p.name not in text]
    assert not missing, f"examples without a test: {missing}"
