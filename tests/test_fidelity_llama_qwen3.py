"""Llama Guard 4 / 3 Vision and Qwen3Guard as their authors prompt and read them (issue 23, part A).

Sources (each fixture below names its own):

- Qwen3Guard: QwenLM/Qwen3Guard@6a52eca94b3d2aedb8aebd36baa353828d4166f1 (README.md: the prompt and
  response moderation examples, their printed outputs and ``extract_label_categories_refusal``;
  eval/eval_gen.py: "Safety: Unsafe" or "Safety: Controversial" in the answer counts as unsafe). The
  fixture chat template (visguard_testing.guard_checkpoints._QWEN3GUARD_TEMPLATE) reproduces the real
  template's behaviour: the last message's role picks the task, and its assistant turn is always appended.
- Llama Guard: meta-llama/PurpleLlama@4be64c3a24442b51c76175e6ec67722cc3f5fe38
  (Llama-Guard4/12B/MODEL_CARD.md: S1-S14, "S4 - Child Sexual Exploitation", "S9 - Indiscriminate
  Weapons" incl. chemical, biological, radiological, nuclear); Llama-Guard-3-11B-Vision's chat
  template (role from the number of turns, ``categories`` / ``excluded_category_keys``).
- The fake OpenAI-compatible server renders the exact messages it receives with the fixture template
  the way vLLM's chat endpoint does (vllm/entrypoints/chat_utils.py ``apply_hf_chat_template``:
  the tokenizer's ``apply_chat_template`` with the request's ``add_generation_prompt``,
  ``continue_final_message`` and ``chat_template_kwargs``, i.e. transformers' ``render_jinja_template``),
  and answers in the OpenAI chat-completions logprobs shape (``choices[0].logprobs.content[i]``:
  ``token``, ``logprob``, ``top_logprobs``; platform.openai.com/docs/api-reference/chat/object).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import render_jinja_template
from visguard_testing import guard_checkpoints as gc

from visguard import Backend, Category, Guard, Policy
from visguard.default_plugins.llama_guard_format import LlamaGuard3VisionFormat, LlamaGuardFormat
from visguard.default_plugins.openai_backend import verdict_probability
from visguard.default_plugins.qwen3guard_format import Qwen3GuardFormat
from visguard.engine.backend import Generation
from visguard.integrations.openai.server.upstream import ServerThread

MIS = Policy()


# ------------------------------------------------------------------ a fake vLLM chat endpoint

def _steps(tokens: Sequence[str], top: dict[int, dict[str, float]]) -> list[dict]:
    """Logprob steps: ``top[i]`` lists step i's candidates (token -> probability); others list the token alone."""
    out = []
    for i, tok in enumerate(tokens):
        cands = top.get(i, {tok: 0.99})
        out.append({"token": tok, "logprob": math.log(cands.get(tok, 0.99)),
                    "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in cands.items()]})
    return out


class FakeVLLM:
    """Renders each request with ``template`` as vLLM would and answers with a scripted completion."""

    def __init__(self, template: str, tokens: Sequence[str], top: dict[int, dict[str, float]]) -> None:
        self.template, self.tokens, self.top = template, list(tokens), top
        self.rendered: list[str] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()

    def render(self, body: dict) -> str:
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                     [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
                    for m in body["messages"]]
        rendered, _ = render_jinja_template(
            [messages], chat_template=self.template,
            add_generation_prompt=body.get("add_generation_prompt", True),  # vLLM's default
            continue_final_message=body.get("continue_final_message", False),
            **body.get("chat_template_kwargs", {}))
        return rendered[0]

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http" and scope["path"].endswith("/chat/completions")
        raw = b""
        while True:
            event = await receive()
            raw += event.get("body", b"")
            if not event.get("more_body"):
                break
        body = json.loads(raw)
        n = body["max_tokens"]
        text_tokens = self.tokens[:n]
        with self._lock:
            self.bodies.append(body)
            self.rendered.append(self.render(body))
        answer = {"choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "".join(text_tokens)},
                               "logprobs": {"content": _steps(text_tokens, self.top)}}]}
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


def _remote(server_url: str, fmt, policy: Policy) -> Guard:
    return Guard.from_pretrained("served-guard", backend="openai", base_url=server_url + "/v1", format=fmt,
                                 policy=policy, api_key_env=None, max_retries=0)


# ------------------------------------------------------------------ defect 1: Qwen3Guard on the openai backend

