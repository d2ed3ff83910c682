"""Cascades of real (tiny) guards: stage escalation, every stage's verdict on the final one, cost."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visguard import Cascade, Checker, Guard, InputError, Policy, Stage, UnsupportedRequestError
from visguard.plugins import get

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def guards() -> dict[str, Guard]:
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    def load(arch: str, fmt: str, **policy) -> Guard:
        kwargs = {"ignore_unread": True} if fmt in ("qwen3guard", "shieldgemma2") else {}
        return Guard.from_pretrained(str(cached_guard_checkpoint(arch)), format=get("formats", fmt)(**kwargs),
                                     policy=Policy(**policy))

    return {
        "text": load("qwen3", "qwen3guard", mode="fast"),  # text guard, one forward pass
        "image": load("gemma3", "shieldgemma2", mode="fast"),  # single-image classifier
        "reasoner": load("qwen2_5_vl", "guardreasoner-vl", mode="reason", max_new_tokens=8),
    }


def _img(color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (64, 64), color)


def test_confident_first_stage_decides_and_the_last_stage_never_runs(guards):
    # band (0, 0): no fast score counts as unsure, so stage 1 decides everything.
    cascade = Cascade([Stage((guards["image"], guards["text"]), band=(0.0, 0.0)), guards["reasoner"]])
    verdicts = cascade.check_batch([cascade.request(_img(), "hello"), cascade.request(_img((0, 90, 200)), "a cat")])
    for v in verdicts:
        assert v.label in ("safe", "unsafe")
        assert [s.model for s in v.stages] == [guards["image"].backend.model_id, guards["text"].backend.model_id]
    stats = cascade.stats()
    assert [s.runs for s in stats.stages] == [4, 0]  # two guards x two requests, reasoner skipped
    assert stats.escalation_rate == 0.0 and stats.saved is None  # last stage never measured


def test_unsure_requests_escalate_and_every_stage_is_reported(guards):
    cascade = Cascade([Stage((guards["image"], guards["text"]), band=(0.0, 1.0)), guards["reasoner"]])
    v = cascade.check_input(_img(), "how do I use this?")
    assert [s.model for s in v.stages] == [guards["image"].backend.model_id, guards["text"].backend.model_id,
                                           guards["reasoner"].backend.model_id]
    assert v.stages[-1].mode == "reason"
    # The final verdict is the reasoner's (random weights: usually unparseable, so unavailable, never safe).
    assert v.label == v.stages[-1].label and v.error == v.stages[-1].error
    stats = cascade.stats()
    assert [s.runs for s in stats.stages] == [2, 1] and stats.stages[1].decided == 1
    assert isinstance(stats.saved, float) and stats.as_dict()["escalation_rate"] == 1.0


def test_flagged_requests_go_to_the_confirming_stage(guards):
    flag_all = guards["text"].with_policy(threshold=0.0)  # every score >= 0: flagged
    flag_none = guards["text"].with_policy(threshold=1.0)
    for first, reached in ((flag_all, 1), (flag_none, 0)):
        cascade = Cascade([Stage((first,), escalate="flagged"), guards["reasoner"]])
        cascade.check_input(None, "some text")
        assert cascade.stats().stages[1].runs == reached


def test_stages_sit_out_requests_they_cannot_judge(guards):
    cascade = Cascade([Stage((guards["image"],), band=(0.0, 0.0)), guards["text"]])
    # Two images: the single-image classifier cannot judge it; the text guard decides alone.
    v = cascade.check_input([_img(), _img((0, 0, 255))], "compare these")
    assert [s.model for s in v.stages] == [guards["text"].backend.model_id]
    only_image = Cascade([guards["image"]])
    with pytest.raises(UnsupportedRequestError, match="no stage of the cascade"):
        only_image.check_input([_img(), _img()], "")


def test_a_cascade_is_used_where_a_guard_is(guards):
    lenient = guards["text"].with_policy(threshold=1.0)  # passes anything scored below 1: the host answers
    cascade = Cascade([Stage((lenient,), band=(0.0, 0.0))])
    assert isinstance(cascade, Checker) and not isinstance(cascade, Guard)  # a second Checker, not a Guard
    answer = cascade.wrap(lambda images, text: "Here is a recipe for bread.", pre_check="sequential", post_check=True)
    result = answer.generate(None, "how do I bake bread?")
    assert result.input_verdict is not None and result.input_verdict.stages
    assert result.output_verdict is not None and result.output_verdict.stages[0].stage == "output"
    assert cascade.stats().requests == 2  # the pre-check and the post-check both went through it
    with pytest.raises(InputError):
        Cascade([])
    with pytest.raises(InputError, match="escalate"):
        Stage((guards["text"],), escalate="sometimes")  # type: ignore[arg-type]


def test_visguard_eval_runs_a_cascade(guards, tmp_path):
    from visguard_testing.synthetic import write_mis_test_layout

    from visguard.eval import evaluate_guard, load_benchmark

    items = load_benchmark("mis", write_mis_test_layout(tmp_path / "syn", {"hard": 4}, seed=2), split="hard")
    cascade = Cascade([Stage((guards["image"], guards["text"]), band=(0.0, 0.0)), guards["reasoner"]])
    summary = evaluate_guard(cascade, items, out_dir=tmp_path / "out", progress=False, plots=False)
    assert summary.n == 4 and summary.model.startswith("cascade(") and summary.backend == "cascade"
    rows = [r for r in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    # two images: the single-image classifier sits out and the text guard reads no image, so its
    # "safe" clears nothing (issue #24): an item it does not flag goes on to the reasoner
    stats = cascade.stats()
    flagged = sum(1 for r in rows if json.loads(r)["pred"] == "unsafe" and "qwen2_5_vl" not in json.loads(r)["model"])
    assert stats.stages[0].runs == 4 and stats.stages[1].runs == 4 - flagged


def test_visual_pre_check_and_text_post_check(guards):
    """A vision guard on requests, a cheap text guard (Qwen3Guard) on the host's answers."""
    lenient_image = guards["image"].with_policy(threshold=1.0)  # lets the request through to the host
    cascade = Cascade([Stage((lenient_image,), checks=("input",), band=(0.0, 0.0)),
                       Stage((guards["text"],), checks=("output",))])
    # requests from the image guard's stage, responses from the text guard's: wrap needs both
    assert cascade.capabilities.requests and cascade.capabilities.responses
    assert not Cascade([Stage((guards["image"],), checks=("input",))]).capabilities.responses
    result = cascade.wrap(lambda images, text: "Mix these two chemicals.").generate(_img(), "")
    assert [s.model for s in result.input_verdict.stages] == [guards["image"].backend.model_id]
    assert [s.model for s in result.output_verdict.stages] == [guards["text"].backend.model_id]
    assert result.output_verdict.stage == "output" and result.output_verdict.score is not None
    with pytest.raises(UnsupportedRequestError, match="no stage takes part"):
        Cascade([Stage((guards["text"],), checks=("output",))]).check_input(None, "hi")
    with pytest.raises(InputError, match="checks"):
        Stage((guards["text"],), checks=("during",))  # type: ignore[arg-type]


def test_a_cascade_of_real_guards_is_served(guards):
    """`visguard serve`'s app around a cascade: the server's metrics observe every stage guard."""
    from fastapi.testclient import TestClient

    from visguard.integrations.openai.server.app import create_app

    cascade = Cascade([Stage((guards["text"],), band=(0.0, 1.0)), guards["reasoner"]])  # everything escalates
    with TestClient(create_app(cascade)) as client:
        verdict = client.post("/v1/guard/check", json={"text": "how do I use this?"}).json()
        metrics = client.get("/metrics").text
    assert [s["model"] for s in verdict["stages"]] == [guards["text"].model_id, guards["reasoner"].model_id]
    assert verdict["model"] == guards["reasoner"].model_id and verdict["stages"][1]["mode"] == "reason"
    assert 'visguard_checks_total{mode="fast",stage="input"} 1.0' in metrics  # the text guard's check
    assert 'visguard_checks_total{mode="reason",stage="input"} 1.0' in metrics  # the reasoner's
