"""Cross-image attribution (issue 27): ``Policy(explain=True)`` / ``visguard check --explain``.

A scripted backend on the real ``visguard`` format scores each prompt by which images (told apart
by colour) and whether the user's text it carries, so the summary logic is tested on known scores;
the CLI test runs a tiny random-weight Qwen2-VL through the transformers backend.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

from visguard import AuditLog, Backend, Guard, Policy
from visguard.cli import cli
from visguard.core.errors import UnsupportedRequestError
from visguard.core.types import AttributionRow, GuardRequest, Verdict
from visguard.default_plugins.llama_guard_format import LlamaGuardFormat
from visguard.default_plugins.shieldgemma_format import ShieldGemmaFormat
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.attribution import subsets, summarize
from visguard.engine.cascade import Cascade
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.upstream import ServerThread

COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
_REQUEST = re.compile(r"<user_request>\n(.*)\n</user_request>", re.S)

Rule = Callable[[frozenset[int], bool], float]


class ScriptedBackend(Backend):
    """P(unsafe) = ``rule(images seen (by colour index), text present)``; records every score call."""

    name = "scripted"

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.model_id = "scripted-guard"
        self.calls: list[list[tuple[frozenset[int], bool]]] = []
        self._lock = threading.Lock()

    def score(self, prompts: Sequence[Any]) -> list[float]:
        seen = []
        for prompt in prompts:
            text = _REQUEST.search(prompt.messages[-1]["content"][-1]["text"])
            has_text = text is not None and text.group(1).strip() not in ("", "(no text)")
            ids = frozenset(COLOURS.index(img.convert("RGB").getpixel((0, 0))) for img in prompt.images)
            seen.append((ids, has_text))
        with self._lock:
            self.calls.append(seen)
        return [self.rule(ids, t) for ids, t in seen]

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int) -> list[Any]:
        raise NotImplementedError("fast mode only")


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (24, 24), COLOURS[i]) for i in range(n)]


def _guard(rule: Rule, **policy: Any) -> tuple[Guard, ScriptedBackend]:
    backend = ScriptedBackend(rule)
    return Guard(backend, VisguardFormat(), Policy(mode="fast", explain=True, **policy)), backend


def _check(guard: Guard, n: int, text: str = "use the first on the second") -> Verdict:
    request = GuardRequest.build(_images(n), text)
    (verdict,) = guard.report_batch([request])
    return verdict


# ------------------------------------------------------------------ enumeration
# The issue's subsets are subsets of the request's IMAGES, each asked with the request's text ("image 1
# alone 0.05, image 2 alone 0.08, together 0.97"), plus the text alone: all pairs for 2-3 images,
# leave-one-out beyond. Images without the text are not scored.
T = True


@pytest.mark.parametrize(("n", "with_text", "without_text"), [
    (0, [((), T)], []),
    (1, [((), T), ((0,), T)], [((0,), False)]),
    (2, [((), T), ((0,), T), ((1,), T), ((0, 1), T)], [((0,), False), ((1,), False), ((0, 1), False)]),
    (3, [((), T), ((0,), T), ((1,), T), ((2,), T), ((0, 1), T), ((0, 2), T), ((1, 2), T), ((0, 1, 2), T)], None),
    (4, [((), T), ((0,), T), ((1,), T), ((2,), T), ((3,), T),
         ((0, 1, 2), T), ((0, 1, 3), T), ((0, 2, 3), T), ((1, 2, 3), T), ((0, 1, 2, 3), T)], None),
    (5, None, None),
])
def test_subsets_are_image_subsets_with_the_text_and_the_text_alone(n, with_text, without_text):
    for has_text, expected in ((True, with_text), (False, without_text)):
        chosen = subsets(n, has_text)
        if expected is not None:
            assert chosen == expected
        assert len(chosen) == len(set(chosen))
        assert [len(s) for s, _ in chosen] == sorted(len(s) for s, _ in chosen)  # fewest images first
        if n == 0:
            continue
        assert chosen[-1] == (tuple(range(n)), has_text)  # the whole request last
        assert (((), True) in chosen) == has_text  # the text alone: only a request with text has it
        image_rows = [s for s in chosen if s[0]]
        assert all(t == has_text for _, t in image_rows)  # every image subset is asked with the request's text
        sizes = sorted(len(s) for s, _ in image_rows)
        singles = [s for s, _ in image_rows if len(s) == 1]
        assert singles == [(i,) for i in range(n)]  # each image
        if n == 1:
            assert sizes == [1]
        elif n <= 3:  # every pair, and the request
            assert [s for s, _ in image_rows if len(s) == 2] == [tuple(c) for c in itertools.combinations(range(n), 2)]
            assert sizes == [1] * n + [2] * (n * (n - 1) // 2) + ([3] if n == 3 else [])
        else:  # leave-one-out: the request without each image
            loo = sorted(s for s, _ in image_rows if len(s) == n - 1)
            assert loo == sorted(tuple(j for j in range(n) if j != i) for i in range(n))
            assert sizes == [1] * n + [n - 1] * n + [n]
    assert len(subsets(n, True)) == {0: 1, 1: 2, 2: 4, 3: 8, 4: 10, 5: 12}[n]


def test_images_are_never_scored_without_the_requests_text():
    # regression: the subsets once asked each image without the text ("image 1" next to "image 1 + text")
    guard, backend = _guard(lambda ids, text: 0.1)
    for n in (2, 3, 4):
        _check(guard, n)
    asked = [seen for call in backend.calls for seen in call]
    assert asked and all(text for _, text in asked)  # every prompt carried the request's text
    assert sum(1 for ids, _ in asked if not ids) == 3  # the text alone, once per request
    backend.calls.clear()
    (verdict,) = guard.report_batch([GuardRequest.build(_images(2), "")])  # no text: image subsets only
    assert backend.calls == [[(frozenset({0}), False), (frozenset({1}), False), (frozenset({0, 1}), False)]]
    assert [r.name for r in verdict.attribution.rows] == ["image 0", "image 1", "image 0 + image 1"]


# ------------------------------------------------------------------ one batched pass
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_an_explained_check_is_one_backend_score_call(n):
    guard, backend = _guard(lambda ids, text: 0.9 if len(ids) == n and text else 0.1)
    verdict = _check(guard, n)
    assert len(backend.calls) == 1  # the request and every subset, one batch
    assert len(backend.calls[0]) == len(subsets(n, True))
    assert verdict.label == "unsafe" and verdict.score == pytest.approx(0.9)
    rows = verdict.attribution.rows
    assert [(r.subset, r.includes_text) for r in rows] == subsets(n, True)
    # each row's score is the score of exactly the images and text it names
    for row, (ids, text) in zip(rows, backend.calls[0], strict=True):
        assert ids == frozenset(row.subset) and text == row.includes_text


def test_without_explain_there_is_one_prompt_and_no_attribution():
    backend = ScriptedBackend(lambda ids, text: 0.9)
    guard = Guard(backend, VisguardFormat(), Policy(mode="fast"))
    verdict = _check(guard, 2)
    assert backend.calls == [[(frozenset({0, 1}), True)]]
    assert verdict.attribution is None and "attribution" not in verdict.model_dump()


# ------------------------------------------------------------------ summaries
def test_harm_only_in_the_combination():
    guard, _ = _guard(lambda ids, text: 0.95 if ids == {0, 1} and text else 0.05)
    found = _check(guard, 2).attribution
    assert found.summary == "combination only" and found.images == (0, 1)
    assert found.detail == ("only the combination is unsafe: image 0 + image 1 with the request's text (0.95); "
                            "no single image with the request's text and not the text alone")


def test_a_single_image_is_named_with_the_requests_text():
    # image 1 with the question is unsafe, the question alone and image 0 with it are not: "single image",
    # even though image 1 without the question (no longer asked) would score low
    guard, backend = _guard(lambda ids, text: 0.9 if 1 in ids and text else 0.1)
    found = _check(guard, 2).attribution
    assert found.summary == "single image" and found.images == (1,)
    assert found.detail == "image 1 with the request's text is unsafe (0.90)"
    one = summarize([AttributionRow(subset=(), includes_text=True, score=0.2),
                     AttributionRow(subset=(0,), includes_text=True, score=0.8)], 0.5)
    assert one.summary == "single image" and one.detail == "image 0 with the request's text is unsafe (0.80) (the whole request)"


def test_one_image_alone_carries_it():
    guard, _ = _guard(lambda ids, text: 0.9 if 1 in ids else 0.1)
    verdict = _check(guard, 3)
    assert verdict.label == "unsafe"
    assert verdict.attribution.summary == "single image" and verdict.attribution.images == (1,)


def test_the_text_alone_carries_it():
    guard, _ = _guard(lambda ids, text: 0.8 if text else 0.2)
    found = _check(guard, 2).attribution
    assert found.summary == "text" and found.images == ()


def test_a_safe_request_is_none_even_when_a_subset_scores_high():
    guard, _ = _guard(lambda ids, text: 0.7 if ids == {0} and text else 0.1)
    verdict = _check(guard, 2)
    assert verdict.label == "safe" and verdict.attribution.summary == "none"
    assert "though image 0 with the request's text scores 0.70" in verdict.attribution.detail


def test_summary_follows_the_policy_threshold():
    rows = [AttributionRow(subset=s, includes_text=t, score=p)
            for (s, t), p in zip(subsets(2, True), [0.4, 0.2, 0.3, 0.6], strict=True)]
    assert summarize(rows, 0.5).summary == "combination only"
    assert summarize(rows, 0.35).summary == "text"
    assert summarize(rows, 0.25).summary == "text"  # the highest-scoring single part: the text (0.4 > 0.3)
    assert summarize(rows, 0.7).summary == "none"
    found = summarize(rows, 0.29)
    assert found.detail == "the text alone is unsafe (0.40); also: image 1 with the request's text"


def test_a_failing_backend_is_unavailable_never_safe():
    def rule(ids, text):
        raise RuntimeError("device lost")

    guard, _ = _guard(rule)
    verdict = _check(guard, 2)
    assert verdict.label == "unavailable" and "device lost" in verdict.error and verdict.attribution is None


# ------------------------------------------------------------------ formats that cannot
def test_formats_that_cannot_score_subsets_refuse_with_a_typed_error():
    one_image = Guard(ScriptedBackend(lambda ids, text: 0.1), ShieldGemmaFormat(), Policy(explain=True))
    with pytest.raises(UnsupportedRequestError, match="shieldgemma2.*cannot attribute.*one image per request"):
        one_image.report_batch([GuardRequest.build(_images(1))])
    generated = Guard(ScriptedBackend(lambda ids, text: 0.1), LlamaGuardFormat(), Policy(explain=True))
    with pytest.raises(UnsupportedRequestError, match="cannot attribute.*no fast P\\(unsafe\\) score"):
        generated.report_batch([GuardRequest.build(_images(1), "x")])


def test_a_cascade_refuses_explain_clearly():
    guard, _ = _guard(lambda ids, text: 0.1)
    from visguard.engine.attribution import explaining

    with pytest.raises(UnsupportedRequestError, match="one guard, not a Cascade"):
        explaining(Cascade([guard]))


# ------------------------------------------------------------------ CLI, server, audit
def test_cli_explain_prints_the_table(qwen_path, tmp_path, one_torch_thread):
    paths = []
    for i, img in enumerate(_images(2)):
        paths.append(str(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    result = CliRunner().invoke(cli, ["check", "--model", qwen_path, "--mode", "fast", "--text", "x", *paths,
                                      "--explain"])
    assert result.exit_code in (0, 1), result.output
    lines = result.output.splitlines()
    summary = next(line for line in lines if line.startswith("attribution"))
    assert re.match(r"attribution  (single image|text|combination only|none): ", summary)
    table = [line for line in lines if re.match(r"\s+[01]\.\d{4}\s", line)]
    assert len(table) == 4  # the text alone, each image with the text, the request
    assert table[-1].endswith("image 0 (img0.png) + image 1 (img1.png) + text")
    plain = CliRunner().invoke(cli, ["check", "--model", qwen_path, "--mode", "fast", "--text", "x", *paths])
    assert "attribution" not in plain.output
    cascade = CliRunner().invoke(cli, ["check", "--stage", qwen_path, "--text", "x", "--explain"])
    assert cascade.exit_code == 2 and "--explain" in cascade.output


def _data_url(i: int) -> str:
    buf = io.BytesIO()
    _images(i + 1)[i].save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_returns_attribution_when_asked_and_the_audit_keeps_it(tmp_path):
    backend = ScriptedBackend(lambda ids, text: 0.9 if ids == {0, 1} and text else 0.1)
    guard = Guard(backend, VisguardFormat(), Policy(mode="fast"))
    path = tmp_path / "audit.jsonl"
    body = {"images": [_data_url(0), _data_url(1)], "text": "put them together"}
    with ServerThread(create_app(guard, settings=ServeSettings(audit=str(path)))) as server:
        plain = httpx.post(server.url + "/v1/guard/check", json=body, timeout=60)
        explained = httpx.post(server.url + "/v1/guard/check", json={**body, "explain": True}, timeout=60)
    assert plain.status_code == 200 and "attribution" not in plain.json()
    assert explained.status_code == 200, explained.text
    found = explained.json()["attribution"]
    assert found["summary"] == "combination only" and found["images"] == [0, 1] and len(found["rows"]) == 4
    records = AuditLog.read(path)
    assert "attribution" not in records[0]
    assert records[1]["attribution"] == found
    assert json.dumps(found)  # plain JSON


# ------------------------------------------------------------------ eval --explain
def test_eval_reports_how_often_the_combination_alone_carried_the_harm(tmp_path):
    from pathlib import Path

    from visguard.eval import evaluate_guard
    from visguard.eval.benchmarks import EvalItem

    paths = []
    for i, img in enumerate(_images(3)):
        paths.append(Path(tmp_path / f"img{i}.png"))
        img.save(paths[-1])
    # images 0+1 together are harmful (combination only); image 2 is harmful alone
    guard, _ = _guard(lambda ids, text: 0.9 if {0, 1} <= ids or 2 in ids else 0.1)
    items = [EvalItem(id="a", images=(paths[0], paths[1]), text="q", label="unsafe"),
             EvalItem(id="b", images=(paths[0], paths[2]), text="q", label="unsafe"),
             EvalItem(id="c", images=(paths[1],), text="q", label="safe"),
             EvalItem(id="d", images=(paths[1], paths[0]), text="q", label="safe")]  # a false positive
    summary = evaluate_guard(guard, items, out_dir=tmp_path / "out", progress=False, plots=False)
    found = summary["attribution"]
    assert found["unsafe_verdicts"] == 3
    assert found["by_summary"] == {"combination only": 2, "single image": 1, "text": 0}
    assert found["combination_only_share"] == pytest.approx(2 / 3)
    assert found["combination_only_share_gold_unsafe"] == pytest.approx(1 / 2)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["attribution"] == found
    report = (tmp_path / "out" / "report.md").read_text()
    assert "of 3 unsafe verdicts, 2 (0.6667) were attributed to the combination only, 1 to a single image" in report
    plain_guard = Guard(guard.backend, VisguardFormat(), Policy(mode="fast"))
    plain = evaluate_guard(plain_guard, items, progress=False, plots=False)
    assert "attribution" not in plain


def test_eval_cli_explain_refuses_what_it_cannot_explain():
    from visguard import cli as cli_module

    cli_module._register_plugin_commands()  # what the `visguard` entry point does first
    result = CliRunner().invoke(cli, ["eval", "-B", "mis", "-d", ".", "--stage", "a", "--stage", "b", "--explain"])
    assert result.exit_code == 2 and "--explain applies to the guard evaluation of one guard" in result.output


def test_demo_report_shows_the_attribution_beside_the_images():
    pytest.importorskip("visguard_demo", reason="the visguard-demo plugin is not installed")
    from visguard_demo.report import _request_html

    from visguard.engine.attribution import summarize

    rows = [AttributionRow(subset=s, includes_text=t, score=0.9 if s == (0, 1) else 0.1) for s, t in subsets(2, True)]
    found = summarize(rows, 0.5).model_dump(mode="json")
    png = io.BytesIO()
    _images(1)[0].save(png, format="PNG")
    request = {"objects": ["knife", "person"], "images": [png.getvalue()] * 2, "text": "q", "truth": "unsafe",
               "pre": None, "post": None, "host_called": False, "host_answer": None, "blocked": True,
               "reason": "unsafe", "stage": "input", "shown": "no", "timings": {}, "attribution": found}
    page = _request_html(1, request)
    beside_images = page.split('<div class="thumbs">', 1)[1].split("<p><b>Request 1", 1)[0]
    assert 'data-summary="combination only"' in beside_images
    bars = re.findall(r'<tr class="(unsafe|safe)"><td>([^<]+)</td><td class="bar"><span style="width:(\d+)%"></span></td>'
                      r"<td>([\d.]+)</td></tr>", page)
    assert [(cls, name, width) for cls, name, width, _ in bars] == [
        ("safe", "text", "10"), ("safe", "img 1 + text", "10"), ("safe", "img 2 + text", "10"),
        ("unsafe", "img 1 + img 2 + text", "90")]
    request["attribution"] = None  # a guard that cannot attribute: no table, the rest as before
    assert "attribution" not in _request_html(1, request)


def test_in_reason_mode_the_verdict_is_the_reason_check_and_the_attribution_a_fast_pass():
    class Reasoning(ScriptedBackend):
        def generate(self, prompts, *, max_new_tokens):
            from visguard.engine.backend import Generation

            return [Generation(text="Verdict: unsafe\nCategory: Violent") for _ in prompts]

    backend = Reasoning(lambda ids, text: 0.95 if ids == {0, 1} and text else 0.05)
    guard = Guard(backend, VisguardFormat(), Policy(mode="reason", explain=True))
    verdict = _check(guard, 2)
    assert verdict.mode == "reason" and verdict.label == "unsafe" and verdict.category == "Violent"
    assert verdict.attribution.summary == "combination only"
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 4  # the subsets: one score call


# ------------------------------------------------------------------ prefix reuse between subsets (transformers)
# An explained check's subsets begin like one another: ``[instructions, image 1, text]`` begins like the
# request ``[instructions, image 1, image 2, text]`` up to past its image. With its
# KV cache on, the transformers backend runs the prompts that no longer prompt begins like first (the
# roots), then the rest continuing from a root's cached prefix (TransformersBackend._phases,
# KVCacheStore.lookup by image prefix). Token counts, never timings.


def _noise(n: int, seed: int = 0, px: int = 112) -> list[Image.Image]:
    """Noise images; 112 px: 16 image tokens each on the tiny Qwen2-VL, enough for the reuse to pay."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def _tiny_models():
    """(model, processor) per architecture, loaded once for this module's tests."""
    from visguard.integrations.hf import load_image_text_model

    loaded: dict[str, Any] = {}

    def get(arch: str) -> tuple[Any, Any]:
        if arch not in loaded:
            from visguard_testing.checkpoints import cached_tiny_checkpoint

            loaded[arch] = load_image_text_model(str(cached_tiny_checkpoint(arch)), device="cpu")
        return loaded[arch]

    return get


