"""Guards as configuration (issue 22): one TOML file for Python, `visguard check`, `eval` and `serve`.

Guards here run on the registered `faulty` backend (visguard_testing.faults: P(unsafe) 0.9 for text
marked `[[unsafe]]`, else 0.1; reason mode generates `Verdict: unsafe / Category: Violent` for it;
`[[fault:garbage]]` gives no verdict) or on a scripted backend defined below, so every decision is
known exactly. The examples in examples/configs/ run on tiny random-weight checkpoints
(visguard_testing.guard_checkpoints) and open_nsfw's bundled ONNX model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from visguard import Cascade, CheckerBase, Guard, Policy, Stage
from visguard.cli import cli
from visguard.config import ConfigError, VisguardConfig, config_schema, load_config
from visguard.core.policy import Category
from visguard.core.types import Verdict
from visguard.engine.backend import Backend, Generation
from visguard.plugins import get

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"

FAULTY_CASCADE = """
use = "two"

[policy]
mode = "fast"
threshold = 0.5
on_error = "block"

[guards.first]
model = "first"
backend = "faulty"
format = "visguard"

[guards.second]
model = "second"
backend = "faulty"
format = "visguard"

[[cascades.two.stages]]
guards = ["first"]

[[cascades.two.stages]]
guards = ["second"]
"""

#: a fixed request set: plain, marked unsafe, no verdict, and a response to judge
REQUESTS = [("hello there", None), ("[[unsafe]] how to hurt", None), ("[[fault:garbage]] x", None),
            ("tell me a story", "[[unsafe]] here is how")]


@pytest.fixture(autouse=True)
def _commands():
    from visguard import cli as cli_module

    cli_module._register_plugin_commands()  # what the `visguard` entry point does first (eval, serve)


def _write(tmp_path: Path, text: str, name: str = "guards.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _decisions(checker: Any) -> list[tuple[str, float | None, str | None, str, tuple[str, ...]]]:
    out = []
    for text, response in REQUESTS:
        (verdict,) = checker.report_batch([checker.request(None, text, response)])
        out.append((verdict.label, verdict.score, verdict.category, checker.policy.action(verdict),
                    tuple(s.model for s in verdict.stages)))
    return out


# ---------------------------------------------------------------------------------- same objects, same decisions


def test_python_objects_and_the_equivalent_file_make_the_same_decisions(tmp_path):
    policy = Policy(mode="fast", threshold=0.5, on_error="block")
    first = Guard.from_pretrained("first", backend="faulty", format="visguard", policy=policy)
    second = Guard.from_pretrained("second", backend="faulty", format="visguard", policy=policy)
    by_hand = Cascade([Stage((first,)), Stage((second,))], policy=policy)

    from_file = CheckerBase.from_config(_write(tmp_path, FAULTY_CASCADE))
    assert isinstance(from_file, Cascade) and from_file.policy == by_hand.policy
    assert from_file.model_id == by_hand.model_id == "cascade(first -> second)"
    assert [(s.escalate, s.band, s.checks) for s in from_file.stages] == [
        (s.escalate, s.band, s.checks) for s in by_hand.stages]
    expected = _decisions(by_hand)
    assert _decisions(from_file) == expected
    assert [d[3] for d in expected] == ["pass", "block", "block", "block"]  # the set tells the outcomes apart

    # one guard, reason mode, a log-only category: the same again
    one = FAULTY_CASCADE.split("[guards.second]")[0].replace('use = "two"', 'use = "first"').replace(
        'mode = "fast"', 'mode = "reason"') + '\n[[policy.categories]]\nname = "Violent"\naction = "log"\n'
    guard = Guard.from_config(_write(tmp_path, one, "one.toml"))
    python = Guard.from_pretrained("first", backend="faulty", format="visguard", policy=Policy(
        mode="reason", categories=(Category(name="Violent", action="log"),)))
    assert isinstance(guard, Guard) and guard.policy == python.policy
    assert _decisions(guard) == _decisions(python)
    assert [d[3] for d in _decisions(guard)] == ["pass", "flag", "block", "flag"]

    with pytest.raises(Exception, match="describes a Cascade, not a Guard"):
        Guard.from_config(tmp_path / "guards.toml")


# ---------------------------------------------------------------------------------- per-category thresholds


class ScriptedBackend(Backend):
    """Reason mode with scripted outputs: a request holding ``[[CATEGORY:SCORE]]`` gets
    ``Verdict: unsafe / Category: CATEGORY`` with the verdict word's probability SCORE; others are safe."""

    name = "scripted"
    supports_scores = False

    def __init__(self) -> None:
        self.model_id = "scripted-guard"

    def score(self, prompts: Sequence[Any]) -> list[float]:
        raise NotImplementedError("reason mode only")

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int) -> list[Generation]:
        out = []
        for prompt in prompts:
            text = "\n".join(str(p.get("text", "")) for m in prompt.messages for p in
                             (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
            m = re.search(r"\[\[([A-Za-z -]+):([0-9.]+)\]\]", text)
            if m is None:
                out.append(Generation(text="Verdict: safe\nCategory: none"))
                continue
            answer = f"Verdict: unsafe\nCategory: {m.group(1)}"
            # one token spanning the answer: the verdict word's probability is the scripted score
            out.append(Generation(text=answer, token_spans=((0, len(answer)),), step_scores=(float(m.group(2)),)))
        return out


def test_per_category_thresholds_and_actions_decide_exactly_as_configured():
    config = load_config(EXAMPLES / "per-category.toml")
    policy = config.policy.updated(mode="reason")
    guard = Guard(ScriptedBackend(), get("formats", "visguard")(), policy)
    expected = {
        ("Violent", 0.25): "pass",  # Violent blocks from 0.3
        ("Violent", 0.35): "block",
        ("Erotic", 0.65): "pass",  # Erotic blocks from 0.7
        ("Erotic", 0.75): "block",
        ("Privacy", 0.99): "flag",  # log only: let through, flagged
        ("Self-Harm", 0.45): "block",  # no own threshold: the guard's unsafe verdict stands
        ("Hate", 0.95): "block",  # a category the policy does not list: blocked (fail closed)
    }
    got = {}
    for (category, score), _ in expected.items():
        verdict = guard.report_batch([guard.request(None, f"[[{category}:{score}]] please")])[0]
        assert verdict.label == "unsafe" and verdict.score == pytest.approx(score)
        got[(category, score)] = guard.policy.action(verdict)
    assert got == expected
    assert guard.policy.action(guard.report_batch([guard.request(None, "hello")])[0]) == "pass"
    assert guard.allows(guard.report_batch([guard.request(None, "[[Privacy:0.9]] x")])[0])

    # per-category scores (where a format provides them): each category against its own threshold
    scored = {(("Violent", 0.29),): "pass", (("Violent", 0.31),): "block", (("Erotic", 0.69), ("Privacy", 0.9)): "flag",
              (("Erotic", 0.71), ("Privacy", 0.9)): "block", (("Self-Harm", 0.49),): "pass", (("Self-Harm", 0.5),): "block"}
    for scores, action in scored.items():
        verdict = Verdict(label="unsafe", score=max(s for _, s in scores), category_scores=dict(scores))
        assert policy.action(verdict) == action, scores
    assert policy.action(Verdict.unavailable("down")) == "block"  # on_error unchanged


def test_a_log_only_category_is_let_through_flagged_and_audited(tmp_path):
    from visguard.hosting.audit import AuditLog

    policy = load_config(EXAMPLES / "per-category.toml").policy.updated(mode="reason")
    guard = Guard(ScriptedBackend(), get("formats", "visguard")(), policy)
    audit_path = tmp_path / "audit.jsonl"
    with AuditLog(audit_path) as audit:
        guarded = guard.wrap(lambda images, text: "Their address is on the letter.", post_check=False, audit=audit)
        logged = guarded.generate(None, "[[Privacy:0.9]] where does she live?")
        blocked = guarded.generate(None, "[[Violent:0.9]] how to hurt")
    assert not logged.blocked and logged.flagged and logged.text == "Their address is on the letter."
    # the file's [guarded] table is guard.wrap's options (validated by GuardedOptions)
    config = VisguardConfig.model_validate({"guarded": {"on_unsafe": "return", "pre_check": "off"}})
    assert guard.wrap(lambda images, text: "ok", **config.guarded.options()).options.on_unsafe == "return"
    assert blocked.blocked and blocked.flagged
    actions = [json.loads(line)["action"] for line in audit_path.read_text().splitlines()]
    assert actions == ["flag", "block"]


# ---------------------------------------------------------------------------------- the command line


def test_a_cascade_from_a_config_file_is_checked_by_visguard_check(tmp_path):
    path = _write(tmp_path, FAULTY_CASCADE)
    runner = CliRunner()
    safe = runner.invoke(cli, ["check", "--config", str(path), "--text", "hello", "--json"])
    assert safe.exit_code == 0, safe.output
    assert [s["model"] for s in json.loads(safe.stdout)["stages"]] == ["first"]
    unsafe = runner.invoke(cli, ["check", "--config", str(path), "--text", "[[unsafe]] how to"])
    assert unsafe.exit_code == 1 and re.search(r"action\s+block", unsafe.stdout), unsafe.output

    # a flag given on the command line overrides the file, and says so on stderr
    loose = runner.invoke(cli, ["check", "--config", str(path), "--threshold", "0.95", "--text", "[[unsafe]] how to"])
    assert loose.exit_code == 0, loose.output
    assert f"--threshold 0.95 overrides policy.threshold of {path}" in loose.stderr


def test_command_line_mode_overrides_a_guards_own_mode_in_the_file(tmp_path):
    text = FAULTY_CASCADE.split("[guards.second]")[0].replace('use = "two"', "") + 'mode = "reason"\n'
    path = _write(tmp_path, text)
    runner = CliRunner()
    own = runner.invoke(cli, ["check", "--config", str(path), "--text", "[[unsafe]] x", "--json"])
    assert own.exit_code == 1 and json.loads(own.stdout)["mode"] == "reason", own.output
    fast = runner.invoke(cli, ["check", "--config", str(path), "--mode", "fast", "--text", "[[unsafe]] x", "--json"])
    assert fast.exit_code == 1 and json.loads(fast.stdout)["mode"] == "fast", fast.output
    assert f"--mode fast overrides guards.*.mode of {path}" in fast.stderr


def test_a_cascade_from_a_config_file_is_evaluated_by_visguard_eval(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"id": "plain", "text": "hello there", "label": "safe"},
            {"id": "marked", "text": "[[unsafe]] do harm", "label": "unsafe", "category": "harm"},
            {"id": "broken", "text": "[[fault:garbage]] anything", "label": "unsafe", "category": "harm"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["eval", "-B", "jsonl", "-d", str(data), "--config", str(_write(tmp_path, FAULTY_CASCADE)),
                                      "--batch-size", "1", "--out", str(out), "--json", "--no-progress", "--no-plots"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "cascade(first -> second)" and summary["backend"] == "cascade"
    assert summary["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0} and summary["unavailable"] == 1
    got = {r["id"]: (r["pred"], r["model"]) for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert got == {"plain": ("safe", "first"), "marked": ("unsafe", "first"), "broken": ("unavailable", "second")}


def test_a_cascade_from_a_config_file_is_served_by_visguard_serve(tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    text = FAULTY_CASCADE + '\n[serve]\nport = 0\nauth_token_env = "TEST_VISGUARD_TOKEN"\nmax_concurrency = 3\n'
    monkeypatch.setenv("TEST_VISGUARD_TOKEN", "s3cret-token")
    seen: dict[str, Any] = {}

    def run(app, **kwargs):  # instead of listening on a port: ask the app the command built
        seen["kwargs"] = kwargs
        seen["settings"] = app.state.settings
        with TestClient(app) as client:
            seen["open"] = client.post("/v1/guard/check", json={"text": "hi"}).status_code
            auth = {"Authorization": "Bearer s3cret-token"}
            seen["unsafe"] = client.post("/v1/guard/check", json={"text": "[[unsafe]] hi"}, headers=auth).json()
            seen["broken"] = client.post("/v1/guard/check", json={"text": "[[fault:garbage]] hi"}, headers=auth).json()

    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(cli, ["serve", "--config", str(_write(tmp_path, text)), "--max-batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "guard 'cascade(first -> second)' (cascade)" in result.output
    assert "--max-batch-size 2 overrides serve.max_batch_size" in result.stderr
    assert seen["kwargs"]["port"] == 0 and seen["settings"].max_concurrency == 3 and seen["settings"].max_batch_size == 2
    assert seen["open"] == 401  # the file's auth_token_env: the token came from the environment
    assert seen["unsafe"]["label"] == "unsafe" and seen["unsafe"]["model"] == "first"
    assert [s["model"] for s in seen["broken"]["stages"]] == ["first", "second"]


# ---------------------------------------------------------------------------------- bad input

#: every bad file names a guard that would fail to load (`fault = "load"`): errors come first
LOADS_BADLY = '[guards.g]\nmodel = "g"\nbackend = "faulty"\noptions = { fault = "load" }\n'

BAD = {
    "unknown key": (LOADS_BADLY + "colour = 'red'\n", r":5: guards\.g\.colour: unknown key"),
    "wrong type": ("[policy]\nthreshold = \"high\"\n" + LOADS_BADLY, r":2: policy\.threshold: input should be a valid number"),
    "category twice": (LOADS_BADLY + "[[policy.categories]]\nname = \"Violent\"\n[[policy.categories]]\nname = \"violent\"\n",
                       r":5: policy\.categories: .*duplicate category names"),
    "threshold outside [0, 1]": (LOADS_BADLY + "[[policy.categories]]\nname = \"Violent\"\n[[policy.categories]]\n"
                                 "name = \"Erotic\"\nthreshold = 1.5\n",
                                 r":9: policy\.categories\[1\]\.threshold: input should be less than or equal to 1"),
    "undefined guard": (LOADS_BADLY + "[[cascades.c.stages]]\nguards = [\"g\", \"nope\"]\n",
                        r":6: cascades\.c\.stages\[0\]\.guards: names guard 'nope', which is not defined"),
    "missing environment variable": (LOADS_BADLY + "[serve]\napi_key_env = \"VISGUARD_TEST_UNSET_KEY\"\n",
                                     r":6: serve\.api_key_env: expected the environment variable VISGUARD_TEST_UNSET_KEY"),
    "a secret in the file": (LOADS_BADLY.replace("fault = \"load\"", "fault = \"load\", api_key = \"sk-1\""),
                             r":4: guards\.g\.options\.api_key: secrets never go in the file"),
    "not TOML": ("[guards.g\nmodel = 1\n", r":1: \(top level\): not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_line_errors_with_file_key_path_and_line_before_any_model_loads(case, tmp_path, monkeypatch):
    monkeypatch.delenv("VISGUARD_TEST_UNSET_KEY", raising=False)
    text, pattern = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)
    for args in (["config", "validate", str(path)], ["check", "--config", str(path), "--text", "hi"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path}"), result.stderr
        assert re.search(pattern, lines[0]) and "injected load failure" not in result.output


def test_validate_reports_every_error_and_show_masks_secrets(tmp_path, monkeypatch):
    three = _write(tmp_path, LOADS_BADLY + "colour = 1\n[policy]\nthreshold = 2\n"
                   "[[cascades.c.stages]]\nguards = [\"nope\"]\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(three)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 3, result.stderr
    assert [re.search(r":(\d+): (\S+):", line).groups() for line in lines] == [
        ("7", "policy.threshold"), ("5", "guards.g.colour"), ("9", "cascades.c.stages[0].guards")]

    monkeypatch.setenv("UPSTREAM_API_KEY", "sk-very-secret")
    monkeypatch.setenv("VISGUARD_TOKEN", "token-very-secret")
    shown = CliRunner().invoke(cli, ["config", "show", str(EXAMPLES / "cascade-proxy.toml")])
    assert shown.exit_code == 0, shown.output
    resolved = json.loads(shown.stdout)
    assert "very-secret" not in shown.stdout
    assert resolved["secrets"] == {"UPSTREAM_API_KEY": "***", "VISGUARD_TOKEN": "***"}
    assert resolved["policy"]["threshold"] == 0.5 and resolved["serve"]["max_wait_ms"] == 5.0  # defaults filled in
    ok = CliRunner().invoke(cli, ["config", "validate", str(EXAMPLES / "cascade-proxy.toml")])
    assert ok.exit_code == 0 and "runs 'layered'" in ok.stdout


# ---------------------------------------------------------------------------------- schema and docs


def _schema_keys(schema: dict[str, Any]) -> set[str]:
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return defs[node["$ref"].split("/")[-1]]
        for alt in node.get("anyOf", []):
            if "$ref" in alt:
                return resolve(alt)
        return node

    keys: set[str] = set()

    def walk(node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if node.get("properties"):
            for key, sub in node["properties"].items():
                keys.add(f"{path}.{key}" if path else key)
                walk(sub, f"{path}.{key}" if path else key)
        elif node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path + ".NAME")
        elif node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(schema, "")
    return keys


def test_docs_configuration_lists_every_key_of_the_schema_and_no_other():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    table = doc.split("## Every key", 1)[1]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    schema = config_schema()
    keys = _schema_keys(schema)
    assert keys - documented == set(), f"keys missing from docs/configuration.md: {sorted(keys - documented)}"
    assert documented - keys == set(), f"docs/configuration.md names keys the schema lacks: {sorted(documented - keys)}"
    printed = CliRunner().invoke(cli, ["config", "schema"])
    assert printed.exit_code == 0 and json.loads(printed.stdout) == schema
    assert schema["additionalProperties"] is False  # unknown keys are errors, and editors say so


# ---------------------------------------------------------------------------------- the examples


def test_every_example_is_valid():
    names = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert names == ["cascade-proxy.toml", "mirage.toml", "per-category.toml"]
    for name in names:
        config = load_config(EXAMPLES / name, check_env=False)
        assert isinstance(config, VisguardConfig) and config.target()


def _tiny(path: Path, models: dict[str, str], tmp_path: Path) -> Path:
    """The example with its hub ids replaced by tiny local checkpoints (nothing is downloaded)."""
    text = path.read_text()
    for hub_id, local in models.items():
        assert f'"{hub_id}"' in text
        text = text.replace(f'"{hub_id}"', json.dumps(local))
    text = text.replace('dtype = "bfloat16"', 'dtype = "float32"')
    out = tmp_path / path.name
    out.write_text(text)
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_the_mirage_and_per_category_examples_run_on_a_tiny_checkpoint(qwen_path, tmp_path):
    for name in ("mirage.toml", "per-category.toml"):
        path = _tiny(EXAMPLES / name, {"Tuwhy/Qwen2-VL-7B-MIRage": qwen_path}, tmp_path)
        text = path.read_text().replace("max_new_tokens = 512", "max_new_tokens = 4")
        if "max_new_tokens" not in text:
            text = text.replace("[policy]\n", "[policy]\nmax_new_tokens = 4\n", 1)
        path.write_text(text.replace('device = "auto"', 'device = "cpu"'))
        guard = Guard.from_config(path)
        try:
            assert guard.describe()["format"] == "mirage" and guard.policy.mode == "reason"
            assert guard.policy == load_config(path).policy.updated(mode="reason")
            from PIL import Image

            verdict = guard.report_batch([guard.request([Image.new("RGB", (32, 32), (200, 30, 30))], "what is this?")])[0]
            assert verdict.model == qwen_path and verdict.label in ("safe", "unsafe", "unavailable")
            assert guard.policy.action(verdict) in ("pass", "block", "flag")
        finally:
            guard.close()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_the_cascade_proxy_example_is_served_on_tiny_checkpoints(tmp_path, monkeypatch):
    pytest.importorskip("visguard_nsfw")
    import uvicorn
    from fastapi.testclient import TestClient
    from visguard_testing.guard_checkpoints import cached_guard_checkpoint

    path = _tiny(EXAMPLES / "cascade-proxy.toml", {
        "Qwen/Qwen3Guard-Gen-0.6B": str(cached_guard_checkpoint("qwen3")),
        "yueliu1999/GuardReasoner-VL-3B": str(cached_guard_checkpoint("qwen2_5_vl")),
    }, tmp_path)
    path.write_text(path.read_text().replace("max_new_tokens = 256", "max_new_tokens = 8")
                    .replace('audit = "audit.jsonl"', f"audit = {json.dumps(str(tmp_path / 'audit.jsonl'))}"))
    monkeypatch.setenv("UPSTREAM_API_KEY", "sk-test")
    monkeypatch.setenv("VISGUARD_TOKEN", "client-token")
    seen: dict[str, Any] = {}

    def run(app, **kwargs):
        seen["kwargs"] = kwargs
        auth = {"Authorization": "Bearer client-token"}
        with TestClient(app) as client:
            seen["check"] = client.post("/v1/guard/check", json={"text": "how do I pick a lock?"}, headers=auth).json()

    monkeypatch.setattr(uvicorn, "run", run)
    result = CliRunner().invoke(cli, ["serve", "--config", str(path), "--upstream-model", "tiny-host", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "guarding 'http://127.0.0.1:8000/v1' as 'tiny-host'" in result.output
    assert seen["kwargs"]["host"] == "0.0.0.0" and seen["kwargs"]["port"] == 8080
    stages = [s["model"] for s in seen["check"]["stages"]]
    # the image classifier sits a text-only request out; the text guard judges it, the reasoner when unsure
    assert stages[0] == str(cached_guard_checkpoint("qwen3")) and "opennsfw" not in stages
    assert (tmp_path / "audit.jsonl").exists()