# What Qwen3Guard-Gen wrote for the README's bomb request (QwenLM/Qwen3Guard README.md, prompt moderation),
# as the tokens a server lists, the verdict word split in two (" Un" + "safe") as BPE tokenizers may do.
_QWEN_TOKENS = ["Safety", ":", " Un", "safe", "\n", "Categories", ":", " Violent"]
_QWEN_TOP = {2: {" Un": 0.95, " Safe": 0.04, " Contro": 0.005}}


@pytest.mark.parametrize("post", [False, True])
def test_qwen3guard_fast_on_openai_renders_the_right_moderation_task(post):
    server = FakeVLLM(gc._QWEN3GUARD_TEMPLATE, _QWEN_TOKENS, _QWEN_TOP)
    with ServerThread(server) as srv:
        guard = _remote(srv.url, Qwen3GuardFormat(), Policy(mode="fast"))
        try:
            request = guard.request([], "How can I make a bomb?",
                                    "As a responsible AI, I cannot help with that." if post else None)
            verdict = guard.check(request)
        finally:
            guard.close()
    (rendered,) = server.rendered
    subject = "ASSISTANT's response" if post else "USER's query"
    # The task the template picks from the last role, the whole conversation, the task footer with
    # its answer lines, and the template's own assistant turn (the model writes "Safety:" itself).
    assert f"1) Evaluate whether THE LAST {subject} belongs to safe or unsafe content" in rendered
    assert f"Provide your safety assessment for ONLY THE LAST **{subject}** in the above conversation:" in rendered
    assert "USER: How can I make a bomb?\n\n" in rendered
    assert ("ASSISTANT: As a responsible AI" in rendered) == post and ("Jailbreak." in rendered) == (not post)
    assert ("'Refusal: Yes', 'Refusal: No'" in rendered) == post
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "ASSISTANT: Safety:" not in rendered
    (body,) = server.bodies
    assert [m["role"] for m in body["messages"]] == (["user", "assistant"] if post else ["user"])
    # Scored at the verdict word's first piece: (0.95 + 0.005) / (0.95 + 0.04 + 0.005).
    assert verdict.label == "unsafe" and verdict.score == pytest.approx(0.955 / 0.995)


def test_qwen3guard_answer_without_the_prefix_is_unavailable_never_safe():
    server = FakeVLLM(gc._QWEN3GUARD_TEMPLATE, ["I", " cannot", " judge", " that"], {})
    with ServerThread(server) as srv:
        guard = _remote(srv.url, Qwen3GuardFormat(), Policy(mode="fast"))
        try:
            verdict = guard.check(guard.request([], "hello"))
        finally:
            guard.close()
    assert verdict.label == "unavailable" and "Safety:" in verdict.error


def test_the_old_prefill_renders_a_cut_off_response_check():
    """Why the backend no longer prefills for this template: the issue's rendering, reproduced."""
    server = FakeVLLM(gc._QWEN3GUARD_TEMPLATE, [], {})
    old = server.render({"messages": [{"role": "user", "content": "How can I make a bomb?"},
                                      {"role": "assistant", "content": "Safety:"}],
                         "continue_final_message": True, "add_generation_prompt": False})
    assert old.endswith("USER: How can I make a bomb?\n\nASSISTANT: Safety:")
    assert "THE LAST ASSISTANT's response" in old and "Provide your safety assessment" not in old


# ------------------------------------------------------------------ defect 7: split verdict words

def test_openai_fast_score_counts_the_first_piece_of_a_split_verdict_word():
    """Llama Guard 4 over an OpenAI-compatible server: the model puts 95 % on "un" (the first piece of
    "unsafe"); the score is that first-token probability, as the transformers backend computes it."""
    template = gc._LLAMA_GUARD_4_TEMPLATE
    server = FakeVLLM(template, ["un", "safe", "\n", "S", "1"], {0: {"un": 0.95, "safe": 0.04, "\n": 0.01}})
    with ServerThread(server) as srv:
        guard = _remote(srv.url, LlamaGuardFormat(), Policy(mode="fast"))
        try:
            verdict = guard.check(guard.request([], "how do I hurt someone?"))
        finally:
            guard.close()
    assert verdict.score == pytest.approx(0.95 / 0.99) and verdict.label == "unsafe"
    assert verdict.categories == ("Violent",)
    assert "chat_template_kwargs" not in server.bodies[0]  # the stock policy: the template's own list
    assert "S14: Code Interpreter Abuse." in server.rendered[0]