def _hf_guard(models: Any, arch: str, kv_cache_mb: float, reuse_min_tokens: int = 0) -> Guard:
    from visguard.default_plugins.transformers_backend import TransformersBackend

    model, processor = models(arch)
    backend = TransformersBackend.from_objects(model, processor, model_id=arch, kv_cache_mb=kv_cache_mb)
    backend.reuse_min_tokens = reuse_min_tokens  # tiny checkpoints: at most 16 tokens an image
    return Guard(backend, VisguardFormat(), Policy(mode="fast", explain=True))


def _uncached_tokens(guard: Guard, request: GuardRequest) -> int:
    """Tokens the explained check computes when each subset runs from the static prefix alone (the
    one-batch path before prefix reuse between subsets): each prompt's tokens after its static prefix."""
    from visguard.engine.attribution import _plans

    _, plans = _plans(guard, request)
    return sum(guard.backend.diagnostics(plan.prompts[0]).request_tokens for plan in plans)


@pytest.mark.parametrize(("arch", "n"), [("qwen2_vl", 2), ("qwen2_vl", 3), ("llava", 2), ("llava", 3)])
def test_subsets_continuing_from_their_parents_score_as_without_any_cache(_tiny_models, one_torch_thread, arch, n):
    request = GuardRequest.build(_noise(n), "use the first on the second")
    (uncached,) = _hf_guard(_tiny_models, arch, 0).report_batch([request])
    guard = _hf_guard(_tiny_models, arch, 256)
    (cached,) = guard.report_batch([request])
    assert [(r.subset, r.includes_text) for r in cached.attribution.rows] == subsets(n, True)
    for a, b in zip(cached.attribution.rows, uncached.attribution.rows, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-4), (a.name, a.score, b.score)
    assert cached.score == pytest.approx(uncached.score, abs=1e-4)
    stats = guard.backend.cache_stats
    assert stats["prompt_hits"] >= 1  # some subsets continued from another subset's cache


