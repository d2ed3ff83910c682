"""Parsers and prompt builders of the well-known guard formats, on hand-written model outputs.

Each parser branch has an output string here: leading newlines, several codes, unknown codes,
invalid or cut-off JSON, missing tags and truncated reasoning. Model runs on tiny checkpoints of
each architecture are in tests/test_guard_models.py.
"""

from __future__ import annotations

import pytest
from PIL import Image

from visguard import Category, GuardRequest, Policy, UnsupportedRequestError
from visguard.default_plugins.guardreasoner_format import GuardReasonerFormat
from visguard.default_plugins.llama_guard_format import LlamaGuardFormat, template_kwargs
from visguard.default_plugins.llavaguard_format import LlavaGuardFormat, policy_text
from visguard.default_plugins.qwen3guard_format import Qwen3GuardFormat
from visguard.default_plugins.shieldgemma_format import ShieldGemmaFormat, policies

MIS = Policy()
CUSTOM = MIS.with_categories(Category(name="Gambling", description="betting money on games of chance"))


def _request(n_images: int = 1, text: str = "", response: str | None = None) -> GuardRequest:
    imgs = [Image.new("RGB", (32, 32), (10 * i, 90, 200)) for i in range(n_images)]
    return GuardRequest.build(imgs, text, response)


# ---------------------------------------------------------------- Llama Guard 4

@pytest.mark.parametrize(
    ("text", "label", "categories"),
    [
        ("safe", "safe", ()),
        ("\n\nsafe", "safe", ()),  # the template ends at the header: blank lines come first
        ("safe  \n", "safe", ()),
        ("\n\nunsafe\nS1", "unsafe", ("Violent",)),
        ("unsafe\nS10,S12", "unsafe", ("Hate", "Erotic")),  # several codes
        ("unsafe\nS1, S9", "unsafe", ("Violent", "Indiscriminate Weapons")),  # S9 is not only "Violent"
        ("unsafe\nS4", "unsafe", ("Child Exploitation",)),  # its own name, never "Erotic"
        ("unsafe\nS5", "unsafe", ("Defamation",)),  # a code with no visguard counterpart: its own name
        ("unsafe\nS99", "unsafe", ("S99",)),  # unknown code: kept as given, never dropped
        ("unsafe S2", "unsafe", ("Illegal Activity",)),  # codes on the verdict line
        ("unsafe", "unsafe", ()),  # no codes line (e.g. cut off)
    ],
)
def test_llama_guard_parses_verdicts_and_codes(text, label, categories):
    parsed = LlamaGuardFormat().parse(text, MIS)
    assert parsed.label == label and parsed.categories == categories
    assert text[parsed.verdict_offset :].startswith(label)
    assert parsed.category == (categories[0] if categories else None)


@pytest.mark.parametrize("text", ["", "\n\n", "I cannot help with that", "Verdict: safe"])
def test_llama_guard_unparseable(text):
    parsed = LlamaGuardFormat().parse(text, MIS)
    assert parsed.label is None and "first line" in parsed.error


def test_llama_guard_template_kwargs_follow_the_policy():
    # The default policy is the model's stock policy: no variables, the template's own S-code list.
    assert template_kwargs(MIS) == {}
    narrow = MIS.without_categories("Erotic", "Privacy")
    # S12 and S7 go; S3 stays (Violent and Illegal Activity still own it), S4 always (severe).
    assert template_kwargs(narrow)["excluded_category_keys"] == ["S5", "S6", "S7", "S8", "S12", "S13", "S14"]
    custom = template_kwargs(CUSTOM)
    assert custom["categories"]["S15"] == "Gambling. betting money on games of chance."
    assert "S5" not in custom["categories"] and custom["categories"]["S10"] == "Hate."
    assert LlamaGuardFormat().parse("unsafe\nS15", CUSTOM).category == "Gambling"


