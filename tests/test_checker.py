"""The Checker interface: a model guard and a cascade are two implementations, and every consumer
(`visguard serve`, `visguard eval`, `visguard check`, `wrap`, LangChain) takes either.

The guards here run without a model: rule-based backends with known scores on the real `visguard`
format (`visguard_testing.backends.KeywordBackend`: P(unsafe) 1.0 when the checked text has a
keyword, else 0.0; the registered `faulty` backend, for the CLI: 0.9 for text marked `[[unsafe]]`,
else 0.1, and no verdict at all for text marked `[[fault:garbage]]`). So which stage decides, and
every stage's verdict on the final one, is known exactly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from visguard_testing.backends import keyword_guard

import visguard.engine.cascade
from visguard import Cascade, Checker, CheckerBase, Guard, Stage, UnsupportedRequestError
from visguard import cli as cli_module
from visguard.cli import cli
from visguard.integrations.openai.server.app import ServeSettings, create_app


def _named(name: str, *keywords: str, **policy) -> tuple[Guard, object]:
    from visguard import Policy

    guard, backend = keyword_guard(*keywords, policy=Policy(**policy) if policy else None)
    backend.model_id = name
    return guard, backend


@pytest.fixture
def confirm():
    """Stage 1 flags anything naming a bomb; stage 2 confirms the flag only for a bomb *recipe*."""
    flagger, flag_backend = _named("kw-bomb", "bomb")
    confirmer, confirm_backend = _named("kw-recipe", "recipe")
    chain = Cascade([Stage((flagger,), escalate="flagged"), confirmer])
    return chain, flag_backend, confirm_backend


@pytest.fixture(scope="module", autouse=True)
def plugin_commands():
    cli_module._register_plugin_commands()  # what the `visguard` entry point does first (eval, serve)


def _models(verdict) -> list[str]:
    return [s.model for s in verdict.stages]


# ---------------------------------------------------------------------------------- the interface


def test_guard_and_cascade_are_two_checkers(confirm):
    chain, _, _ = confirm
    guard = chain.stages[0].guards[0]
    assert isinstance(guard, Checker) and isinstance(guard, CheckerBase)
    assert isinstance(chain, Checker) and isinstance(chain, CheckerBase)
    assert not issubclass(Cascade, Guard) and not isinstance(chain, Guard)
    assert not hasattr(chain, "backend") and not hasattr(chain, "format")  # nothing faked
    assert guard.describe() == {"model": "kw-bomb", "backend": "keyword", "format": "visguard"}
    assert chain.model_id == "cascade(kw-bomb -> kw-recipe)"
    assert chain.describe() == {"model": "cascade(kw-bomb -> kw-recipe)", "backend": "cascade", "format": "cascade",
                                "stages": ["kw-bomb", "kw-recipe"]}
    # check*/allows/wrap are written once, on the base class, not per implementation
    for name in ("check_input", "check_output", "check", "check_batch", "check_answer", "report_answer",
                 "acheck_input", "acheck_output", "acheck", "acheck_batch", "areport_batch", "areport_answer",
                 "allows", "wrap", "request"):
        assert name not in vars(Guard) and name not in vars(Cascade), name


def test_cascade_has_no_type_ignores_or_raising_stubs():
    source = inspect.getsource(visguard.engine.cascade)
    assert "type: ignore" not in source
    assert not re.search(r"raise (NotImplementedError|AttributeError)", source)


def test_a_cascades_capabilities_are_its_stages_union():
    text_in, _ = _named("in", "x")
    text_out, _ = _named("out", "y")
    both = Cascade([Stage((text_in,), checks=("input",)), Stage((text_out,), checks=("output",))])
    assert both.capabilities.requests and both.capabilities.responses
    only_input = Cascade([Stage((text_in,), checks=("input",))])
    assert only_input.capabilities.requests and not only_input.capabilities.responses
    with pytest.raises(UnsupportedRequestError, match="cannot judge a host's answer"):
        only_input.wrap(lambda images, text: "hi")  # post-check needs a stage that judges answers
    assert only_input.wrap(lambda images, text: "hi", post_check=False).generate(None, "hello").text == "hi"


def test_a_cascade_observes_and_configures_every_stage_guard(confirm):
    chain, _, _ = confirm
    seen: list[tuple[str, list[str]]] = []
    chain.add_batch_observer(lambda mode, verdicts, waited: seen.append((mode, [v.model for v in verdicts])))
    chain.configure_batching(max_batch=3, max_wait_ms=0.5)
    for stage in chain.stages:
        assert stage.guards[0].batcher.max_batch == 3
    chain.check_batch([chain.request(None, "a bomb recipe"), chain.request(None, "hello")])
    # stage 1 saw both requests in one batch; stage 2 only the flagged one
    assert sorted(seen) == [("fast", ["kw-bomb", "kw-bomb"]), ("fast", ["kw-recipe"])]


# ---------------------------------------------------------------------------------- wrapped around a host


def test_a_cascade_wrapped_around_a_host(confirm):
    chain, flag_backend, confirm_backend = confirm
    asked: list[str] = []

    def host(images, text):
        asked.append(text)
        return "Sure: the bomb recipe is ..." if "chemistry" in text else "Bread needs flour."

    guarded = chain.wrap(host, post_check=True)
    ok = guarded.generate(None, "how do I bake bread?")
    assert not ok.blocked and ok.text == "Bread needs flour."
    assert _models(ok.input_verdict) == ["kw-bomb"] and _models(ok.output_verdict) == ["kw-bomb"]

    blocked = guarded.generate(None, "a chemistry question")  # the host's answer is what is unsafe
    assert blocked.blocked and blocked.reason == "unsafe" and blocked.stage == "output"
    assert blocked.text != "Sure: the bomb recipe is ..."
    assert _models(blocked.output_verdict) == ["kw-bomb", "kw-recipe"]  # flagged, then confirmed
    assert [s.label for s in blocked.output_verdict.stages] == ["unsafe", "unsafe"]
    assert blocked.output_verdict.model == "kw-recipe" and blocked.output_verdict.stage == "output"

    history = guarded.generate(None, "the history of bomb disposal")  # flagged by stage 1, cleared by stage 2
    assert not history.blocked and history.input_verdict.label == "safe"
    assert [s.label for s in history.input_verdict.stages] == ["unsafe", "safe"]

    refused = guarded.generate(None, "a bomb recipe please")  # refused before the host is asked
    assert refused.blocked and refused.stage == "input" and "a bomb recipe please" not in asked

    later = asyncio.run(guarded.agenerate(None, "a chemistry question"))  # the async path, same answer
    assert later.blocked and _models(later.output_verdict) == ["kw-bomb", "kw-recipe"]
    assert ("output", "Sure: the bomb recipe is ...", 1.0) in confirm_backend.seen
    assert chain.stats().stages[0].runs == 9 and chain.stats().stages[1].runs == 4


# ---------------------------------------------------------------------------------- served


def test_a_cascade_served_by_visguard_serve(confirm):
    chain, _, _ = confirm
    host = lambda images, text: "A bomb recipe: ..." if "chemistry" in text else "Hello there."  # noqa: E731
    app = create_app(chain, host, settings=ServeSettings(model_name="tiny-host", max_wait_ms=0))
    with TestClient(app) as client:
        ready = client.get("/readyz").json()
        assert ready["guard"] == "cascade(kw-bomb -> kw-recipe)"

        flagged = client.post("/v1/guard/check", json={"text": "a bomb recipe"}).json()
        assert flagged["label"] == "unsafe" and flagged["model"] == "kw-recipe"
        assert [(s["model"], s["label"]) for s in flagged["stages"]] == [("kw-bomb", "unsafe"), ("kw-recipe", "unsafe")]
        cleared = client.post("/v1/guard/check", json={"text": "bomb disposal history"}).json()
        assert cleared["label"] == "safe" and [s["label"] for s in cleared["stages"]] == ["unsafe", "safe"]
        plain = client.post("/v1/guard/check", json={"text": "hello"}).json()
        assert plain["label"] == "safe" and [s["model"] for s in plain["stages"]] == ["kw-bomb"]

        def chat(text: str) -> dict:
            body = {"model": "tiny-host", "messages": [{"role": "user", "content": text}]}
            return client.post("/v1/chat/completions", json=body).json()

        passed = chat("say hello")
        assert passed["choices"][0]["message"]["content"] == "Hello there."
        assert passed["visguard"]["blocked"] is False
        blocked = chat("a chemistry question")  # the host's answer is flagged and confirmed
        assert blocked["choices"][0]["finish_reason"] == "content_filter"
        assert blocked["visguard"]["blocked"] is True and blocked["visguard"]["stage"] == "output"
        assert [s["model"] for s in blocked["visguard"]["output_verdict"]["stages"]] == ["kw-bomb", "kw-recipe"]

        metrics = client.get("/metrics").text
    # The app observes every stage guard's batches. /v1/guard/check: 2 + 2 + 1 stage checks; the chat calls:
    # "say hello" 1 pre + 1 post, "a chemistry question" 1 pre + 2 post (flagged, then confirmed).
    counts = dict(re.findall(r'visguard_checks_total\{mode="fast",stage="(input|output)"\} (\S+)', metrics))
    assert {k: float(v) for k, v in counts.items()} == {"input": 5 + 1 + 1, "output": 1 + 2}


# ---------------------------------------------------------------------------------- the command line


def _stages(*models: str) -> list[str]:
    return [arg for m in models for arg in ("--stage", f"{m}@visguard@faulty")]


def test_a_cascade_checked_by_visguard_check():
    runner = CliRunner()
    safe = runner.invoke(cli, ["check", *_stages("first", "second"), "--text", "hello", "--json"])
    assert safe.exit_code == 0, safe.output
    verdict = json.loads(safe.stdout)
    assert verdict["label"] == "safe" and [s["model"] for s in verdict["stages"]] == ["first"]  # confident: decided

    unsafe = runner.invoke(cli, ["check", *_stages("first", "second"), "--text", "[[unsafe]] how to"])
    assert unsafe.exit_code == 1, unsafe.output
    assert re.search(r"stage 1\s+first: unsafe 0\.9000", unsafe.stdout) and "stage 2" not in unsafe.stdout

    # no verdict from the first stage: it escalates; the last stage decides (here: no verdict either)
    broken = runner.invoke(cli, ["check", *_stages("first", "second"), "--text", "[[fault:garbage]] x", "--json"])
    assert broken.exit_code == 2, broken.output
    verdict = json.loads(broken.stdout)
    assert verdict["label"] == "unavailable" and verdict["model"] == "second"
    assert [(s["model"], s["label"]) for s in verdict["stages"]] == [("first", "unavailable"), ("second", "unavailable")]

    both = runner.invoke(cli, ["check", "--model", "x", *_stages("first"), "--text", "hi"])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(cli, ["check", "--text", "hi"])
    assert neither.exit_code == 2 and "--stage" in neither.output
    bad = runner.invoke(cli, ["check", "--stage", "a@b@c@d", "--text", "hi"])
    assert bad.exit_code == 2 and "MODEL[@FORMAT[@BACKEND]]" in bad.output


def test_a_cascade_evaluated_by_visguard_eval(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"id": "plain", "text": "hello there", "label": "safe"},
            {"id": "marked", "text": "[[unsafe]] do harm", "label": "unsafe", "category": "harm"},
            {"id": "broken", "text": "[[fault:garbage]] anything", "label": "unsafe", "category": "harm"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    # one item per batch: the `faulty` backend's fault marker fails the whole batch it is in
    result = CliRunner().invoke(cli, ["eval", "-B", "jsonl", "-d", str(data), *_stages("first", "second"),
                                      "--batch-size", "1", "--out", str(out), "--json", "--no-progress", "--no-plots"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 3 and summary["model"] == "cascade(first -> second)" and summary["backend"] == "cascade"
    assert summary["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0} and summary["unavailable"] == 1
    got = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    # the deciding stage's verdict: the first stage was confident twice; the broken item reached the second
    assert {k: (r["pred"], r["model"]) for k, r in got.items()} == {
        "plain": ("safe", "first"), "marked": ("unsafe", "first"), "broken": ("unavailable", "second")}

    clash = CliRunner().invoke(cli, ["eval", "-B", "jsonl", "-d", str(data), *_stages("first"), "--vs", "other",
                                     "--no-progress"])
    assert clash.exit_code == 2 and "--vs" in clash.output


def test_visguard_serve_builds_and_serves_a_cascade(monkeypatch):
    import uvicorn

    answers: dict[str, dict] = {}

    def run(app, **kwargs):  # instead of listening on a port: ask the app the command built
        with TestClient(app) as client:
            answers["broken"] = client.post("/v1/guard/check", json={"text": "[[fault:garbage]] hi"}).json()
            answers["unsafe"] = client.post("/v1/guard/check", json={"text": "[[unsafe]] hi"}).json()
            answers["ready"] = client.get("/readyz").json()

    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(cli, ["serve", *_stages("first", "second"), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "guard 'cascade(first -> second)' (cascade)" in result.output
    assert answers["broken"]["label"] == "unavailable"
    assert [s["model"] for s in answers["broken"]["stages"]] == ["first", "second"]  # escalated: no verdict
    assert answers["unsafe"]["label"] == "unsafe" and answers["unsafe"]["model"] == "first"  # confident: decided
    assert answers["ready"]["guard"] == "cascade(first -> second)"


# ---------------------------------------------------------------------------------- LangChain


def test_a_cascade_in_a_langchain_check(confirm):
    pytest.importorskip("langchain_core")
    from visguard.integrations.langchain import GuardCheck

    chain, _, _ = confirm
    verdict = GuardCheck(guard=chain).invoke("a bomb recipe")
    assert verdict.label == "unsafe" and _models(verdict) == ["kw-bomb", "kw-recipe"]
    assert asyncio.run(GuardCheck(guard=chain).ainvoke("bomb disposal")).label == "safe"
