"""The demo's HTML report: one self-contained file (images and plots inline as data URLs, no network).

A small script marks ``<body>`` with ``data-images-total`` / ``data-images-decoded`` once the page
has loaded, so a headless browser test can tell that every picture was actually decoded.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from visguard_demo.run import REAL_CHECKPOINT_LINE, DemoResult

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #1b1b1f; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } .meta { color: #555; margin-top: 0; }
.notice { background: #fff7e0; border: 1px solid #e6c35c; border-radius: 8px; padding: .8rem 1rem; }
code, pre { background: #f2f2f5; border-radius: 4px; padding: .1rem .3rem; font-size: 13px; }
pre { padding: .6rem; overflow-x: auto; }
.request { border: 1px solid #ddd; border-radius: 8px; padding: 1rem; margin: 1rem 0; display: grid;
           grid-template-columns: 15rem 1fr; gap: 1rem; }
.thumbs img { width: 6.5rem; height: 6.5rem; image-rendering: pixelated; border: 1px solid #ccc; margin-right: .3rem; }
.thumbs figcaption { font-size: 12px; color: #555; }
.thumbs figure { display: inline-block; width: 6.9rem; vertical-align: top; margin: 0 .2rem .3rem 0; text-align: center; }
table.verdicts { border-collapse: collapse; width: 100%; font-size: 14px; }
table.verdicts th { white-space: nowrap; }
table.verdicts th, table.verdicts td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #eee; vertical-align: top; }
.label { font-weight: 600; padding: .05rem .4rem; border-radius: 4px; }
.label-safe { background: #dff5e1; color: #17612a; } .label-unsafe { background: #fbe0e0; color: #9b1c1c; }
.label-unavailable { background: #eee; color: #444; }
.shown { background: #f7f7fa; border-left: 4px solid #888; padding: .5rem .8rem; white-space: pre-wrap; }
.shown.blocked { border-left-color: #c62828; } .shown.passed { border-left-color: #2e7d32; }
.plots img { max-width: 32rem; width: 100%; border: 1px solid #eee; margin: .3rem; }
.plots figure { display: inline-block; margin: 0; }
.metrics td, .metrics th { padding: .2rem .7rem; text-align: left; }
.small { font-size: 13px; color: #555; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
  document.getElementById('render-status').textContent = ok + ' of ' + imgs.length + ' images decoded';
});
"""

_MODE_NOTE = {"reason": ": the guard describes each image and reasons across them",
              "fast": ": one forward pass, no reasoning text",
              "adaptive": ": fast first, reasoning only when the score is unsure"}

_PLOT_TITLES = {
    "scores_roc": "Score distribution and ROC",
    "confusion_matrix": "Confusion matrix (unavailable verdicts counted apart)",
    "per_category": "Accuracy per harm category",
    "latency": "Latency per check",
}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def _excerpt(text: str | None, limit: int = 320) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[:limit].rstrip() + " ..."


def _verdict_rows(name: str, v: dict[str, Any] | None, stage: str) -> str:
    if v is None:
        return f'<tr><th>{_e(name)}</th><td colspan="4" class="small">did not run</td></tr>'
    category = " / ".join(x for x in (v.get("category"), v.get("sub_category")) if x) or "-"
    why = v.get("error") or _excerpt(v.get("reasoning")) or "(fast mode: no reasoning)"
    return (
        f'<tr class="verdict" data-stage="{_e(stage)}" data-label="{_e(v["label"])}">'
        f'<th>{_e(name)}</th>'
        f'<td><span class="label label-{_e(v["label"])}">{_e(v["label"])}</span></td>'
        f'<td>P(unsafe) {_fmt(v.get("score"))}</td><td>{_e(category)}</td>'
        f'<td>{_fmt(v.get("latency_ms"), 1)} ms ({_e(v.get("mode"))})</td></tr>'
        f'<tr><td></td><td colspan="4" class="small">{_e(why)}</td></tr>'
    )


def _request_html(i: int, r: dict[str, Any]) -> str:
    figures = "".join(
        f'<figure><img class="thumb" alt="image {n}: {_e(obj)}" src="{_data_url(png)}">'
        f'<figcaption>image {n}: {_e(obj)}</figcaption></figure>'
        for n, (obj, png) in enumerate(zip(r["objects"], r["images"], strict=True), start=1)
    )
    outcome = f"blocked at the {r['stage']} check ({r['reason']})" if r["blocked"] else "passed both checks"
    host = ("the host was not called" if not r["host_called"] else
            f"host answer: {_excerpt(r['host_answer'], 200)}" if r["host_answer"] is not None else
            "the host's answer was withheld")
    truth = r["truth"] + (f" ({r['truth_category']})" if r.get("truth_category") else "")
    t = r.get("timings") or {}
    return f"""
<section class="request" id="request-{i}" data-blocked="{str(r['blocked']).lower()}">
  <div class="thumbs">{figures}
    <div class="small">ground truth of the synthetic pair: {_e(truth)}</div></div>
  <div>
    <p><b>Request {i}:</b> {_e(r['text'])}</p>
    <table class="verdicts">
      {_verdict_rows("pre-check", r["pre"], "input")}
      {_verdict_rows("post-check", r["post"], "output")}
    </table>
    <p class="small">{_e(host)}. Total {_fmt(t.get("total_ms"), 0)} ms.</p>
    <div class="shown {'blocked' if r['blocked'] else 'passed'}"><b>The user saw</b> ({_e(outcome)}):
{_e(r['shown'])}</div>
  </div>
</section>"""