@pytest.mark.parametrize(("n", "child_images"), [(2, 1), (3, 4)])
def test_an_explained_check_computes_only_the_tails_of_subsets_that_begin_like_another(
        _tiny_models, one_torch_thread, n, child_images):
    # Children (subsets whose images all lie in a root's prefix) hold 1 of the 4 image places of the 4
    # prompts (2 images: [image 1, text] in the request), 4 of 12 (3 images: [1, 2, text] and [1, text] in
    # the request, [2, text] in [2, 3, text]); none of their image tokens is computed again.
    guard = _hf_guard(_tiny_models, "qwen2_vl", 256)
    images = _noise(n, seed=n)
    request = GuardRequest.build(images, "use the first on the second")
    separately = _uncached_tokens(guard, request)
    before = guard.backend.cache_stats["computed_tokens"]
    (verdict,) = guard.report_batch([request])
    computed = guard.backend.cache_stats["computed_tokens"] - before
    assert verdict.attribution is not None
    per_image = guard.backend.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                                        images=[images[:1]], return_tensors="pt")["input_ids"].shape[1]
    # measured: 2 images 228 of 246, 3 images 494 of 566 (each image 16 + 2 tokens)
    assert computed <= separately - child_images * per_image, (computed, separately, per_image)


def _count_encoded_images(model: Any) -> list[int]:
    """Images Qwen2-VL's vision tower encodes, per call (one ``grid_thw`` row per image)."""
    counts: list[int] = []
    model.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: counts.append(int((kwargs.get("grid_thw") if "grid_thw" in kwargs else args[1]).shape[0])),
        with_kwargs=True)
    return counts


