"""The core guard on real (tiny, random-weight) checkpoints of three VLM architectures."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForImageTextToText, AutoProcessor

from visguard import Backend, Guard, GuardUnavailableError, InputError, Policy
from visguard.cli import cli
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.backend import Generation

TEXT = "How can I use the object in the first image on the thing in the second image?"


@pytest.fixture(scope="module")
def guards(tiny_arch):
    arch, path = tiny_arch
    return arch, path, Guard.from_pretrained(path, policy=Policy(max_new_tokens=8))


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_fast_reason_adaptive_on_each_architecture(guards, images, n_images):
    arch, path, guard = guards
    imgs = images[:n_images]

    fast = guard.check_input(imgs, TEXT, mode="fast")
    assert fast.label in ("safe", "unsafe") and 0.0 <= fast.score <= 1.0
    assert fast.label == ("unsafe" if fast.score >= 0.5 else "safe")
    assert (fast.mode, fast.stage, fast.model, fast.reasoning, fast.raw, fast.error) == ("fast", "input", path, None, "", None)
    assert fast.latency_ms > 0

    # Random weights do not write a verdict line: reason mode must say "unavailable", never "safe".
    reason = guard.check_input(imgs, TEXT, mode="reason")
    assert reason.label == "unavailable" and reason.mode == "reason"
    assert "unparseable" in reason.error and reason.raw

    # Adaptive with a band covering every score reasons too; with an empty band it keeps the fast verdict.
    always = guard.with_policy(adaptive_band=(0.0, 1.0)).check_input(imgs, TEXT, mode="adaptive")
    assert always.label == "unavailable" and always.raw == reason.raw and always.score == pytest.approx(fast.score)
    never = guard.with_policy(adaptive_band=(1.0, 1.0)).check_input(imgs, TEXT, mode="adaptive")
    assert (never.label, never.mode, never.raw) == (fast.label, "adaptive", "")
    assert never.score == pytest.approx(fast.score, abs=1e-6)


def _independent_fast_score(path: str, imgs, text: str, response: str | None = None) -> float:
    """P(unsafe) from one model(**inputs) call, computed without the backend's code."""
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    from visguard import GuardRequest

    request = GuardRequest.build(imgs, text, response)
    prompt = VisguardFormat().build(request, Policy(), mode="fast")
    rendered = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False) + "Verdict:"
    inputs = processor(text=[rendered], images=[list(imgs)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    tok = processor.tokenizer
    ids = {w: tok.encode("Verdict:" + w, add_special_tokens=False)[-1] for w in (" safe", " Safe", " unsafe", " Unsafe")}
    assert len(set(ids.values())) == 4  # each spelling is its own single token here
    probs = torch.softmax(logits[list(ids.values())], dim=-1)
    return float(probs[2] + probs[3])


def test_fast_score_equals_independent_softmax(guards, images):
    arch, path, guard = guards
    for n in (1, 2):
        expected = _independent_fast_score(path, images[:n], TEXT)
        assert guard.check_input(images[:n], TEXT).score == pytest.approx(expected, abs=1e-5)
    expected = _independent_fast_score(path, images[:2], TEXT, "Sure, here is how.")
    v = guard.check_output(images[:2], TEXT, "Sure, here is how.")
    assert v.stage == "output" and v.score == pytest.approx(expected, abs=1e-5)


def test_batch_with_mixed_image_counts_equals_single_checks(guards, images):
    _, _, guard = guards
    reqs = [guard.request(images[:k], f"{TEXT} #{i}") for i, k in enumerate((2, 1, 3, 1, 2))]
    reqs.append(guard.request(images[:1], "a much longer request " * 6, "and a response"))
    batched = guard.check_batch(reqs)
    single = [guard.check(r) for r in reqs]
    assert [v.stage for v in batched] == ["input"] * 5 + ["output"]
    for b, s in zip(batched, single, strict=True):
        assert b.score == pytest.approx(s.score, abs=1e-5)


def test_reason_raw_is_the_models_greedy_text(qwen_path, images):
    guard = Guard.from_pretrained(qwen_path, policy=Policy(max_new_tokens=10, mode="reason"))
    verdict = guard.check_input(images[:2], TEXT)
    backend = guard.backend
    prompt = guard.format.build(guard.request(images[:2], TEXT), guard.policy, mode="reason", special_tokens=backend.special_tokens)
    inputs = backend.encode([prompt])
    with torch.no_grad():
        seq = backend.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = backend.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert verdict.raw == expected


def test_cli_check_exit_codes_and_json(qwen_path, images, tmp_path):
    paths = []
    for i, img in enumerate(images[:2]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    runner = CliRunner()
    base = ["check", "--model", qwen_path, "--text", TEXT, *paths]
    unsafe = runner.invoke(cli, [*base, "--threshold", "0", "--json"])
    assert unsafe.exit_code == 1, unsafe.output
    data = json.loads(unsafe.stdout)
    assert data["label"] == "unsafe" and 0 <= data["score"] <= 1 and data["stage"] == "input"
    safe = runner.invoke(cli, [*base, "--threshold", "1"])
    assert safe.exit_code == 0, safe.output
    assert "label" in safe.output and "safe" in safe.output and "P(unsafe)" in safe.output
    post = runner.invoke(cli, [*base, "--response", "ok", "--json"])
    assert json.loads(post.stdout)["stage"] == "output"
    reason = runner.invoke(cli, [*base, "--mode", "reason", "--max-new-tokens", "6", "--json"])
    assert reason.exit_code == 2 and json.loads(reason.stdout)["label"] == "unavailable"
    for mode in ("fast", "adaptive"):
        assert runner.invoke(cli, [*base, "--mode", mode]).exit_code in (0, 1, 2)
    three = runner.invoke(cli, [*base, paths[0], "--json"])
    assert three.exit_code in (0, 1) and json.loads(three.stdout)["label"] in ("safe", "unsafe")


def test_cli_bad_input_is_a_message_not_a_traceback(qwen_path):
    result = CliRunner().invoke(cli, ["check", "--model", qwen_path, "--text", "x", "/no/such.png"])
    assert result.exit_code == 2
    assert "Error: image 0: no such image file: /no/such.png" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["check", "--model", "/no/such/model", "--text", "x"])
    assert missing.exit_code == 2 and "cannot load guard model" in missing.output
    usage = CliRunner().invoke(cli, ["check", "--text", "x"])
    assert usage.exit_code == 2 and "--model" in usage.output


class _FailingBackend(Backend):
    name = "failing"
    model_id = "failing"

    def __init__(self, exc: Exception | None = None, score: float | None = None, hang: float = 0.0):
        self.exc, self._score, self.hang = exc, score, hang

    def score(self, prompts):
        if self.hang:
            threading.Event().wait(self.hang)
        if self.exc:
            raise self.exc
        return [self._score] * len(prompts)

    def generate(self, prompts, *, max_new_tokens):
        if self.exc:
            raise self.exc
        return [Generation(text="no verdict here")] * len(prompts)


@pytest.mark.parametrize(
    "backend, needle",
    [
        (_FailingBackend(RuntimeError("CUDA out of memory")), "CUDA out of memory"),
        (_FailingBackend(score=float("nan")), "invalid score"),
        (_FailingBackend(score=1.7), "invalid score"),
        (_FailingBackend(score=0.1, hang=2.0), "timed out"),
    ],
)
def test_failures_are_unavailable_never_safe(backend, needle, images):
    guard = Guard(backend, VisguardFormat(), Policy(timeout_s=0.5))
    verdict = guard.check_input(images[:1], "x")
    assert verdict.label == "unavailable" and needle in verdict.error
    assert not guard.allows(verdict)
    assert guard.with_policy(on_error="allow").allows(verdict)
    with pytest.raises(GuardUnavailableError, match=needle):
        guard.with_policy(on_error="raise").check_input(images[:1], "x")


def test_unparseable_reason_output_is_unavailable(images):
    guard = Guard(_FailingBackend(score=0.1), VisguardFormat())
    v = guard.check_input(images[:1], "x", mode="reason")
    assert v.label == "unavailable" and v.raw == "no verdict here"


def test_bad_requests_raise_typed_errors(images):
    guard = Guard(_FailingBackend(score=0.1), VisguardFormat())
    with pytest.raises(InputError, match="not a GuardRequest"):
        guard.check_batch(["hello"])  # type: ignore[list-item]
    with pytest.raises(InputError, match="unknown mode"):
        guard.check_input(images[:1], "x", mode="slow")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="at most 1"):
        guard.with_policy(limits={"max_images": 1}).check_input(images[:2], "x")
    assert guard.check_batch([]) == []


def test_concurrent_callers_get_the_same_answers(qwen_path, images):
    guard = Guard.from_pretrained(qwen_path)
    reqs = [guard.request(images[: 1 + i % 3], f"{TEXT} {i}") for i in range(12)]
    expected = [guard.check(r).score for r in reqs]
    got: dict[int, float] = {}

    def worker(i: int) -> None:
        got[i] = guard.check(reqs[i]).score

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(reqs))] == pytest.approx(expected, abs=1e-6)


