"""guard.wrap(host): pre/post checks, parallel pre-check, streaming hold-back, on_unsafe policies.

Real models throughout: the guard and the host are tiny random-weight checkpoints of a real VLM
architecture (Qwen2-VL). Verdicts are forced through the policy (threshold 0.0: every score is
unsafe; 1.0: every score < 1 is safe) or by a rule-based guard backend whose score is known
(``KeywordBackend``: P(unsafe) = 1 when the checked text contains a word, else 0).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from visguard_testing.backends import keyword_guard

from visguard import (
    AuditLog,
    Backend,
    Generation,
    Guard,
    GuardedResult,
    GuardrailViolation,
    InputError,
    Policy,
    load_images,
)
from visguard.default_plugins.transformers_host import TransformersHost
from visguard.default_plugins.visguard_format import VisguardFormat
from visguard.hosting.guarded import DEFAULT_REFUSAL, STREAM_REFUSAL_SEPARATOR, UNNAMED_CATEGORY

REFUSAL = DEFAULT_REFUSAL.format(category=UNNAMED_CATEGORY)
TEXT = "describe the image"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def guard(qwen_path) -> Guard:
    """The tiny guard model with the default policy (threshold 0.5)."""
    return Guard.from_pretrained(qwen_path)


@pytest.fixture(scope="module")
def host(qwen_path) -> TracingHost:
    return TracingHost(qwen_path, max_new_tokens=12)


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (48, 40), (200, 30, 30))


class TracingHost(TransformersHost):
    """The real transformers host, counting calls and the pieces each stream produced."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.streams: list[dict] = []
        self._count_lock = threading.Lock()

    def generate(self, images, text, **gen_kwargs):
        with self._count_lock:
            self.calls += 1
        return super().generate(images, text, **gen_kwargs)

    def stream(self, images, text, *, cancel=None, **gen_kwargs):
        record = {"pieces": [], "done": threading.Event()}
        with self._count_lock:
            self.calls += 1
            self.streams.append(record)
        try:
            for piece in super().stream(images, text, cancel=cancel, **gen_kwargs):
                record["pieces"].append(piece)
                yield piece
        finally:
            record["done"].set()


