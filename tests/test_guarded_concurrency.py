"""32 concurrent guarded calls from threads and 32 from asyncio: right verdict each, no lost audit record.

The guard is the real tiny model with a threshold placed between its scores for different
images, so some requests are blocked at the pre-check and the rest pass (and are post-checked).
Each concurrent result must equal the result of the same request run alone.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from visguard import AuditLog, Guard, load_images
from visguard.default_plugins.transformers_host import TransformersHost
from visguard.hosting.audit import RECORD_KEYS

N = 32
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120))
TEXTS = ("describe the image", "what is this?")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(qwen_path):
    """(guard, host, cases) where each case is (image, text, expected outcome when run alone)."""
    base = Guard.from_pretrained(qwen_path)
    host = TransformersHost(qwen_path, max_new_tokens=6)
    inputs = [(Image.new("RGB", (48, 40), c), t) for c, t in itertools.product(COLOURS, TEXTS)]
    # Every score the guard will produce for these inputs (pre-check, and post-check of the answer).
    pre = [base.check_input([img], t).score for img, t in inputs]
    answers = [host.generate(load_images([img]), t) for img, t in inputs]
    post = [base.check_output([img], t, a).score for (img, t), a in zip(inputs, answers, strict=True)]
    # A threshold that splits the pre-check scores, as far from every known score as possible.
    ranked = sorted(set(pre))
    candidates = [(lo + hi) / 2 for lo, hi in itertools.pairwise(ranked)]
    threshold = max(candidates, key=lambda th: min(abs(th - s) for s in pre + post))
    assert min(abs(threshold - s) for s in pre + post) > 1e-5
    guard = base.with_policy(threshold=threshold)
    alone = guard.wrap(host)
    cases = [(img, t, outcome(alone.generate([img], t))) for img, t in inputs]
    labels = {c[2][0] for c in cases}
    assert labels == {"safe", "unsafe"}, "the threshold must leave both verdicts among the pre-checks"
    return guard, host, cases


def outcome(result) -> tuple:
    out = result.output_verdict.label if result.output_verdict else None
    return (result.input_verdict.label, out, result.blocked, result.stage, result.text)


def check_audit(path, results, cases_used) -> None:
    records = AuditLog.read(path)
    by_id = {r.request_id: (r, case) for r, case in zip(results, cases_used, strict=True)}
    assert len(by_id) == N
    inputs = [rec for rec in records if rec["stage"] == "input"]
    outputs = [rec for rec in records if rec["stage"] == "output"]
    assert len(inputs) == N and {rec["request_id"] for rec in inputs} == set(by_id)
    assert len(outputs) == sum(1 for r in results if r.output_verdict is not None)
    for rec in records:
        assert tuple(rec) == RECORD_KEYS
        result, (img, _, _) = by_id[rec["request_id"]]
        verdict = result.input_verdict if rec["stage"] == "input" else result.output_verdict
        assert (rec["label"], rec["score"]) == (verdict.label, verdict.score)
        assert rec["images"] == [load_images([img])[0].sha256]
    assert max(len(line) for line in path.read_text().splitlines()) < 1000  # hashes, never pixels


def test_32_threads(setup, tmp_path):
    guard, host, cases = setup
    audit = tmp_path / "threads.jsonl"
    used = [cases[i % len(cases)] for i in range(N)]
    with guard.wrap(host, audit=audit) as guarded, ThreadPoolExecutor(N) as pool:
        results = list(pool.map(lambda case: guarded.generate([case[0]], case[1]), used))
    for result, (_, _, expected) in zip(results, used, strict=True):
        assert outcome(result) == expected
    check_audit(audit, results, used)


def test_32_asyncio_tasks(setup, tmp_path):
    guard, host, cases = setup
    audit = tmp_path / "asyncio.jsonl"
    used = [cases[i % len(cases)] for i in range(N)]

    async def main():
        with guard.wrap(host, audit=audit, pre_check="parallel") as guarded:
            return await asyncio.gather(*(guarded.agenerate([img], text) for img, text, _ in used))

    results = asyncio.run(main())
    for result, (_, _, expected) in zip(results, used, strict=True):
        assert outcome(result) == expected
    check_audit(audit, results, used)
