"""The demo's HTML report: one self-contained file (images and plots inline as data URLs, no network).

A small script marks ``<body>`` with ``data-images-total`` / ``data-images-decoded`` once the page
has loaded, so a headless browser test can tell that every picture was actually decoded (attributes
only: nothing of it is shown to the reader).
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visguard_demo.run import REAL_CHECKPOINT_LINE, DemoResult

#: The per-category group of items without a harm category (``visguard.eval.metrics.NONE_GROUP``).
NONE_GROUP = "(none)"

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #1b1b1f; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } .meta { color: #555; margin-top: 0; }
.notice { background: #fff7e0; border: 1px solid #e6c35c; border-radius: 8px; padding: .8rem 1rem; }
code, pre { background: #f2f2f5; border-radius: 4px; padding: .1rem .3rem; font-size: 13px; }
pre { padding: .6rem; white-space: pre-wrap; overflow-wrap: anywhere; }
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
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plots figure { margin: 0; flex: 1 1 28rem; max-width: 34rem; }
.plots img { width: 100%; border: 1px solid #eee; }
.plots figcaption { font-size: 14px; }
.metrics td, .metrics th { padding: .2rem .7rem; text-align: left; white-space: nowrap; }
.tables { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; }
.small { font-size: 13px; color: #555; }
.why { white-space: pre-wrap; overflow-wrap: anywhere; }
details.why summary { cursor: pointer; white-space: normal; }
details.why summary .more { color: #1a56a8; }
details.why[open] summary .excerpt { display: none; }
details.why:not([open]) summary .less { display: none; }
.note { background: #eef3fb; border-left: 4px solid #5b8bd0; padding: .4rem .8rem; margin: .5rem 0; }
.unavailable-item { border: 1px solid #ddd; border-radius: 8px; padding: .8rem 1rem; margin: .8rem 0; display: grid;
                    grid-template-columns: 15rem 1fr; gap: 1rem; }
pre.steps .comment { color: #5f6b7a; }
table.attribution { border-collapse: collapse; font-size: 12px; margin-top: .5rem; width: 14.5rem; }
table.attribution td { padding: .1rem .25rem; white-space: nowrap; }
table.attribution .bar { width: 5rem; background: #f0f0f3; }
table.attribution .bar span { display: block; height: .7rem; background: #7a8fb0; }
table.attribution tr.unsafe .bar span { background: #c62828; }
table.attribution caption { text-align: left; font-size: 12px; color: #333; caption-side: top; }
@media (max-width: 52rem) {
  .request, .unavailable-item { grid-template-columns: 1fr; }
  table.verdicts td, table.verdicts th { display: inline-block; border-bottom: 0; padding: .15rem .4rem; }
  table.verdicts tr { display: block; border-bottom: 1px solid #eee; }
  table.verdicts td:empty { display: none; }
}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
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
    """``text`` on one line, cut at a word boundary to at most ``limit`` characters (``...`` when cut)."""
    flat = " ".join((text or "").split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit + 1].rsplit(" ", 1)[0] if " " in flat[:limit + 1] else flat[:limit]
    return cut.rstrip(" ,;:") + " ..."


def _text_block(text: str, *, limit: int = 480, cls: str = "why small") -> str:
    """``text`` with its line breaks kept; longer than ``limit`` characters: a one-line excerpt that
    opens (``<details>``) on the whole text."""
    text = text.strip()
    if len(text) <= limit:
        return f'<div class="{cls}">{_e(text)}</div>'
    return (f'<details class="{cls}"><summary><span class="excerpt">{_e(_excerpt(text, limit))} </span>'
            f'<span class="more">show all ({len(text)} characters)</span><span class="less">hide</span></summary>'
            f"{_e(text)}</details>")


def _verdict_rows(name: str, v: dict[str, Any] | None, stage: str) -> str:
    if v is None:
        return f'<tr><th>{_e(name)}</th><td colspan="4" class="small">did not run</td></tr>'
    category = " / ".join(x for x in (v.get("category"), v.get("sub_category")) if x) or "-"
    if v.get("error"):
        why = _text_block(f"no verdict: {v['error']}")
    elif v.get("reasoning"):
        why = _text_block(v["reasoning"])
    else:
        why = f'<div class="why small">({_e(v.get("mode"))} mode: no reasoning)</div>'
    return (
        f'<tr class="verdict" data-stage="{_e(stage)}" data-label="{_e(v["label"])}">'
        f'<th>{_e(name)}</th>'
        f'<td><span class="label label-{_e(v["label"])}">{_e(v["label"])}</span></td>'
        f'<td>P(unsafe) {_fmt(v.get("score"))}</td><td>{_e(category)}</td>'
        f'<td>{_fmt(v.get("latency_ms"), 1)} ms ({_e(v.get("mode"))})</td></tr>'
        f'<tr><td></td><td colspan="4">{why}</td></tr>'
    )


def _request_note(r: dict[str, Any], *, demo_guard: bool, random_host: bool) -> str:
    """A sentence that explains what the reader sees when it is not self-evident (empty otherwise)."""
    notes = []
    pre, post = r.get("pre") or {}, r.get("post") or {}
    if pre.get("label") in ("safe", "unsafe") and pre["label"] != r["truth"]:
        notes.append(f"The pre-check got this pair wrong: the synthetic rule says {r['truth']}, the guard said "
                     f"{pre['label']}.")
    if r["blocked"] and r["stage"] == "output":
        noise = ("The host's answer is random noise" if random_host else "The host answered")
        if r["reason"] == "unavailable":
            notes.append(f"{noise}, and the post-check gave no readable verdict on it ({post.get('error') or 'no verdict'}). "
                         "An unavailable check blocks by default (the policy's on_error: block): the guard fails "
                         "closed rather than pass an answer it could not judge.")
        else:
            notes.append(f"{noise}, and the post-check judged that answer unsafe, so it was withheld although the "
                         "request itself passed. " + (
                             "The demo guard was trained on requests only, never on answers, so its verdict and "
                             "reasoning about noise carry no meaning; withholding an answer the guard does not "
                             "clear is the post-check's fail-closed behaviour." if demo_guard else ""))
    elif r["host_called"] and post and random_host and demo_guard:
        notes.append("The post-check judged the host's noise: the demo guard never saw answers in training, so "
                     "its reasoning about them may describe things that are not in the answer.")
    return f'<p class="note small">{_e(" ".join(notes))}</p>' if notes else ""


def _attribution_html(a: dict[str, Any] | None) -> str:
    """Bars of the guard's fast P(unsafe) per subset of the request (image 1 / 2, the text), the summary above."""
    if not a:
        return ""
    bars = []
    for row in a["rows"]:
        name = " + ".join([f"img {k + 1}" for k in row["subset"]] + (["text"] if row["includes_text"] else []))
        unsafe = row["score"] >= a["threshold"]
        bars.append(f'<tr class="{"unsafe" if unsafe else "safe"}"><td>{_e(name)}</td>'
                    f'<td class="bar"><span style="width:{100 * row["score"]:.0f}%"></span></td>'
                    f'<td>{row["score"]:.2f}</td></tr>')
    return (f'<table class="attribution" data-summary="{_e(a["summary"])}"><caption><b>What carries it:</b> '
            f'{_e(a["summary"])} (fast P(unsafe) per subset, red: at or above {a["threshold"]:g})</caption>'
            f'{"".join(bars)}</table>')