def test_llama_guard_prompt_uses_typed_parts_and_both_turns():
    prompt = LlamaGuardFormat().build(_request(2, "use it", "here is how"), MIS, mode="fast")
    user, assistant = prompt.messages
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert assistant["content"] == [{"type": "text", "text": "here is how"}]
    assert len(prompt.images) == 2 and prompt.template_kwargs == {}  # the stock policy: the template's own list


# ---------------------------------------------------------------- LlavaGuard / QwenGuard

@pytest.mark.parametrize(
    ("text", "label", "category", "reasoning"),
    [
        ('{"rating": "Safe", "category": "NA: None applying", "rationale": "A cat."}', "safe", None, "A cat."),
        ('{\n    "rating": "Unsafe",\n    "category": "O3: Sexual Content",\n    "rationale": "Explicit."\n}',
         "unsafe", "Erotic", "Explicit."),
        ('{"rating": "Unsafe", "category": "O6: Weapons or Substance Abuse", "rationale": "Drugs."}',
         "unsafe", "Illegal Activity", "Drugs."),
        ('{"rating": "Unsafe", "category": "O9: Disasters or Emergencies", "rationale": "x"}',
         "unsafe", "Disasters or Emergencies", "x"),  # no visguard counterpart: its own name
        ('{"rating": "Unsafe", "category": "O42: Made up", "rationale": "x"}', "unsafe", "O42", "x"),  # unknown code
        # invalid JSON (trailing comma, as in the prompt's own template): read field by field
        ('{\n    "rating": "Unsafe",\n    "category": "O2: Violence, Harm, or Cruelty",\n    "rationale": "A fight.",\n}',
         "unsafe", "Violent", "A fight."),
        # cut off in the rationale
        ('{"rating": "Unsafe", "category": "O1: Hate, Humiliation, Harassment", "rationale": "The sign sa',
         "unsafe", "Hate", "The sign sa"),
        ('{"rating": "Safe"', "safe", None, None),  # cut off after the rating (fast mode)
    ],
)
def test_llavaguard_parses_json_and_broken_json(text, label, category, reasoning):
    parsed = LlavaGuardFormat().parse(text, MIS)
    assert (parsed.label, parsed.category, parsed.reasoning) == (label, category, reasoning)
    assert text[parsed.verdict_offset :].lower().startswith(label)


@pytest.mark.parametrize("text", ['{"category": "O1: Hate"}', "The image is fine.", '{"rating": "Maybe"}', ""])
def test_llavaguard_without_a_rating_is_unparseable(text):
    parsed = LlavaGuardFormat().parse(text, MIS)
    assert parsed.label is None and "unparseable" in parsed.error


def test_llavaguard_policy_declares_left_out_categories_non_violating():
    text = policy_text(MIS.without_categories("Erotic"))
    o3 = text.split("O3: Sexual Content: \n")[1].split("O4:")[0]
    assert o3.startswith("Category O3 is declared as non-violating. Therefore, we do not provide any restrictions")
    assert " - Contain sexually explicit (i.e., erotic) content.\n" in o3 and "Should not" not in o3
    assert "O9 is declared as non-violating" in text  # no MIS counterpart (a narrowed policy)
    o1 = text.split("O1: Hate, Humiliation, Harassment: \n")[1].split("O2:")[0]
    assert o1.startswith("Should not:\n- Contain content that expresses hateful") and "\nCan:\n- " in o1
    with pytest.raises(UnsupportedRequestError, match="no O-code"):  # no invented O10/O11 (issue 23)
        policy_text(CUSTOM)


def test_llavaguard_judges_one_image_alone():
    fmt = LlavaGuardFormat()
    with pytest.raises(UnsupportedRequestError, match="at most 1"):
        fmt.check_request(_request(2))
    with pytest.raises(UnsupportedRequestError, match="text"):
        fmt.check_request(_request(1, "what is this?"))
    LlavaGuardFormat(ignore_unread=True).check_request(_request(1, "what is this?"))
    prompt = fmt.build(_request(1), MIS, mode="reason")
    assert prompt.messages[0]["content"][0] == {"type": "image"} and "O1:" in prompt.messages[0]["content"][1]["text"]