@pytest.mark.parametrize(("n", "encoded"), [(2, 3), (3, 8)])
def test_pixels_of_images_inside_a_cached_prefix_are_not_encoded_again(one_torch_thread, qwen_path, n, encoded):
    # Only the roots' images are encoded: 2 images -> the request (2) and [image 2, text] (1), not the 4
    # image places of the 4 prompts; 3 images -> the request (3), [1, 3, text] (2), [2, 3, text] (2),
    # [3, text] (1), not the 12 of the 8 prompts. A subset whose images all sit in its parent's cached
    # prefix ([1, text], [1, 2, text], [2, text]) passes no pixels to the model.
    guard = Guard.from_pretrained(qwen_path, format=VisguardFormat(), policy=Policy(mode="fast", explain=True),
                                  device="cpu")
    guard.backend.reuse_min_tokens = 0  # tiny checkpoint: 16 tokens an image
    counts = _count_encoded_images(guard.backend.model)
    (verdict,) = guard.report_batch([GuardRequest.build(_noise(n, seed=10 + n), "put them together")])
    assert verdict.attribution is not None
    assert sum(counts) == encoded, counts
    off = Guard.from_pretrained(qwen_path, format=VisguardFormat(), policy=Policy(mode="fast", explain=True),
                                device="cpu", kv_cache_mb=0)
    off_counts = _count_encoded_images(off.backend.model)
    off.report_batch([GuardRequest.build(_noise(n, seed=10 + n), "put them together")])
    assert sum(off_counts) == sum(len(s) for s, _ in subsets(n, True))  # without the cache every subset encodes its own