def _request_html(i: int, r: dict[str, Any], *, demo_guard: bool = True, random_host: bool = True) -> str:
    figures = "".join(
        f'<figure><img class="thumb" alt="image {n}: {_e(obj)}" src="{_data_url(png)}">'
        f'<figcaption>image {n}: {_e(obj)}</figcaption></figure>'
        for n, (obj, png) in enumerate(zip(r["objects"], r["images"], strict=True), start=1)
    )
    outcome = f"blocked at the {r['stage']} check ({r['reason']})" if r["blocked"] else "passed both checks"
    if not r["host_called"]:
        host = '<p class="small">The host was not called.'
    elif r["host_answer"] is None:
        host = "<p class=\"small\">The host's answer was withheld."
    else:
        host = (f'<div class="small">Host answer{" (random weights: noise)" if random_host else ""}:</div>'
                f'{_text_block(r["host_answer"], limit=200)}<p class="small">')
    truth = r["truth"] + (f" ({r['truth_category']})" if r.get("truth_category") else "")
    t = r.get("timings") or {}
    return f"""
<section class="request" id="request-{i}" data-blocked="{str(r['blocked']).lower()}" data-truth="{_e(r['truth'])}">
  <div class="thumbs">{figures}
    <div class="small">ground truth of the synthetic pair: {_e(truth)}</div>
    {_attribution_html(r.get("attribution"))}</div>
  <div>
    <p><b>Request {i}:</b> {_e(r['text'])}</p>
    <table class="verdicts">
      {_verdict_rows("pre-check", r["pre"], "input")}
      {_verdict_rows("post-check", r["post"], "output")}
    </table>
    {host} Total {_fmt(t.get("total_ms"), 0)} ms.</p>
    {_request_note(r, demo_guard=demo_guard, random_host=random_host)}
    <div class="shown {'blocked' if r['blocked'] else 'passed'}"><b>The user saw</b> ({_e(outcome)}):
{_e(r['shown'])}</div>
  </div>
</section>"""


