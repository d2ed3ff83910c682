"""The core ``openai`` backend against a real vLLM OpenAI-compatible server on loopback (CPU).

The server runs the tiny Qwen2-VL checkpoint; its scores must match the transformers backend on
the same checkpoint, and the documented top-N approximation must hold exactly as stated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from visguard import Guard, Policy
from visguard.default_plugins.openai_backend import verdict_probability

TOL = 1e-3
MODEL_NAME = "tiny-guard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(qwen_path, tmp_path_factory):
    port = _free_port()
    log_path = Path(tmp_path_factory.mktemp("vllm-server")) / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", qwen_path, "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4",
        "--limit-mm-per-prompt", json.dumps({"image": 2}),
        "--max-logprobs", "-1",  # lets a test ask for every candidate (exact comparison)
    ]
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"\nvLLM OpenAI server healthy after {time.perf_counter() - start:.1f} s")
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def vocab_size(qwen_path) -> int:
    config = json.loads((Path(qwen_path) / "config.json").read_text())
    return int(config.get("text_config", config).get("vocab_size") or config["vocab_size"])


def _requests(guard, images):
    return [
        guard.request(images, "Use the item in image 1 on the person in image 2."),
        guard.request(images, "Use the item in image 1 on the person in image 2.", "Sure, here is how to do it."),
        guard.request(images[:1], "What colour is this?"),
        guard.request(None, "A question without images."),
    ]


def test_fast_scores_match_transformers_when_all_spellings_are_listed(server, reference, images, vocab_size):
    guard = Guard.from_pretrained(MODEL_NAME, backend="openai", base_url=server, top_logprobs=vocab_size)
    try:
        requests = _requests(guard, images)
        start = time.perf_counter()
        got = guard.check_batch(requests)
        elapsed = time.perf_counter() - start
        want = reference.check_batch(requests)
    finally:
        guard.close()
    # Both sides must score (the transformers reference once failed its ragged batches: score None).
    assert all(v.label in ("safe", "unsafe") for v in got), [v.error for v in got]
    assert all(w.label in ("safe", "unsafe") for w in want), [w.error for w in want]
    diffs = [abs(g.score - w.score) for g, w in zip(got, want, strict=True)]
    print(f"\nopenai backend -> vLLM server, 4 fast checks: {elapsed * 1000:.0f} ms; |diff| = {diffs}")
    assert max(diffs) < TOL
    assert [g.label for g in got] == [w.label for w in want]


def _verdict_ranks(reference, request) -> tuple[list[int], list[int], list[float]]:
    """Ranks (1 = most likely) of the safe and unsafe verdict tokens in the transformers logits."""
    import torch

    backend = reference.backend
    prompt = reference.format.build(request, reference.policy, mode="fast", special_tokens=backend.special_tokens)
    safe_ids, unsafe_ids = backend.codec.verdict_token_ids(prompt.verdict_prefix, prompt.verdict_words)
    with torch.inference_mode():
        logits = backend.model(**backend.encode([prompt])).logits[0, -1].float()
    order = torch.argsort(logits, descending=True).tolist()
    rank = {tok: i + 1 for i, tok in enumerate(order)}
    logprobs = torch.log_softmax(logits, -1)
    return [rank[t] for t in safe_ids], [rank[t] for t in unsafe_ids], logprobs.tolist()


def test_top_n_approximation_is_the_documented_upper_bound(server, reference, images):
    request = reference.request(images, "Use the item in image 1 on the person in image 2.")
    safe_ranks, unsafe_ranks, logprobs = _verdict_ranks(reference, request)
    ranks = sorted(safe_ranks + unsafe_ranks)
    exact = reference.check(request).score

    # Fewer candidates than the best-ranked spelling: nothing to score with -> unavailable, never safe.
    if ranks[0] > 1:
        guard = Guard.from_pretrained(MODEL_NAME, backend="openai", base_url=server, top_logprobs=ranks[0] - 1)
        try:
            verdict = guard.check(request)
        finally:
            guard.close()
        assert verdict.label == "unavailable" and "no verdict spelling" in verdict.error

    # Exactly two spellings listed: the score is the stated upper bound, computed by hand here.
    n = ranks[1]
    guard = Guard.from_pretrained(MODEL_NAME, backend="openai", base_url=server, top_logprobs=n)
    try:
        got = guard.check(request).score
    finally:
        guard.close()
    order = sorted(range(len(logprobs)), key=lambda t: -logprobs[t])[:n]
    floor = min(2.718281828459045 ** logprobs[t] for t in order)
    backend = reference.backend
    safe_ids, unsafe_ids = backend.codec.verdict_token_ids("Verdict:", {"safe": (" safe", " Safe"), "unsafe": (" unsafe", " Unsafe")})
    listed = set(order)
    s = sum(2.718281828459045 ** logprobs[t] for t in safe_ids if t in listed)
    # an unlisted unsafe spelling counts with its longest listed first piece, else at the floor
    # (openai_backend.verdict_probability); whole safe spellings only
    text = {t: backend.tokenizer.decode([t]) for t in order}
    u, used = 0.0, {t for t in safe_ids + unsafe_ids if t in listed}
    for t in unsafe_ids:
        if t in listed:
            u += 2.718281828459045 ** logprobs[t]
            continue
        word = backend.tokenizer.decode([t])
        pieces = [c for c in order if c not in used and text[c].strip() and word.startswith(text[c])]
        if pieces:
            piece = max(pieces, key=lambda c: len(text[c]))
            used.add(piece)
            u += max(2.718281828459045 ** logprobs[piece], floor)
        else:
            u += floor
    assert got == pytest.approx(u / (s + u), abs=TOL)
    assert got >= exact - TOL  # never makes a request look safer than the exact restricted softmax


def test_reason_mode_generates_the_same_text_as_transformers(server, reference, images, vocab_size):
    guard = Guard.from_pretrained(MODEL_NAME, backend="openai", base_url=server, top_logprobs=vocab_size)
    try:
        request = guard.request(images, "Is it safe to combine these two things?")
        prompt = guard.format.build(request, guard.policy, mode="reason")
        [got] = guard.backend.generate([prompt], max_new_tokens=24)
        ref_prompt = reference.format.build(request, reference.policy, mode="reason", special_tokens=reference.backend.special_tokens)
        [want] = reference.backend.generate([ref_prompt], max_new_tokens=24)
        verdict = guard.with_policy(Policy(mode="reason", max_new_tokens=24)).check(request)
    finally:
        guard.close()
    assert got.text == want.text
    if got.step_scores:  # present when the server's token strings spell out the text exactly
        assert len(got.step_scores) == len(want.step_scores)
        pairs = [(a, b) for a, b in zip(got.step_scores, want.step_scores, strict=True) if a is not None]
        assert pairs and max(abs(a - b) for a, b in pairs) < TOL
    assert verdict.raw == want.text and verdict.label != "safe"


def test_candidate_matching_rules():
    words = {"safe": (" safe", " Safe"), "unsafe": (" unsafe", " Unsafe")}
    listed = [{"token": " safe", "logprob": -1.0}, {"token": " unsafe", "logprob": -2.0}, {"token": " Unsafe", "logprob": -3.0},
              {"token": " Safe", "logprob": -4.0}]
    import math

    e = [math.exp(-k) for k in (1, 2, 3, 4)]
    assert verdict_probability(listed, words) == pytest.approx((e[1] + e[2]) / sum(e))
    # The first piece of a spelling counts for it (" un" of " unsafe": the transformers backend's
    # first-token rule); a piece that starts spellings of both labels (" ") stands for nothing.
    pieces = [{"token": " safe", "logprob": -1.0}, {"token": " un", "logprob": -0.5}, {"token": " Unsafe", "logprob": -1.0},
              {"token": " ", "logprob": -0.5}]
    p_un, p_1 = math.exp(-0.5), math.exp(-1.0)
    assert verdict_probability(pieces, words) == pytest.approx((p_un + p_1) / (p_1 + p_un + p_1))
    # Unlisted unsafe spellings count at the smallest listed probability, unlisted safe ones at 0.
    partial = [{"token": " safe", "logprob": -1.0}, {"token": "x", "logprob": -3.0}]
    assert verdict_probability(partial, words) == pytest.approx(2 * e[2] / (e[0] + 2 * e[2]))
    assert verdict_probability([{"token": "hello", "logprob": -0.1}], words) is None