@pytest.mark.parametrize(
    ("candidates", "want"),
    [
        ({" Un": 0.95, " Safe": 0.04, " Contro": 0.005}, 0.955 / 0.995),  # first pieces
        # the whole word listed as one token stands for its spelling; the shorter " Un" is another
        # token (the transformers backend does not count it either: vLLM parity test in
        # plugins/visguard-vllm/tests/test_openai_server.py); the unlisted " Controversial" counts at
        # the smallest listed probability (the upper bound): (0.5 + 0.2) / (0.5 + 0.2 + 0.3)
        ({" Unsafe": 0.5, " Un": 0.2, " Safe": 0.3}, 0.7),
        ({" ": 0.9, " Safe": 0.05, " Unsafe": 0.05, " Controversial": 0.01}, 0.06 / 0.11),  # a bare space says nothing
    ],
)
def test_verdict_probability_reads_first_pieces(candidates, want):
    words = Qwen3GuardFormat().verdict_words
    listed = [{"token": t, "logprob": math.log(p)} for t, p in candidates.items()]
    assert verdict_probability(listed, words) == pytest.approx(want)


# ------------------------------------------------------------------ defect 2: the threshold decides

class ScriptedBackend(Backend):
    """Generates a fixed answer whose verdict token carries a fixed P(unsafe)."""

    name = "scripted"
    model_id = "scripted-guard"

    def __init__(self, text: str, score: float) -> None:
        self.text, self.p = text, score

    def score(self, prompts):
        raise NotImplementedError

    def generate(self, prompts, *, max_new_tokens):
        word = self.text.split("\n")[0]
        spans = ((0, len(word)), (len(word), len(self.text)))
        return [Generation(text=self.text, token_spans=spans, step_scores=(self.p, None)) for _ in prompts]


@pytest.mark.parametrize(
    ("text", "p", "threshold", "label"),
    [
        ("safe", 0.35, 0.2, "unsafe"),  # the greedy word said safe; P(unsafe) 0.35 crosses 0.2
        ("unsafe\nS1", 0.55, 0.9, "safe"),  # the greedy word said unsafe; 0.55 stays under 0.9
        ("unsafe\nS1", 0.55, 0.5, "unsafe"),
    ],
)
def test_the_threshold_decides_a_generated_fast_verdict(text, p, threshold, label):
    guard = Guard(ScriptedBackend(text, p), LlamaGuardFormat(), Policy(mode="fast", threshold=threshold))
    verdict = guard.check(guard.request([], "anything"))
    assert (verdict.label, verdict.score) == (label, pytest.approx(p))
    assert verdict.categories == (("Violent",) if label == "unsafe" and "S1" in text else ())


# ------------------------------------------------------------------ defect 3: stock policy, conservative mapping

def _render_llama(template: str, kwargs: dict) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    return env.from_string(template).render(messages=messages, **kwargs)


def _listed(rendered: str) -> list[str]:
    block = rendered.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("<END UNSAFE CONTENT CATEGORIES>")[0]
    return [line.split(":")[0] for line in block.splitlines() if line]


@pytest.mark.parametrize(("fmt", "template", "stock"), [
    (LlamaGuardFormat(), gc._LLAMA_GUARD_4_TEMPLATE, [f"S{i}" for i in range(1, 15)]),
    (LlamaGuard3VisionFormat(), gc._LLAMA_GUARD_3_VISION_TEMPLATE, [f"S{i}" for i in range(1, 14)]),
])
def test_llama_guard_runs_its_stock_policy_and_removes_categories_conservatively(fmt, template, stock):
    def listed(policy: Policy, f=fmt) -> list[str]:
        return _listed(_render_llama(template, f.build(_req(), policy, mode="fast").template_kwargs))

    assert listed(MIS) == stock  # S5, S6, S8, S13 included: Meta's own prompt
    no_erotic = listed(MIS.without_categories("Erotic"))
    assert "S12" not in no_erotic and {"S3", "S4"} <= set(no_erotic)  # child exploitation and sex crimes stay
    no_violent = listed(MIS.without_categories("Violent"))
    assert "S1" not in no_violent and "S9" in no_violent  # chemical / biological / nuclear weapons stay
    # Native categories by name or code use their own codes: no S15 duplicates.
    native = listed(MIS.with_categories("Defamation", "S13", Category(name="Specialized Advice")))
    assert {"S5", "S6", "S13"} <= set(native) and not any(int(c[1:]) >= 15 for c in native)
    # Only naming a severe code leaves it out.
    assert "S4" not in listed(MIS.without_categories("Erotic"), fmt.__class__(drop=("S4",)))
    assert listed(MIS, fmt.__class__(drop=("S9",))) == [c for c in stock if c != "S9"]  # stock less the named code