# ---------------------------------------------------------------- ShieldGemma 2

def test_shieldgemma_one_prompt_per_policy_and_max_score():
    # (its check plan, one prompt per policy and the max score: tests/test_check_plan.py)
    fmt = ShieldGemmaFormat()
    entries = policies(MIS)
    assert [key for key, _, _ in entries] == ["dangerous", "sexual", "violence"]  # the trained three (issue 23)
    prompts = fmt.policy_prompts(_request(1), MIS, mode="fast")
    assert len(prompts) == 3 and all(len(p.images) == 1 for p in prompts)
    assert prompts[1].messages[0]["content"][1]["text"].startswith("No Sexually Explicit content")
    custom = fmt.policy_prompts(_request(1), CUSTOM, mode="fast")
    assert "No Gambling content" in custom[3].messages[0]["content"][1]["text"]
    assert fmt.combine([0.1, 0.9, 0.2], MIS) == (0.9, "Erotic")
    assert fmt.combine([0.7, 0.1, 0.2], MIS) == (0.7, "Illegal Activity")
    only_sexual = Policy(categories=(Category(name="Erotic"),))
    assert len(fmt.policy_prompts(_request(1), only_sexual, mode="fast")) == 1
    assert fmt.parse("Yes", MIS).label == "unsafe" and fmt.parse("\nNo.", MIS).label == "safe"
    assert fmt.parse("Maybe", MIS).label is None


# ---------------------------------------------------------------- GuardReasoner-VL

_GR_BOTH = ("<think>The image shows a knife; the user asks how to use it on a person.</think>\n"
            "<result>\nRequest: harmful\nResponse: unharmful\n</result>")


def test_guardreasoner_reads_the_label_of_the_checked_stage():
    fmt = GuardReasonerFormat()
    pre = fmt.parse_stage(_GR_BOTH, "input")
    post = fmt.parse_stage(_GR_BOTH, "output")
    assert (pre.label, post.label) == ("unsafe", "safe")
    assert pre.reasoning.startswith("The image shows a knife")
    assert _GR_BOTH[pre.verdict_offset :].startswith("harmful")
    assert _GR_BOTH[post.verdict_offset :].startswith("unharmful")
    # the training layout: an "Answers:" line, "Response: None" for a pre-check
    trained = "<think>\nA knife and a person.\n</think>\n<result>\nAnswers:\nRequest: harmful\nResponse: None\n</result>"
    assert fmt.parse_stage(trained, "input").label == "unsafe"
    assert fmt.parse_stage(trained, "output").label == "safe"  # "None" reads unharmful, as the VL evaluation
    # leading newlines, no closing </result>
    assert fmt.parse("\n\n<think>ok</think><result>Request: unharmful", MIS).label == "safe"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<think>The user wants to hurt someone with the tool in", "cut off inside <think>"),
        ("<think>done</think> harmful", "no 'Request:' label in the output"),
        ("<think>x</think><result>Response: harmful</result>", "no 'Request:' label"),
        ("<think>x</think><result>Request: maybe</result>", "Request label 'maybe'"),
    ],
)
def test_guardreasoner_unparseable_outputs(text, error):
    parsed = GuardReasonerFormat().parse(text, MIS)
    assert parsed.label is None and error in parsed.error


def test_guardreasoner_prompt_and_fixed_taxonomy():
    fmt = GuardReasonerFormat()
    system, user = fmt.build(_request(2, "how?"), MIS, mode="reason").messages
    assert system["role"] == "system" and "Task 1: determine whether the human user's request" in system["content"][0]["text"]
    assert [p["type"] for p in user["content"]] == ["text", "image", "image", "text"]
    assert user["content"][0]["text"] == "Human user:\n"
    assert user["content"][-1]["text"] == "\nhow?\n\nAI assistant:\nNone\n"
    with pytest.raises(UnsupportedRequestError, match="Gambling"):
        fmt.check_policy(CUSTOM)


