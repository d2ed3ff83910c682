"""`visguard check / eval / serve` with the `mirage` format on a real tiny Qwen2-VL checkpoint."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image
from visguard_testing.synthetic import write_mis_test_layout

from visguard import Guard
from visguard import cli as cli_module
from visguard.cli import cli
from visguard.core.policy import Policy
from visguard.eval import read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def plugin_commands():
    cli_module._register_plugin_commands()


@pytest.fixture(scope="module")
def mis_root(tmp_path_factory):
    return write_mis_test_layout(tmp_path_factory.mktemp("syn"), {"hard": 4}, seed=3)


def test_check_with_the_mirage_format(qwen_path, mis_root):
    item = json.loads((mis_root / "mis_hard.json").read_text())[0]
    imgs = [str(mis_root / item["image_path1"]), str(mis_root / item["image_path2"])]
    for mode in ("reason", "fast"):
        result = CliRunner().invoke(cli, ["check", "--model", qwen_path, "--format", "mirage", "--mode", mode,
                                          "--max-new-tokens", "6", "--device", "cpu", "--text", item["question"],
                                          "--json", *imgs])
        verdict = json.loads(result.stdout)
        assert result.exit_code == {"safe": 0, "unsafe": 1}[verdict["label"]], result.output
        assert verdict["mode"] == mode and 0.0 <= verdict["score"] <= 1.0
        assert (verdict["raw"] != "") == (mode == "reason")  # reason: MIRage's own answer


def test_eval_with_the_mirage_format(qwen_path, mis_root, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["eval", "-B", "mis", "-d", str(mis_root), "-s", "hard", "-m", qwen_path,
                                      "--format", "mirage", "--mode", "reason", "--max-new-tokens", "4",
                                      "--device", "cpu", "--out", str(out), "--json", "--no-progress", "--no-plots"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = read_rows(out / "results.jsonl")
    assert summary["n"] == len(rows) == 4
    assert all(r["pred"] in ("safe", "unsafe") and 0.0 <= r["score"] <= 1.0 for r in rows)
    meta = json.loads((out / "summary.json").read_text())
    assert json.dumps(meta).count('"mirage"') >= 1  # the run records the format


def test_server_checks_with_the_mirage_format(qwen_path):
    from visguard.integrations.openai.server.app import ServeSettings, create_app
    from visguard.integrations.openai.server.upstream import ServerThread

    guard = Guard.from_pretrained(qwen_path, format="mirage", device="cpu", policy=Policy(mode="reason", max_new_tokens=4))
    a, b = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 72), (30, 60, 200))
    urls = []
    for img in (a, b):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    with ServerThread(create_app(guard, None, settings=ServeSettings(max_wait_ms=0))) as server:
        resp = httpx.post(server.url + "/v1/guard/check", json={"images": urls, "text": "use 1 on 2"}, timeout=120)
    assert resp.status_code == 200, resp.text
    verdict = resp.json()
    assert verdict["mode"] == "reason" and verdict["label"] in ("safe", "unsafe") and verdict["raw"]
    alone = guard.check(guard.request(urls, "use 1 on 2"))
    assert verdict["score"] == pytest.approx(alone.score, abs=1e-4) and verdict["raw"] == alone.raw
    guard.close()