def _metrics_html(s: dict[str, Any]) -> str:
    keys = ("n", "accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc", "unavailable")
    cells = "".join(f"<tr><th>{k}</th><td>{_fmt(s.get(k))}</td></tr>" for k in keys if k in s)
    lat = s.get("latency_ms") or {}
    cells += f"<tr><th>latency p50 / p95 / p99</th><td>{_fmt(lat.get('p50'), 1)} / {_fmt(lat.get('p95'), 1)} / {_fmt(lat.get('p99'), 1)} ms</td></tr>"
    return f'<table class="metrics">{cells}</table>'


def _plots_html(s: dict[str, Any]) -> str:
    out = []
    for path in (s.get("files") or {}).get("plots") or []:
        p = Path(path)
        if p.is_file():
            title = _PLOT_TITLES.get(p.stem, p.stem)
            out.append(f'<figure><img class="plot" alt="{_e(title)}" src="{_data_url(p.read_bytes())}">'
                       f"<figcaption>{_e(title)}</figcaption></figure>")
    return "".join(out) or f'<p class="small">{_e(s.get("plots_note") or "no plots were written")}</p>'


def _guard_note(result: DemoResult, size: str) -> str:
    if not result.trained and not Path(result.guard, "visguard_train.json").is_file():
        return f"The guard is <code>{_e(result.guard)}</code>."
    meta: dict[str, Any] = {}
    try:
        meta = json.loads(Path(result.guard, "visguard_train.json").read_text())
    except (OSError, ValueError):
        pass
    params = meta.get("num_parameters")
    size_text = f"{params:,}-parameter" if isinstance(params, int) else "sub-million-parameter"
    secs = meta.get("train_seconds")
    took = f" in {secs:.0f} s" if isinstance(secs, int | float) else ""
    return (
        f"<b>The demo guard is a small model trained on synthetic shapes.</b> It is a {size_text} Qwen2-VL "
        f"trained from random weights on CPU{took} ({_e(size)} size) on pairs of drawn objects that are each harmless, "
        "some of which are harmful together. It shows the mechanics (multi-image verdicts, scores, "
        "reasoning, pre- and post-checks, evaluation), not real-world safety. It was trained on requests "
        "only, so its post-checks of answers are shown for the mechanics. The host is a random-weight "
        "model too, so its answers are noise."
    )


def write_report(result: DemoResult, *, host_note: str, size: str, mode: str = "reason") -> Path:
    """Write ``result.report`` (HTML) from a finished demo run; returns its path."""
    s = result.summary
    requests = "".join(_request_html(i, r) for i, r in enumerate(result.requests, start=1))
    eval_md = Path(result.out_dir, "eval", "report.md")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>visguard demo report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>visguard demo report</h1>
<p class="meta">{_e(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; guard <code>{_e(result.guard)}</code> &middot;
host {_e(host_note)} &middot; {result.seconds:.0f} s &middot; <span id="render-status">images not checked yet</span></p>
<div class="notice"><p>{_guard_note(result, size)}</p>
<p>On a GPU machine, one line switches to real checkpoints (the MIS-tuned MIRage guard and a real host):</p>
<pre>{_e(REAL_CHECKPOINT_LINE)}</pre>
<p class="small">In Python: <code>Guard.from_pretrained("Tuwhy/Qwen2-VL-7B-MIRage", device="cuda")</code>.</p></div>

<h2>Guarded requests</h2>
<p>Each request went through <code>guard.wrap(host).generate(images, text)</code>: the pre-check judged the
images and the text ({_e(mode)} mode{_MODE_NOTE.get(mode, "")}), the host
answered only if the pre-check passed, and the post-check judged the answer. Every object appears in a
harmful and in a harmless pair: no single image decides the verdict.</p>
{requests}

<h2>Evaluation on held-out data</h2>
<p>{_e(s.get('n'))} held-out synthetic items in the MIS test layout, evaluated with <code>visguard eval</code>'s
runner in {_e(s.get('mode'))} mode{_MODE_NOTE.get(s.get('mode') or '', '')}. Full tables:
<code>{_e(eval_md)}</code>.</p>
{_metrics_html(s)}
<div class="plots">{_plots_html(s)}</div>

<h2>Next steps</h2>
<pre>visguard check --model {_e(result.guard)} IMAGE1 IMAGE2 --text "..."
visguard eval -B mis -d {_e(Path(result.out_dir, 'data'))} -s heldout -m {_e(result.guard)}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""
    result.report.write_text(page, encoding="utf-8")
    return result.report