class TokenCounter(LogitsProcessor):
    """Counts generation steps (one per new token) and leaves the scores as they are."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        return scores


def long_generation() -> tuple[TokenCounter, dict]:
    """Generation kwargs for exactly 400 new tokens unless cancelled, and their step counter."""
    counter = TokenCounter()
    return counter, {"max_new_tokens": 400, "min_new_tokens": 400, "logits_processor": LogitsProcessorList([counter])}


class CountingCallable:
    """A plain callable host ``(images, text) -> iterator of str`` around the real model."""

    def __init__(self, model: TransformersHost) -> None:
        self.model = model
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, images, text, **gen_kwargs):
        with self._lock:
            self.calls += 1
        return self.model.stream(load_images(images), text, **gen_kwargs)


# ------------------------------------------------------------------ sequential pre-check
def test_sequential_block_never_calls_the_host(guard, host, image, tmp_path):
    counting = CountingCallable(host)
    audit = tmp_path / "audit.jsonl"
    with guard.with_policy(threshold=0.0).wrap(counting, audit=audit) as guarded:
        result = guarded.generate([image], TEXT)
    assert counting.calls == 0
    assert isinstance(result, GuardedResult)
    assert result.blocked and result.flagged and not result.allowed
    assert (result.reason, result.stage) == ("unsafe", "input")
    assert result.text == result.refusal == REFUSAL
    assert result.response is None and not result.host_called and result.output_verdict is None
    assert result.input_verdict.label == "unsafe" and 0.0 < result.input_verdict.score < 1.0
    assert result.timings.pre_check_ms > 0 and result.timings.host_ms is None and result.timings.post_check_ms is None
    records = AuditLog.read(audit)
    assert [(r["stage"], r["label"], r["action"]) for r in records] == [("input", "unsafe", "block")]
    assert records[0]["request_id"] == result.request_id


def test_safe_request_returns_the_hosts_answer(guard, host, image):
    expected = host.generate(load_images([image]), TEXT)
    calls = host.calls
    result = guard.with_policy(threshold=1.0).wrap(host).generate([image], TEXT)
    assert host.calls == calls + 1
    assert not result.blocked and not result.flagged and not result.degraded
    assert result.text == result.response == expected
    assert result.input_verdict.label == result.output_verdict.label == "safe"
    assert result.output_verdict.stage == "output" and result.output_checks == 1
    t = result.timings
    assert t.pre_check_ms > 0 and t.host_ms > 0 and t.post_check_ms > 0
    assert t.total_ms >= t.pre_check_ms + t.host_ms + t.post_check_ms - 1.0


def test_refusal_template_cites_the_category_and_may_be_a_function(host, image):
    kw_guard, _ = keyword_guard("forbidden")
    cited = kw_guard.wrap(host, refusal="No ({label} at the {stage} check): {category}.")
    assert cited.generate([image], "forbidden thing").text == f"No (unsafe at the input check): {UNNAMED_CATEGORY}."
    custom = kw_guard.wrap(host, refusal=lambda v: f"blocked with P(unsafe)={v.score:.1f}")
    assert custom.generate([image], "forbidden thing").text == "blocked with P(unsafe)=1.0"
    with pytest.raises(InputError, match="bad message template"):
        kw_guard.wrap(host, refusal="I can't: {reason}")
    with pytest.raises(InputError, match="pre_check"):
        kw_guard.wrap(host, pre_check="sometimes")


class ScriptedReasonBackend(Backend):
    """A reason-mode guard backend whose generated text is known (no scores)."""

    name = "scripted"
    model_id = "scripted-guard"

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def supports_scores(self) -> bool:
        return False

    def score(self, prompts):
        raise NotImplementedError

    def generate(self, prompts, *, max_new_tokens):
        return [Generation(text=self.text) for _ in prompts]


def test_refusal_cites_the_category_the_guard_named(host, image):
    backend = ScriptedReasonBackend("Image 1: a knife.\nReasoning: weapons.\nVerdict: unsafe\nCategory: Violent / Weapon-Related Violence")
    reason_guard = Guard(backend, VisguardFormat(), Policy(mode="reason"))
    result = reason_guard.wrap(host).generate([image], TEXT)
    assert result.blocked and result.input_verdict.category == "Violent"
    assert result.text == "I can't help with that: it may involve Violent."


# ------------------------------------------------------------------ post-check
def test_post_check_block_replaces_the_answer(host, image):
    answer = host.generate(load_images([image]), TEXT)
    word = answer.split()[-1]  # a word only the host's answer contains
    assert word not in TEXT
    kw_guard, backend = keyword_guard(word)
    calls = host.calls
    result = kw_guard.wrap(host).generate([image], TEXT)
    assert host.calls == calls + 1
    assert result.blocked and (result.reason, result.stage) == ("unsafe", "output")
    assert result.text == REFUSAL and result.response is None
    assert result.input_verdict.label == "safe" and result.output_verdict.label == "unsafe"
    assert [(stage, score) for stage, _, score in backend.seen] == [("input", 0.0), ("output", 1.0)]
    assert backend.seen[1][1] == answer  # the post-check judged the full answer


def test_on_unsafe_raise_and_return(guard, host, image):
    unsafe = guard.with_policy(threshold=0.0)
    counting = CountingCallable(host)
    with pytest.raises(GuardrailViolation) as info:
        unsafe.wrap(counting, on_unsafe="raise").generate([image], TEXT)
    assert info.value.verdict.label == "unsafe" and info.value.verdict.stage == "input"
    assert counting.calls == 0

    expected = host.generate(load_images([image]), TEXT)
    result = unsafe.wrap(host, on_unsafe="return").generate([image], TEXT)
    assert not result.blocked and result.flagged and (result.reason, result.stage) == ("unsafe", "input")
    assert result.text == result.response == expected  # the caller decides
    assert result.refusal == REFUSAL
    assert result.input_verdict.label == result.output_verdict.label == "unsafe"


# ------------------------------------------------------------------ parallel pre-check
def test_parallel_block_discards_and_cancels_the_host(guard, host, image):
    counter, long = long_generation()
    streams = len(host.streams)
    result = guard.with_policy(threshold=0.0).wrap(host, pre_check="parallel").generate([image], TEXT, **long)
    assert result.blocked and (result.reason, result.stage) == ("unsafe", "input")
    assert result.text == REFUSAL and result.response is None and result.output_verdict is None
    assert result.host_called and result.host_cancelled
    (record,) = host.streams[streams:]
    assert record["done"].wait(30), "the cancelled host did not stop"
    assert counter.steps < 400


def test_parallel_never_returns_text_of_a_blocked_request_from_a_plain_callable(guard, host, image):
    counting = CountingCallable(host)
    guarded = guard.with_policy(threshold=0.0).wrap(counting, pre_check="parallel")
    for _ in range(3):
        result = guarded.generate([image], TEXT)
        assert result.blocked and result.text == REFUSAL and result.response is None
    assert counting.calls <= 3


def test_parallel_safe_answer_matches_sequential(guard, host, image):
    safe = guard.with_policy(threshold=1.0)
    sequential = safe.wrap(host).generate([image], TEXT)
    parallel = safe.wrap(host, pre_check="parallel").generate([image], TEXT)
    assert parallel.text == parallel.response == sequential.text
    assert parallel.input_verdict.label == parallel.output_verdict.label == "safe"
    assert not parallel.host_cancelled


# ------------------------------------------------------------------ streaming
def test_stream_releases_the_whole_answer_when_every_check_passes(guard, host, image, tmp_path):
    expected = host.generate(load_images([image]), TEXT)
    audit = AuditLog(tmp_path / "a.jsonl")
    guarded = guard.with_policy(threshold=1.0).wrap(host, stream_check_every=4, audit=audit)
    stream = guarded.stream([image], TEXT)
    assert stream.result is None
    pieces = list(stream)
    audit.close()
    assert "".join(pieces) == expected == stream.result.text == stream.result.response
    assert len(pieces) >= 2 and stream.result.output_checks == len(pieces)
    records = AuditLog.read(audit.path)
    assert [r["stage"] for r in records] == ["input"] + ["output"] * len(pieces)
    # Every check but the last was of a partial answer (the last may be too, if it already saw the end).
    assert all(r["partial"] for r in records[1:-1]) and all(r["label"] == "safe" for r in records)


def test_stream_never_releases_text_that_failed_a_check(host, image):
    # The first 60 tokens of the long answer (EOS is suppressed the same way for 60 steps).
    reference = list(host.stream(load_images([image]), TEXT, max_new_tokens=60, min_new_tokens=60))
    full = "".join(reference)
    # A word that first shows up a few pieces into the answer.
    word = next(p.strip() for i, p in enumerate(reference) if i >= 5 and p.strip() and p.strip() not in "".join(reference[:i]))
    kw_guard, backend = keyword_guard(word)
    streams = len(host.streams)
    counter, kwargs = long_generation()
    stream = kw_guard.wrap(host, stream_check_every=2).stream([image], TEXT, **kwargs)
    out = list(stream)
    result = stream.result
    assert result.blocked and (result.reason, result.stage) == ("unsafe", "output")
    released = "".join(out[:-1])
    assert out[-1] == (STREAM_REFUSAL_SEPARATOR if released else "") + REFUSAL
    assert result.text == "".join(out) and result.response is None
    assert word not in released and full.startswith(released)
    # Each released prefix was judged safe before it went out; the failing text never went out.
    judged = {text: score for stage, text, score in backend.seen if stage == "output"}
    prefix = ""
    for piece in out[:-1]:
        prefix += piece
        assert judged[prefix] == 0.0
    failed = [text for text, score in judged.items() if score == 1.0]
    assert len(failed) == 1 and failed[0].startswith(released) and len(failed[0]) > len(released)
    assert result.host_cancelled
    assert host.streams[streams]["done"].wait(30) and counter.steps < 400


def test_stream_checks_at_sentence_ends(image):
    script = ["One", " sentence.", " Then", " another", " one!", " And", " an", " end"]

    def fast_host(images, text):  # every piece at once: checkpoints still fall at each sentence end
        yield from script

    kw_guard, backend = keyword_guard("forbidden")
    stream = kw_guard.wrap(fast_host, stream_check_every=100, stream_check_min_pieces=1).stream([image], TEXT)
    assert list(stream) == ["One sentence.", " Then another one!", " And an end"]
    assert stream.result.output_checks == 3
    assert [text for stage, text, _ in backend.seen if stage == "output"] == [
        "One sentence.", "One sentence. Then another one!", "One sentence. Then another one! And an end"
    ]


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_stream_checkpoints_are_counted_in_pieces_not_time(image, driver):
    # A host whose pieces are all queued before the first check: the cadence must not collapse
    # into one final check (it did when the driver drained the queue between checks).
    script = ["a", " b", " c", " d", " e"]
    kw_guard, backend = keyword_guard("forbidden")
    guarded = kw_guard.wrap(lambda images, text: iter(script), stream_check_every=2, stream_check_sentences=False)
    if driver == "sync":
        stream = guarded.stream([image], TEXT)
        pieces = list(stream)
    else:
        async def collect():
            s = guarded.astream([image], TEXT)
            return [p async for p in s], s

        pieces, stream = asyncio.run(collect())
    assert pieces == ["a b", " c d", " e"]
    assert stream.result.output_checks == 3
    assert [text for stage, text, _ in backend.seen if stage == "output"] == ["a b", "a b c d", "a b c d e"]


def test_stream_blocked_by_parallel_pre_check_releases_only_the_refusal(guard, host, image):
    stream = guard.with_policy(threshold=0.0).wrap(host, pre_check="parallel").stream([image], TEXT)
    assert list(stream) == [REFUSAL]
    assert stream.result.blocked and stream.result.stage == "input"


def test_stream_raise_after_released_text(host, image):
    reference = list(host.stream(load_images([image]), TEXT))
    word = next(p.strip() for i, p in reversed(list(enumerate(reference)))
                if p.strip() and p.strip() not in "".join(reference[:i]))
    kw_guard, _ = keyword_guard(word)
    stream = kw_guard.wrap(host, stream_check_every=1, on_unsafe="raise").stream([image], TEXT)
    got = []
    with pytest.raises(GuardrailViolation) as info:
        for piece in stream:
            got.append(piece)
    assert info.value.verdict.stage == "output"
    assert word not in "".join(got)


def test_closing_a_stream_early_cancels_the_host(guard, host, image):
    streams = len(host.streams)
    counter, kwargs = long_generation()
    stream = guard.with_policy(threshold=1.0).wrap(host, stream_check_every=1).stream([image], TEXT, **kwargs)
    assert next(stream)
    stream.close()
    assert host.streams[streams]["done"].wait(30) and counter.steps < 400
    assert stream.result is None  # it never ended normally


# ------------------------------------------------------------------ async twins
def test_async_generate_and_stream(guard, host, image):
    import asyncio

    expected = host.generate(load_images([image]), TEXT)
    safe = guard.with_policy(threshold=1.0).wrap(host, stream_check_every=3)
    blocked = guard.with_policy(threshold=0.0).wrap(host, pre_check="parallel")

    async def main():
        result = await safe.agenerate([image], TEXT)
        stream = safe.astream([image], TEXT)
        pieces = [p async for p in stream]
        refused = await blocked.agenerate([image], TEXT)
        bstream = blocked.astream([image], TEXT)
        bpieces = [p async for p in bstream]
        return result, pieces, stream.result, refused, bpieces

    async def close_early():
        counter, kwargs = long_generation()
        stream = safe.astream([image], TEXT, **kwargs)
        first = await stream.__anext__()
        await stream.aclose()
        return first, counter, stream.result

    result, pieces, sresult, refused, bpieces = asyncio.run(main())
    streams = len(host.streams)
    first, counter, unfinished = asyncio.run(close_early())
    assert first and unfinished is None
    assert host.streams[streams]["done"].wait(30) and counter.steps < 400
    assert result.text == expected and result.output_verdict.label == "safe"
    assert "".join(pieces) == expected and sresult.output_checks == len(pieces) >= 2
    assert refused.blocked and refused.text == REFUSAL and refused.response is None
    assert bpieces == [REFUSAL]
