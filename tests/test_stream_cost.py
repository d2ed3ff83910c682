"""Issue 26, streaming: re-checks at a bounded cadence (one rule for guarded streams, the chat proxy
and the Responses proxy) and a total cost that grows linearly with the answer.

The cadence: a re-check once ``stream_check_every`` new pieces arrived, or at a sentence end once
``stream_check_min_pieces`` did (``visguard.hosting.guarded.StreamCadence``). Before, every sentence
end re-checked, so an answer of short sentences cost one check per sentence whatever its length.
The cost: ``scripts/stream_cost.py`` streams answers through a guarded host on a tiny real Qwen2-VL
guard (transformers backend, KV cache) and reads ``backend.cache_stats``; its table is in
docs/guarding.md.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
from PIL import Image
from recording_upstream import UPSTREAM_MODEL, responses_sse, sse_lines, start_recording_upstream
from test_endpoint_transparent import chunk, raw_stream, start_proxy
from test_responses_api import raw_events, text_events
from visguard_testing.backends import KeywordBackend, keyword_guard

from visguard.hosting.guarded import GuardedOptions, StreamCadence

SHORT = [" Yes.", " No."]  # sentences of one piece each: the old rule re-checked after every one


def _short_answer(sentences: int) -> list[str]:
    return [SHORT[i % 2] for i in range(sentences)]


def test_cadence_rule():
    cadence = StreamCadence(16, 8)
    due = []
    for i in range(40):
        cadence.add(" Yes." if i % 3 == 2 else " word")  # a sentence end every third piece
        due.append(cadence.due())
        if due[-1]:
            cadence.reset()
    # sentence ends at pieces 3, 6, 9, ...: the first one at least 8 pieces after the last check
    assert [i + 1 for i, d in enumerate(due) if d] == [9, 18, 27, 36]
    by_count = StreamCadence(4, 8)
    for _ in range(3):
        by_count.add(" word")
    assert not by_count.due()
    by_count.add(" word")
    assert by_count.due()  # every 4 pieces, sentence or not
    off = StreamCadence(100, 1, sentences=False)
    off.add("End.")
    assert not off.due()
    with pytest.raises(ValueError):
        StreamCadence(0, 8)
    assert GuardedOptions().stream_check_min_pieces == 8 and GuardedOptions().stream_check_every == 16


def test_guarded_stream_of_short_sentences_is_rechecked_at_most_once_per_min_pieces():
    guard, backend = keyword_guard("forbidden")
    answer = _short_answer(40)
    stream = guard.wrap(lambda images, text: iter(answer), pre_check="off").stream([Image.new("RGB", (8, 8))], "hi")
    assert "".join(stream) == "".join(answer)
    checked = [text for stage, text, _ in backend.seen if stage == "output"]
    # 40 one-piece sentences: a check every 8 pieces (5), not one a sentence (40); the last covers all
    assert stream.result.output_checks == len(checked) == 5
    assert checked[-1].strip() == "".join(answer).strip()


@pytest.fixture(scope="module")
def upstream():
    server, recorder = start_recording_upstream()
    yield server, recorder
    server.stop()


def test_chat_and_responses_proxies_use_the_same_cadence(upstream):
    server, backend = start_proxy(upstream[0].url, KeywordBackend("bomb"), stream_check_every=16,
                                  stream_check_min_pieces=8)
    try:
        answer = _short_answer(40)
        chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in answer]
        chunks.append(chunk({}, finish="stop"))
        upstream[1].script(sse_lines(copy.deepcopy(chunks)))
        got = raw_stream(server, {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "stream": True})
        assert "".join((c["choices"][0]["delta"].get("content") or "") for c in got if c.get("choices")) == "".join(answer)
        chat_checks = [text for stage, text, _ in backend.seen if stage == "output"]
        # 42 chunks: partial checks at 8-chunk sentence ends (5), then the final one
        assert len(chat_checks) == 6
        backend.seen.clear()
        upstream[1].script(responses_sse(text_events(answer)))
        events = raw_events(server, {"model": UPSTREAM_MODEL, "input": "hi", "stream": True})
        assert events[-1]["type"] == "response.completed"
        responses_checks = [text for stage, text, _ in backend.seen if stage == "output"]
        # 4 opening events + 40 deltas: sentence ends at the 8th, 16th ... event, then the final check
        assert len(responses_checks) == 6
    finally:
        server.stop()


def _stream_cost():
    path = Path(__file__).resolve().parents[1] / "scripts" / "stream_cost.py"
    spec = importlib.util.spec_from_file_location("stream_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_cost_grows_linearly_with_the_answer(qwen_path, one_torch_thread):
    """10 and 100 sentences (1,000 in the script: docs/guarding.md): computed tokens per sentence stay
    flat, far below re-computing the answer so far at every check, and the store holds one entry."""
    cost = _stream_cost()
    small, large = cost.measure(10, path=qwen_path), cost.measure(100, path=qwen_path)
    assert small["checks"] >= 5 and large["checks"] >= 10 * small["checks"] - 10
    assert large["per_sentence"] < 1.5 * small["per_sentence"]
    # re-computing the answer so far at every check would cost about checks/2 x the whole answer
    whole = large["computed"] + large["reused"]  # every check's prompt together
    assert large["computed"] < whole / 10
    assert large["kv_entries"] == 1  # one growing entry: the old store kept one per re-check (up to 64)


class _ShortContextBackend(KeywordBackend):
    """A keyword guard whose model takes answers of at most ``limit`` characters (longer: too long)."""

    def __init__(self, limit: int) -> None:
        super().__init__("forbidden")
        self.limit, self.refusals = limit, 0

    def score(self, prompts):
        from visguard.core.errors import PromptTooLongError

        text = [p.messages[-1]["content"][-1]["text"] for p in prompts]
        too_long = {i: "too long" for i, t in enumerate(text) if len(t) > self.limit + 2_000}
        if too_long:
            self.refusals += 1
            raise PromptTooLongError(too_long)
        return super().score(prompts)


def test_stream_past_the_guards_context_keeps_its_window_size():
    """Past the guard's context, every re-check tried the largest window first; the windows of it that
    fitted (the answer's short tail) were computed before the batch was refused, from scratch each time:
    quadratic on the tiny Qwen2-VL (538 tokens a sentence at 1,000 sentences against 40 at 100). A
    stream now starts each re-check at the window size that fitted the last one."""
    from visguard import Guard
    from visguard.default_plugins.visguard_format import VisguardFormat

    backend = _ShortContextBackend(limit=3_000)
    guard = Guard(backend, VisguardFormat())
    answer = [" " + "word " * 9 + "end." for _ in range(200)]  # 10,000 characters, 200 sentences
    stream = guard.wrap(lambda images, text: iter(answer), pre_check="off", stream_check_every=20,
                        stream_check_sentences=False).stream([Image.new("RGB", (8, 8))], "hi")
    assert "".join(stream) == "".join(answer)
    assert stream.result.output_checks == 10
    # the first re-check past 3,000 characters halves 32,000 -> 16,000 -> 8,000 -> 4,000 (refused) -> 2,000
    # (fits), and the later re-checks start at 2,000 (before: all four tries again at each of them)
    assert backend.refusals <= 4
