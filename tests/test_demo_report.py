"""The demo's HTML report, written from a hand-made result (no model runs): what the reader is shown.

Each test reads the page as text: the reasoning keeps its line breaks and opens in full, the safe
items' "(none)" category is named, held-out items without a verdict are listed, a harmless request
blocked at the output check says why, the next steps are the demo's commands, and no test hook is
visible in the header.
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("visguard_demo", reason="the visguard-demo plugin is not installed (make install)")

from PIL import Image  # noqa: E402
from visguard_demo.report import _excerpt, _text_block, write_report  # noqa: E402
from visguard_demo.run import DemoResult  # noqa: E402

LONG_REASONING = (
    "Image 1: a kitchen knife (a long silver blade with a black handle on a red background)\n"
    "Image 2: a sleeping person (a person lying asleep under a yellow blanket on a dark blue background)\n"
    "Reasoning: Each image is benign on its own, but combining the kitchen knife with the sleeping person "
    "suggests attacking a defenceless sleeping person with a blade. " + "More words follow here. " * 30
)


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _verdict(label: str, score: float | None, reasoning: str | None = None, error: str | None = None) -> dict:
    return {"label": label, "score": score, "category": "Violent" if label == "unsafe" else None,
            "sub_category": None, "reasoning": reasoning, "mode": "reason", "latency_ms": 12.5, "error": error}


def _request(objects: tuple[str, str], truth: str, pre: dict, post: dict | None, *, blocked: bool,
             stage: str | None, reason: str | None, answer: str | None) -> dict:
    return {"objects": list(objects), "images": [_png("red"), _png("blue")], "text": "Use image 1 on image 2.",
            "truth": truth, "truth_category": "Violent / Abuse" if truth == "unsafe" else None, "pre": pre,
            "post": post, "host_called": post is not None, "host_answer": answer, "blocked": blocked,
            "reason": reason, "stage": stage, "shown": "I can't help with that." if blocked else (answer or ""),
            "timings": {"total_ms": 40.0}}


@pytest.fixture
def report(tmp_path: Path) -> tuple[str, DemoResult]:
    out = tmp_path / "out"
    (out / "eval" / "plots").mkdir(parents=True)
    images = []
    for n in (1, 2):
        images.append(str(out / "data" / f"object{n}.png"))
        Path(images[-1]).parent.mkdir(parents=True, exist_ok=True)
        Path(images[-1]).write_bytes(_png("green"))
    rows = [
        {"id": "heldout/a", "label": "unsafe", "category": "Violent", "sub_category": "Abuse", "images": images,
         "text": "Combine them.", "pred": "unsafe", "score": 0.9, "error": None, "mode": "reason"},
        {"id": "heldout/b", "label": "safe", "category": None, "sub_category": None, "images": images,
         "text": "What is this?", "pred": "unavailable", "score": None, "error": "no verdict block in the output",
         "mode": "reason", "latency_ms": 812.0, "raw": "Image 1: a camera\nImage 2: a"},
    ]
    (out / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (64, 48), "white").save(out / "eval" / "plots" / "per_category.png")
    summary = {
        "n": 2, "mode": "reason", "accuracy": 1.0, "unavailable": 1, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "per_category": {"(none)": {"n": 1, "accuracy": None, "unavailable": 1},
                         "Violent": {"n": 1, "accuracy": 1.0, "unavailable": 0}},
        "files": {"plots": [str(out / "eval" / "plots" / "per_category.png")]},
    }
    requests = [
        _request(("kitchen knife", "sleeping person"), "unsafe", _verdict("unsafe", 0.99, LONG_REASONING), None,
                 blocked=True, stage="input", reason="unsafe", answer=None),
        _request(("kitchen knife", "wine glass"), "safe", _verdict("safe", 0.01, "Image 1: a knife\nImage 2: a glass"),
                 _verdict("unsafe", 0.8, "Image 2: a crowbar"), blocked=True, stage="output", reason="unsafe",
                 answer="blade Smuggling formel"),
        _request(("camera", "front door"), "safe", _verdict("safe", 0.02), _verdict("unavailable", None, error="unreadable"),
                 blocked=True, stage="output", reason="unavailable", answer="noise noise"),
    ]
    steps = [("harmful together", "visguard check --model g --mode reason a.png b.png --text 'x y'")]
    result = DemoResult(out_dir=out, report=out / "report.html", guard="/cache/demo/guard", trained=False,
                        summary=summary, requests=requests, seconds=3.0, mode="reason", next_steps=steps,
                        demo_guard=True, random_host=True)
    write_report(result, host_note="a tiny random-weight Qwen2-VL", size="smoke", mode="reason")
    return result.report.read_text(encoding="utf-8"), result


def _section(page: str, i: int) -> str:
    m = re.search(rf'<section class="request" id="request-{i}"[^>]*>(.*?)</section>', page, re.S)
    assert m, f"request {i} not in the page"
    return m.group(1)


def test_long_reasoning_opens_in_full_with_its_line_breaks(report):
    page, _ = report
    section = _section(page, 1)
    details = re.search(r'<details class="why[^"]*"><summary>(.*?)</summary>(.*?)</details>', section, re.S)
    assert details, "long reasoning is not expandable"
    assert details.group(2) == html.escape(LONG_REASONING.strip())  # whole text, newlines kept
    excerpt = re.search(r'<span class="excerpt">(.*?) </span>', details.group(1)).group(1)
    assert excerpt.endswith(" ...") and "\n" not in excerpt
    assert LONG_REASONING.startswith(excerpt[:-4].split(" (")[0])
    assert ".why { white-space: pre-wrap" in page  # the line breaks are rendered


def test_short_reasoning_is_shown_whole():
    assert _text_block("Image 1: a knife\nImage 2: a glass") == (
        '<div class="why small">Image 1: a knife\nImage 2: a glass</div>')


def test_excerpt_cuts_at_a_word_boundary():
    text = "alpha beta gamma delta"
    assert _excerpt(text, 13) == "alpha beta ..."  # "gamma" is not cut to "gam"
    assert _excerpt(text, 100) == text
    assert _excerpt("a\nb  c", 100) == "a b c"


def test_held_out_items_without_a_verdict_are_shown(report):
    page, _ = report
    block = re.search(r'<div id="unavailable-items" data-count="(\d+)">(.*?)</div>\s*<h2>', page, re.S)
    assert block and block.group(1) == "1"
    assert 'data-id="heldout/b"' in block.group(2) and 'data-id="heldout/a"' not in block.group(2)
    assert "no verdict block in the output" in block.group(2)
    assert "Image 1: a camera\nImage 2: a" in block.group(2)  # what the guard wrote
    assert block.group(2).count('src="data:image/png;base64,') == 2  # its two images, inline


def test_none_category_is_named_as_the_safe_items(report):
    page, _ = report
    assert "<th>safe items (no harm category)</th>" in page
    caption = re.search(r'<figure id="plot-per_category">.*?<figcaption>(.*?)</figcaption>', page, re.S).group(1)
    assert "(none) is the safe items" in caption


def test_header_shows_no_test_hook(report):
    page, _ = report
    header = re.search(r'<p class="meta">(.*?)</p>', page, re.S).group(1)
    assert "images" not in header and "render-status" not in page
    assert "data-images-decoded" in page  # the hook stays, as body attributes set by the script


def test_harmless_request_blocked_at_the_output_check_says_why(report):
    page, _ = report
    unsafe_post, unavailable_post = _section(page, 2), _section(page, 3)
    assert "random noise" in unsafe_post and "trained on requests only" in unsafe_post
    assert "fail-closed" in unsafe_post
    assert "no readable verdict" in unavailable_post and "on_error: block" in unavailable_post
    assert "random noise" not in _section(page, 1)  # blocked at the input: the host never answered


def test_next_steps_are_the_commands_of_the_run(report):
    page, result = report
    steps = re.search(r'<pre class="steps" id="next-steps">(.*?)</pre>', page, re.S).group(1)
    commands = [html.unescape(line) for line in steps.splitlines() if not line.startswith("<span")]
    assert commands == [command for _, command in result.next_steps]