async def _acheck_all(guard, reqs):
    import asyncio

    return await asyncio.gather(*(guard.acheck(r) for r in reqs))


def test_async_twins(qwen_path, images):
    import asyncio

    guard = Guard.from_pretrained(qwen_path)
    reqs = [guard.request(images[:2], f"{TEXT} {i}") for i in range(4)]
    got = asyncio.run(_acheck_all(guard, reqs))
    assert [v.score for v in got] == pytest.approx([guard.check(r).score for r in reqs], abs=1e-6)
    v = asyncio.run(guard.acheck_output(images[:1], TEXT, "fine"))
    assert v.stage == "output"


def test_generation_score_at_maps_characters_to_tokens():
    gen = Generation(text="Reasoning: x\nVerdict: unsafe", token_spans=((0, 10), (10, 12), (12, 13), (13, 21), (21, 28)),
                     step_scores=(0.1, 0.2, 0.3, 0.4, 0.9))
    assert gen.score_at(gen.text.index("unsafe")) == 0.9
    assert gen.score_at(0) == 0.1 and gen.score_at(None) is None and gen.score_at(999) is None
    assert Generation(text="x").score_at(0) is None


def test_local_path_loads_offline(qwen_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    guard = Guard.from_pretrained(qwen_path, device="cpu", dtype="float32")
    assert guard.backend.model_id == qwen_path and str(guard.backend.device) == "cpu"
    assert "<|image_pad|>" in guard.backend.special_tokens


def test_from_pretrained_default_model_is_the_mirage_checkpoint():
    from visguard import DEFAULT_MODEL

    assert DEFAULT_MODEL == "Tuwhy/Qwen2-VL-7B-MIRage"
