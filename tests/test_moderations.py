"""`POST /v1/moderations` (issue 25): OpenAI's moderation endpoint answered by the configured guard.

Shapes from the `openai` package in .venv (openai 3.63.0: openai/types/moderation_create_params.py,
moderation_multi_modal_input_param.py, moderation.py, moderation_create_response.py), generated from
https://platform.openai.com/docs/api-reference/moderations. The guard is the rule-based keyword guard
of visguard_testing ("bomb" is unsafe), so every verdict is known.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image
from visguard_testing.backends import keyword_guard

from visguard import Policy
from visguard.core.types import Verdict
from visguard.integrations.openai.server.app import ServeSettings, create_app
from visguard.integrations.openai.server.moderations import (
    OPENAI_CATEGORY_NAMES,
    moderation_result,
    openai_category,
)
from visguard.integrations.openai.server.upstream import ServerThread


def png_url(size=(32, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    guard, backend = keyword_guard("bomb")
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    server = ServerThread(create_app(guard, settings=ServeSettings(max_wait_ms=0, audit=str(audit)))).start()
    yield server, backend, audit
    server.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_moderates_text_and_an_image(served):
    server, backend, audit = served
    image = png_url()
    result = client(server).moderations.create(
        model="omni-moderation-latest",
        input=[{"type": "text", "text": "how to build a bomb"}, {"type": "image_url", "image_url": {"url": image}}])
    assert len(result.results) == 1
    first = result.results[0]
    assert first.flagged is True
    assert first.category_applied_input_types.violence == ["text", "image"]
    assert set(first.categories.model_dump(by_alias=True)) >= set(OPENAI_CATEGORY_NAMES)
    assert backend.seen[-1] == ("input", "how to build a bomb", 1.0) and len(backend.images_seen[-1]) == 1
    assert result.model == "omni-moderation-latest"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert records[-1]["action"] == "block"


def test_a_list_of_strings_gets_one_result_each(served):
    server, _, _ = served
    result = client(server).moderations.create(input=["hello there", "a bomb", "nice weather"])
    assert [r.flagged for r in result.results] == [False, True, False]
    assert result.results[0].category_applied_input_types.hate == ["text"]
    assert all(s == 0.0 for s in result.results[0].category_scores.model_dump().values())


def test_a_single_string(served):
    server, _, _ = served
    result = client(server).moderations.create(input="hello")
    assert len(result.results) == 1 and result.results[0].flagged is False


@pytest.mark.parametrize("body", [
    {}, {"input": []}, {"input": 3}, {"input": ["a", {"type": "text", "text": "b"}]},
    {"input": [{"type": "input_audio", "data": "x"}]},
    {"input": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]},
])
def test_bad_inputs_are_openai_errors(served, body):
    server, _, _ = served
    r = httpx.post(server.url + "/v1/moderations", json=body, timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert "root:" not in r.text


def test_unavailable_guard_is_flagged_fail_closed(served):
    verdict = Verdict(label="unavailable", error="timeout", stage="input")
    result = moderation_result(verdict, Policy().action(verdict), has_text=True, has_image=False)
    assert result["flagged"] is True


def test_category_mapping_from_the_policy():
    assert openai_category("Violent") == "violence" and openai_category("Erotic") == "sexual"
    assert openai_category("Illegal Activity") == "illicit" and openai_category("Self-Harm") == "self-harm"
    assert openai_category("Hate") == "hate" and openai_category("Privacy") == "privacy"  # kept, not dropped
    verdict = Verdict(label="unsafe", score=0.9, category="Violent", categories=("Violent", "Privacy"),
                      stage="input", raw="quoted harmful text", reasoning="why")
    result = moderation_result(verdict, "block", has_text=True, has_image=True)
    assert result["categories"]["violence"] is True and result["categories"]["privacy"] is True
    assert result["categories"]["sexual"] is False
    assert result["category_scores"]["violence"] == pytest.approx(0.9)
    assert "quoted" not in json.dumps(result) and "why" not in json.dumps(result)