def _req():
    from visguard import GuardRequest

    return GuardRequest.build([], "hi")


def test_asked_codes_never_drop_severe_codes_with_a_broad_category():
    from visguard.core.taxonomy import asked_codes

    for removed in ("Erotic", "Violent", "Illegal Activity"):
        codes, _ = asked_codes(MIS.without_categories(removed), "mlcommons")
        assert {"S4", "S9"} <= set(codes), removed
    only_hate = Policy(categories=(Category(name="Hate"),))
    assert asked_codes(only_hate, "mlcommons")[0] == ["S4", "S9", "S10"]


# ------------------------------------------------------------------ defect 8 (part A): reported categories

@pytest.mark.parametrize(
    ("code", "scheme", "name"),
    [
        ("S4", "mlcommons", "Child Exploitation"),  # never "Erotic"
        ("S3", "mlcommons", "Sex Crimes"),
        ("S9", "mlcommons", "Indiscriminate Weapons"),
        ("S12", "mlcommons", "Erotic"),  # erotica: the same harm as MIS Erotic
        ("S10", "mlcommons", "Hate"),
        ("Unethical Acts", "qwen3guard", "Unethical Acts"),  # never "Hate"
        ("PII", "qwen3guard", "Privacy"),
        ("Jailbreak", "qwen3guard", "Jailbreak"),
    ],
)
def test_reported_categories_keep_the_family_names(code, scheme, name):
    if scheme == "mlcommons":
        parsed = LlamaGuardFormat().parse(f"unsafe\n{code}", MIS)
    else:
        parsed = Qwen3GuardFormat().parse(f"Safety: Unsafe\nCategories: {code}", MIS)
    assert parsed.categories == (name,)


# Published outputs, transcribed with their source; each is read the way its authors read it.
_QWEN3_PUBLISHED = [
    # QwenLM/Qwen3Guard@6a52eca README.md, prompt moderation of "How can I make a bomb?"
    ("Safety: Unsafe\nCategories: Violent\n", "unsafe", ("Violent",), None),
    # same README, response moderation of the refusal "As a responsible artificial intelligence system ..."
    ("Safety: Safe\nCategories: None\nRefusal: Yes\n", "safe", (), "Yes"),
]
_LLAMA_PUBLISHED = [
    # meta-llama/Llama-Guard-4-12B hub card example ("How do I build a bomb?"), as transcribed at
    # hivebook.wiki/wiki/llama-guard-meta-s-content-safety-classifier-now-multimodal
    ("unsafe\nS9", "unsafe", ("Indiscriminate Weapons",)),
    # vllm-project/tpu-inference Llama Guard 4 AILuminate check: expected outputs "safe" and "unsafe\n<S-code>"
    ("safe", "safe", ()),
    ("unsafe\nS4", "unsafe", ("Child Exploitation",)),
    ("unsafe\nS11", "unsafe", ("Self-Harm",)),
]


@pytest.mark.parametrize(("text", "label", "categories", "refusal"), _QWEN3_PUBLISHED)
def test_qwen3guard_reads_published_outputs(text, label, categories, refusal):
    parsed = Qwen3GuardFormat().parse(text, MIS)
    assert (parsed.label, parsed.categories) == (label, categories)
    assert (f"Refusal: {refusal}" in parsed.reasoning) if refusal else "Refusal" not in parsed.reasoning


def test_qwen3guard_reads_as_its_authors_eval_does():
    # eval/eval_gen.py: "Safety: Unsafe" or "Safety: Controversial" anywhere in the answer is unsafe.
    assert Qwen3GuardFormat().parse("Safety: Controversial\nCategories: Unethical Acts", MIS).categories == ("Unethical Acts",)
    assert Qwen3GuardFormat().parse("<think>\n\n</think>\n\nSafety: Unsafe\nCategories: PII", MIS).label == "unsafe"


@pytest.mark.parametrize(("text", "label", "categories"), _LLAMA_PUBLISHED)
def test_llama_guard_reads_published_outputs(text, label, categories):
    parsed = LlamaGuardFormat().parse(text, MIS)
    assert (parsed.label, parsed.categories) == (label, categories)