def _category_name(name: str) -> str:
    return "safe items (no harm category)" if name == NONE_GROUP else name


def _categories_html(s: dict[str, Any]) -> str:
    groups = s.get("per_category") or {}
    if not groups:
        return ""
    rows = "".join(
        f"<tr><th>{_e(_category_name(name))}</th><td>{_fmt(g.get('n'))}</td><td>{_fmt(g.get('accuracy'))}</td>"
        f"<td>{_fmt(g.get('unavailable'))}</td></tr>"
        for name, g in groups.items()
    )
    return ('<table class="metrics categories"><tr><th>harm category (gold)</th><th>items</th><th>accuracy</th>'
            f"<th>unavailable</th></tr>{rows}</table>")


def _unavailable_html(result: DemoResult) -> str:
    """The held-out items without a verdict: images, text, truth, why (``eval/results.jsonl``)."""
    s = result.summary
    path = Path(result.out_dir, "eval", "results.jsonl")
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(row, dict) and row.get("pred") == "unavailable":
            rows.append(row)
    count = s.get("unavailable")
    if not rows:
        if count:
            return f'<p class="small">{_e(count)} held-out item(s) had no verdict; see <code>{_e(path)}</code>.</p>'
        return (f'<p id="unavailable-items" data-count="0">Every one of the {_e(s.get("n"))} held-out items got a verdict '
                "(none unavailable).</p>")
    shown = rows[:20]
    items = "".join(_unavailable_item(row) for row in shown)
    more = (f'<p class="small">{len(rows) - len(shown)} more in <code>{_e(path)}</code>.</p>'
            if len(rows) > len(shown) else "")
    return (f'<div id="unavailable-items" data-count="{len(rows)}"><p>{len(rows)} held-out item(s) got no verdict '
            "(<i>unavailable</i>: the guard's output could not be read as a verdict, or the check failed). They are "
            "counted apart, never as safe or unsafe, and a guarded request in this state is blocked (fail-closed):</p>"
            f"{items}{more}</div>")


def _thumbs(paths: Sequence[str]) -> str:
    out = []
    for n, p in enumerate(paths, start=1):
        try:
            data = Path(p).read_bytes()
        except OSError:
            out.append(f'<figure><figcaption>image {n}: {_e(Path(p).name)} (not readable)</figcaption></figure>')
            continue
        out.append(f'<figure><img class="thumb" alt="image {n}" src="{_data_url(data)}">'
                   f"<figcaption>image {n}</figcaption></figure>")
    return "".join(out)


def _unavailable_item(row: dict[str, Any]) -> str:
    gold = row.get("label") or "-"
    cat = " / ".join(x for x in (row.get("category"), row.get("sub_category")) if x)
    raw = row.get("raw")
    raw_text = raw if isinstance(raw, str) else (json.dumps(raw, indent=1) if raw else "")
    return f"""
<section class="unavailable-item" data-id="{_e(row.get('id'))}">
  <div class="thumbs">{_thumbs(row.get("images") or [])}
    <div class="small">gold: {_e(gold)}{_e(f' ({cat})' if cat else '')}</div></div>
  <div>
    <p><b>{_e(row.get('id'))}</b>: {_e(row.get('text'))}</p>
    <p><span class="label label-unavailable">unavailable</span> ({_e(row.get('mode'))} mode,
      {_fmt(row.get('latency_ms'), 1)} ms): {_e(row.get('error') or 'no verdict')}</p>
    {'<div class="small">The guard wrote:</div>' + _text_block(raw_text) if raw_text else ''}
  </div>
</section>"""