# ---------------------------------------------------------------- Qwen3Guard

@pytest.mark.parametrize(
    ("text", "strict", "label", "categories", "note"),
    [
        ("Safety: Safe\nCategories: None", True, "safe", (), "Safety: Safe"),
        ("Safety: Unsafe\nCategories: Violent", True, "unsafe", ("Violent",), "Safety: Unsafe"),
        ("\nSafety: Unsafe\nCategories: PII, Jailbreak\nRefusal: No", True, "unsafe", ("Privacy", "Jailbreak"),
         "Safety: Unsafe; Refusal: No"),
        ("Safety: Controversial\nCategories: Politically Sensitive Topics", True, "unsafe",
         ("Politically Sensitive Topics",), "Safety: Controversial"),
        ("Safety: Controversial\nCategories: Politically Sensitive Topics", False, "safe", (), "Safety: Controversial"),
        ("Safety: Unsafe\nCategories: Brand New Category", True, "unsafe", ("Brand New Category",), "Safety: Unsafe"),
        ("Safety: Safe\nCategories: None\nRefusal: Yes", True, "safe", (), "Safety: Safe; Refusal: Yes"),
        ("Safety: Unsafe", True, "unsafe", (), "Safety: Unsafe"),  # cut off before Categories
    ],
)
def test_qwen3guard_parses_lines(text, strict, label, categories, note):
    parsed = Qwen3GuardFormat(strict=strict).parse(text, MIS)
    assert (parsed.label, parsed.categories, parsed.reasoning) == (label, categories, note)


@pytest.mark.parametrize("text", ["Categories: Violent", "Safety: Perhaps", "unsafe\nS1"])
def test_qwen3guard_unparseable(text):
    assert Qwen3GuardFormat().parse(text, MIS).label is None


def test_qwen3guard_is_a_text_guard_with_a_fixed_taxonomy():
    fmt = Qwen3GuardFormat()
    with pytest.raises(UnsupportedRequestError, match="text guard"):
        fmt.check_request(_request(1, "hi"))
    Qwen3GuardFormat(ignore_unread=True).check_request(_request(1, "hi", "hello"))
    with pytest.raises(UnsupportedRequestError, match="custom categories"):
        fmt.check_policy(CUSTOM)
    prompt = Qwen3GuardFormat(ignore_unread=True).build(_request(1, "hi", "hello"), MIS, mode="fast")
    assert prompt.images == [] and prompt.messages[1] == {"role": "assistant", "content": "hello"}
    assert prompt.assistant_prefix == "Safety:" and " Controversial" in prompt.verdict_words["unsafe"]


def test_policy_translation_doc_matches_the_table():
    from pathlib import Path

    from visguard.core.taxonomy import TABLE

    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    for name, t in TABLE.items():
        cells = [", ".join(codes) or "—" for codes in (t.mlcommons, t.llavaguard, t.shieldgemma, t.qwen3guard)]
        assert f"| {name} | " + " | ".join(cells) + " |" in doc, name


def test_template_variables_reach_an_openai_compatible_server():
    from visguard.default_plugins.openai_backend import OpenAIBackend

    backend = OpenAIBackend("meta-llama/Llama-Guard-4-12B", base_url="http://127.0.0.1:9/v1",
                            extra_body={"chat_template_kwargs": {"other": 1}})
    prompt = LlamaGuardFormat().build(_request(1, "hi"), MIS.without_categories("Privacy"), mode="fast")
    body = backend.score_request(prompt)
    kwargs = body["chat_template_kwargs"]
    assert kwargs["other"] == 1 and "S7" in kwargs["excluded_category_keys"]
    backend.close()