def test_the_prefix_store_serves_a_prompt_of_other_images_only_as_far_as_its_images_agree():
    import torch

    from visguard.integrations.hf import KVCacheStore

    IMG = 9  # the image token
    store = KVCacheStore()
    cached = torch.tensor([1, 2, IMG, IMG, 5, IMG, IMG, 6, 7, 8])  # [static, image a, image b, text]
    layers = [(torch.arange(10.0).view(1, 1, 10, 1), torch.zeros(1, 1, 10, 1))]
    store.put(cached, ("salt", "a", "b"), layers)
    first_only = torch.tensor([1, 2, IMG, IMG, 5, 3, 3, 8])  # [static, image a, other text]
    assert store.lookup(first_only, ("salt", "a"), limit=7) is None  # exact keys only, as before
    n, got = store.lookup(first_only, ("salt", "a"), limit=7, image_token=IMG)
    assert n == 5 and got[0][0].flatten().tolist() == [0, 1, 2, 3, 4]
    other_first = torch.tensor([1, 2, IMG, IMG, 5, 3])  # image c where the entry has a: only the static part
    assert store.lookup(other_first, ("salt", "c"), limit=5, image_token=IMG)[0] == 2
    assert store.lookup(first_only, ("other salt", "a"), limit=7, image_token=IMG) is None  # salts never mix
    # the same two images: the longest prefix; a third image in the prompt after them is not in the entry
    both = torch.tensor([1, 2, IMG, IMG, 5, IMG, IMG, 6, IMG, IMG, 4])
    assert store.lookup(both, ("salt", "a", "b", "d"), limit=10, image_token=IMG)[0] == 8
    # a run the shared tokens would split (a longer image of other pixels) is cut before it
    longer = torch.tensor([1, 2, IMG, IMG, IMG, 5])
    assert store.lookup(longer, ("salt", "a"), limit=5, image_token=IMG)[0] == 2


