"""Check plans: each request is planned once, and each prompt of a check is rendered and tokenized once."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from PIL import Image
from visguard_testing.faults import FaultyBackend

from visguard import Category, Guard, GuardFormat, GuardRequest, InputTooLongError, Policy
from visguard.core.errors import PromptTooLongError
from visguard.default_plugins.guardreasoner_format import GuardReasonerFormat
from visguard.default_plugins.llama_guard_format import LlamaGuardFormat
from visguard.default_plugins.mirage_format import MirageFormat
from visguard.default_plugins.shieldgemma_format import ShieldGemmaFormat
from visguard.default_plugins.transformers_backend import TransformersBackend
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.engine.format import CheckPlan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 48), (30, 200, 30))]


@pytest.fixture(scope="module")
def backend(qwen_path):
    backend = TransformersBackend(qwen_path, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def guard(backend):
    guard = Guard(backend, VisguardFormat(), Policy(max_new_tokens=4))
    # Warm up what is computed once per backend and policy (the static prefix's cache and tokens,
    # the verdict tokens, and, on the first fast check that finds the prefix cached, the one-time
    # comparison of the prefix-split encoding with the whole one), so the counts below are a check's own.
    for mode in ("fast", "fast", "reason"):
        guard.check_input(IMAGES, "warm up", mode=mode)
    return guard


def _spy(backend, monkeypatch) -> Counter:
    """Count renders (the processor's chat template) and tokenizations: processor calls, and
    tokenizer calls made outside a processor call (a processor tokenizes through its tokenizer)."""
    counts: Counter = Counter()
    inside = threading.local()
    processor_cls, tokenizer_cls = type(backend.processor), type(backend.tokenizer)
    render, call, tokenize = processor_cls.apply_chat_template, processor_cls.__call__, tokenizer_cls.__call__

    def counting_render(self, *args, **kwargs):
        counts["render"] += 1
        return render(self, *args, **kwargs)

    def counting_call(self, *args, **kwargs):
        counts["tokenize"] += 1
        inside.depth = getattr(inside, "depth", 0) + 1
        try:
            return call(self, *args, **kwargs)
        finally:
            inside.depth -= 1

    def counting_tokenize(self, *args, **kwargs):
        if not getattr(inside, "depth", 0):
            counts["tokenize"] += 1
        return tokenize(self, *args, **kwargs)

    monkeypatch.setattr(processor_cls, "apply_chat_template", counting_render)
    monkeypatch.setattr(processor_cls, "__call__", counting_call)
    monkeypatch.setattr(tokenizer_cls, "__call__", counting_tokenize)
    return counts


@pytest.mark.parametrize("kind", ["fast", "reason", "post"])
def test_a_check_renders_and_tokenizes_its_prompt_once(guard, monkeypatch, kind):
    counts = _spy(guard.backend, monkeypatch)
    if kind == "post":
        verdict = guard.check_output(IMAGES, "How do I use this on that?", "Carefully, like this.", mode="fast")
    else:
        verdict = guard.check_input(IMAGES, "How do I use this on that?", mode=kind)
    assert verdict.label in ("safe", "unsafe") if kind != "reason" else verdict.raw  # random weights write no verdict
    assert dict(counts) == {"render": 1, "tokenize": 1}


def test_a_reason_check_with_a_followup_renders_each_of_its_two_prompts_once(backend, guard, monkeypatch):
    mirage = Guard(backend, MirageFormat(), Policy(max_new_tokens=4, mode="reason"))
    counts = _spy(backend, monkeypatch)
    verdict = mirage.check_input(IMAGES, "How do I use this on that?")
    assert verdict.label in ("safe", "unsafe") and verdict.score is not None  # the follow-up's score
    assert dict(counts) == {"render": 2, "tokenize": 2}  # the generation prompt, then the follow-up


# ---------------------------------------------------------------- plans of each kind of format

MIS = Policy()


def _request(n_images: int = 1, text: str = "", response: str | None = None) -> GuardRequest:
    return GuardRequest.build([Image.new("RGB", (32, 32), (10 * i, 90, 200)) for i in range(n_images)], text, response)


def test_the_default_plan_scores_one_prompt_or_generates_and_parses():
    fmt, request = VisguardFormat(), _request(1, "how?")
    fast = fmt.plan(request, MIS, mode="fast")
    assert (fast.read, len(fast.prompts), fast.followup, fast.request) == ("score", 1, None, request)
    assert fast.prompts[0].messages == fmt.build(request, MIS, mode="fast").messages
    assert fast.combine([0.25]) == (0.25, None)
    reason = fmt.plan(request, Policy(max_new_tokens=7), mode="reason")
    assert (reason.read, reason.max_new_tokens, reason.followup) == ("generate", 7, None)
    assert reason.parse("Verdict: unsafe\nCategory: Violent").label == "unsafe"
    # a format whose fast verdict comes within its first few generated tokens
    lg = LlamaGuardFormat()
    fast_lg = lg.plan(_request(1, "how?"), MIS, mode="fast")
    assert (fast_lg.read, fast_lg.max_new_tokens) == ("generate", lg.capabilities.fast_tokens)
    assert fast_lg.parse("\n\nunsafe\nS1").label == "unsafe"


def test_shieldgemma_plan_scores_one_prompt_per_policy_and_takes_the_max():
    plan = ShieldGemmaFormat().plan(_request(1), MIS, mode="fast")
    assert plan.read == "score" and len(plan.prompts) == 3 and all(len(p.images) == 1 for p in plan.prompts)
    assert plan.prompts[1].messages[0]["content"][1]["text"].startswith("No Sexually Explicit content")
    assert plan.combine([0.1, 0.9, 0.2]) == (0.9, "Erotic")
    assert plan.combine([0.7, 0.1, 0.2]) == (0.7, "Illegal Activity")
    custom = MIS.with_categories(Category(name="Gambling", description="betting money on games of chance"))
    plan = ShieldGemmaFormat().plan(_request(1), custom, mode="fast")
    assert len(plan.prompts) == 4 and plan.combine([0.0] * 3 + [0.8]) == (0.8, "Gambling")


_GR = ("<think>The image shows a knife; the user asks how to use it on a person.</think>\n"
       "<result>\nRequest: harmful\nResponse: unharmful\n</result>")


def test_guardreasoner_plan_reads_the_label_of_the_requests_stage():
    fmt = GuardReasonerFormat()
    pre = fmt.plan(_request(1, "x"), MIS, mode="reason")
    post = fmt.plan(_request(1, "x", "no"), MIS, mode="reason")
    assert pre.read == post.read == "generate" and pre.max_new_tokens == MIS.max_new_tokens
    assert (pre.parse(_GR).label, post.parse(_GR).label) == ("unsafe", "safe")
    assert _GR[post.parse(_GR).verdict_offset :].startswith("unharmful")


def test_mirage_plan_asks_the_followup_after_its_answer():
    fmt, request = MirageFormat(), _request(2, "How do I use this on that?")
    reason = fmt.plan(request, MIS, mode="reason", special_tokens=("<|im_start|>",))
    assert reason.read == "generate" and reason.followup is not None
    follow = reason.followup("The first image shows a knife.")
    expected = fmt.followup(request, MIS, "The first image shows a knife.", special_tokens=("<|im_start|>",))
    assert follow.messages == expected.messages and len(follow.images) == 2
    assert follow.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "The first image shows a knife."}]}
    assert reason.parse("I cannot help with that; it could hurt someone.").label == "unsafe"
    assert fmt.plan(request, MIS, mode="fast").read == "score"
    # verdict="text": a pre-check's label comes from the answer itself; a post-check still asks
    text = MirageFormat(verdict="text")
    assert text.plan(request, MIS, mode="reason").followup is None
    assert text.plan(_request(1, "x", "an answer"), MIS, mode="reason").followup is not None


def test_a_plan_is_checked_when_built():
    request, prompt = _request(), VisguardFormat().build(_request(), MIS, mode="fast")
    with pytest.raises(ValueError, match="at least one prompt"):
        CheckPlan(request, ())
    with pytest.raises(ValueError, match="exactly one prompt"):
        CheckPlan(request, (prompt, prompt), read="generate", max_new_tokens=4, parse=lambda t: None)
    with pytest.raises(ValueError, match="only a generate plan"):
        CheckPlan(request, (prompt,), followup=lambda t: None)
    assert CheckPlan(request, [prompt]).prompts == (prompt,)


def test_the_runtime_format_contract_has_no_per_model_or_training_hooks():
    for name in ("build_all", "combine", "parse_for", "followup", "parse_followup", "target", "reasoning_text",
                 "checkpoint_kwargs"):
        assert not hasattr(GuardFormat, name), name


# ---------------------------------------------------------------- planning once, failing alone


class _PlanCounting(VisguardFormat):
    def __init__(self):
        super().__init__()
        self.plans = self.checks = 0

    def check_request(self, request, mode=None):
        self.checks += 1
        super().check_request(request, mode)

    def plan(self, request, policy, *, mode, special_tokens=()):
        self.plans += 1
        return super().plan(request, policy, mode=mode, special_tokens=special_tokens)


@pytest.mark.parametrize(("mode", "plans"), [("fast", 1), ("reason", 1), ("adaptive", 2)])
def test_each_request_is_planned_once_per_check(mode, plans):
    fmt = _PlanCounting()
    guard = Guard(FaultyBackend(), fmt, Policy(mode=mode))
    request = GuardRequest.build(None, "hello")
    verdicts = guard.report_batch([request, request])
    assert [v.label for v in verdicts] == ["safe", "safe"]
    assert (fmt.checks, fmt.plans) == (2, 2 * plans)  # one capability check and one plan (per prompt mode) each


class _TooLongBackend(FaultyBackend):
    """Refuses, as a backend with a context limit does while encoding, prompts holding ``LONG``."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def _refuse(self, prompts):
        self.batches.append(len(prompts))
        long = {i: "the guard prompt is 9999 tokens long, more than the guard model's limit of 100"
                for i, p in enumerate(prompts) if "LONG" in str(p.messages)}
        if long:
            raise PromptTooLongError(long)

    def score(self, prompts):
        self._refuse(prompts)
        return super().score(prompts)

    def generate(self, prompts, *, max_new_tokens):
        self._refuse(prompts)
        return super().generate(prompts, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("mode", ["fast", "reason", "adaptive"])
def test_a_request_too_long_for_the_model_fails_alone_and_the_batch_runs_once_more(mode):
    backend = _TooLongBackend()
    guard = Guard(backend, VisguardFormat(), Policy(mode=mode, adaptive_band=(0.0, 1.0)), max_wait_ms=500)
    requests = [GuardRequest.build(None, t) for t in ("hello", "LONG " * 3, "x [[unsafe]]")]
    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = guard.check(requests[i])
        except Exception as exc:  # noqa: BLE001 - what each caller got
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(results[1], InputTooLongError) and "more than the guard model's limit of 100" in str(results[1])
    assert str(results[1]).startswith("request refused: the guard prompt is 9999 tokens long")
    assert [results[0].label, results[2].label] == ["safe", "unsafe"]
    # the backend refused before its model ran, so the too-long prompt never reached the model
    assert backend.calls < len(backend.batches) and not backend.faults
    with pytest.raises(InputTooLongError):
        guard.report_batch(requests)  # one caller's own batch: its error reaches it


def test_a_format_that_fails_to_plan_gives_unavailable_never_safe():
    class Broken(VisguardFormat):
        def plan(self, request, policy, *, mode, special_tokens=()):
            raise KeyError("template variable")

    verdict = Guard(FaultyBackend(), Broken(), Policy(on_error="allow")).check_input(None, "hello")
    assert verdict.label == "unavailable" and verdict.error == "guard format error: KeyError: 'template variable'"