def _metrics_html(s: dict[str, Any]) -> str:
    keys = ("n", "accuracy", "precision", "recall", "f1", "fpr", "auroc", "auprc", "unavailable")
    cells = "".join(f"<tr><th>{k}</th><td>{_fmt(s.get(k))}</td></tr>" for k in keys if k in s)
    lat = s.get("latency_ms") or {}
    cells += f"<tr><th>latency p50 / p95 / p99</th><td>{_fmt(lat.get('p50'), 1)} / {_fmt(lat.get('p95'), 1)} / {_fmt(lat.get('p99'), 1)} ms</td></tr>"
    return f'<table class="metrics">{cells}</table>'


_PLOT_NOTES = {
    "per_category": f"{NONE_GROUP} is the safe items: they have no harm category, and their accuracy is the "
                    "share of them judged safe.",
}


def _plots_html(s: dict[str, Any]) -> str:
    out = []
    for path in (s.get("files") or {}).get("plots") or []:
        p = Path(path)
        if p.is_file():
            title = _PLOT_TITLES.get(p.stem, p.stem)
            note = _PLOT_NOTES.get(p.stem)
            out.append(f'<figure id="plot-{_e(p.stem)}"><img class="plot" alt="{_e(title)}" src="{_data_url(p.read_bytes())}">'
                       f"<figcaption>{_e(title)}{'. ' + _e(note) if note else ''}</figcaption></figure>")
    return "".join(out) or f'<p class="small">{_e(s.get("plots_note") or "no plots were written")}</p>'


def _guard_note(result: DemoResult, size: str) -> str:
    if not result.demo_guard:
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
    host = (" The host is a random-weight model too, so its answers are noise, and the post-checks of that noise "
            "show the mechanics only: a post-check that blocks noise, or that cannot be read and blocks it "
            "(fail-closed), is the guard at work, not a finding about the answer.") if result.random_host else ""
    return (
        f"<b>The demo guard is a small model trained on synthetic shapes.</b> It is a {size_text} Qwen2-VL "
        f"trained from random weights on CPU{took} ({_e(size)} size) on pairs of drawn objects that are each harmless, "
        "some of which are harmful together. It shows the mechanics (multi-image verdicts, scores, "
        "reasoning, pre- and post-checks, evaluation), not real-world safety. It was trained on requests "
        f"only, never on answers.{host}"
    )


def _steps_html(steps: Sequence[tuple[str, str]]) -> str:
    if not steps:
        return ""
    lines = "\n".join(f'<span class="comment"># {_e(comment)}</span>\n{_e(command)}' for comment, command in steps)
    return f"""
<h2>Next steps</h2>
<p>Run from the directory the demo ran in (bash); the demo printed the same commands.</p>
<pre class="steps" id="next-steps">{lines}</pre>"""


def write_report(result: DemoResult, *, host_note: str, size: str, mode: str = "reason") -> Path:
    """Write ``result.report`` (HTML) from a finished demo run; returns its path."""
    s = result.summary
    requests = "".join(_request_html(i, r, demo_guard=result.demo_guard, random_host=result.random_host)
                       for i, r in enumerate(result.requests, start=1))
    eval_md = Path(result.out_dir, "eval", "report.md")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>visguard demo report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>visguard demo report</h1>
<p class="meta">{_e(time.strftime('%Y-%m-%d %H:%M:%S'))} &middot; guard <code>{_e(result.guard)}</code> &middot;
host {_e(host_note)} &middot; {result.seconds:.0f} s</p>
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
<div class="tables">{_metrics_html(s)}{_categories_html(s)}</div>
<div class="plots">{_plots_html(s)}</div>

<h3>Held-out items without a verdict</h3>
{_unavailable_html(result)}
{_steps_html(result.next_steps)}
<script>{_SCRIPT}</script>
</body></html>
"""
    result.report.write_text(page, encoding="utf-8")
    return result.report