@pytest.mark.parametrize(("px", "n"), [(64, 3), (112, 2)])
def test_tiny_images_run_as_one_phase(_tiny_models, one_torch_thread, px, n):
    # 64 px, 3 images: 4 image tokens each, the children's 4 image places far fewer than 64; 112 px,
    # 2 images: the child's one image 16 tokens. Both fewer than the default reuse_min_tokens (64):
    # continuing them from a root would cost a forward more than it saves.
    from visguard.default_plugins.transformers_backend import TransformersBackend

    guard = _hf_guard(_tiny_models, "qwen2_vl", 256, reuse_min_tokens=TransformersBackend.reuse_min_tokens)
    request = GuardRequest.build(_noise(n, seed=7, px=px), "use the first on the second")
    separately = _uncached_tokens(guard, request)
    (verdict,) = guard.report_batch([request])
    assert verdict.attribution is not None
    assert guard.backend.cache_stats["prompt_hits"] == 0
    assert guard.backend.cache_stats["computed_tokens"] == separately


def test_two_images_continue_the_first_images_subset_from_the_request(_tiny_models, one_torch_thread):
    # regression: the phases once needed the children's image tokens to reach the request's own size, so
    # two images (one child, [image 1, text], holding one image) always ran as one phase; on the bench
    # model at 448 px that cost 2.5x a plain check instead of 1.6x. Now reuse_min_tokens alone decides:
    # 112 px images (16 image tokens each) with reuse_min_tokens 16.
    guard = _hf_guard(_tiny_models, "qwen2_vl", 256, reuse_min_tokens=16)
    images = _noise(2, seed=21)
    request = GuardRequest.build(images, "use the first on the second")
    separately = _uncached_tokens(guard, request)
    (verdict,) = guard.report_batch([request])
    assert verdict.attribution is not None
    stats = guard.backend.cache_stats
    assert stats["prompt_hits"] == 1  # [image 1, text] continued from the request's [static, image 1]
    per_image = guard.backend.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                                        images=[images[:1]], return_tensors="pt")["input_ids"].shape[1]
    assert stats["computed_tokens"] == separately - per_image  # its image not computed again (measured: 228 of 246)
    above = _hf_guard(_tiny_models, "qwen2_vl", 256, reuse_min_tokens=17)  # one more than its image holds
    above.report_batch([request])
    assert above.backend.cache_stats["prompt_hits"] == 0  # one phase
    assert above.backend.cache_stats["computed_tokens"] == separately
