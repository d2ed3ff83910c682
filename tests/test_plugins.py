"""Plugin system: registries, run-time registration of a third-party plugin, docs for every hook."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from visguard import (
    Backend,
    Generation,
    Guard,
    GuardFormat,
    GuardPrompt,
    InputError,
    ParsedOutput,
    PluginError,
    hookimpl,
    hookspecs,
    plugins,
)
from visguard.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_builtin_plugins_listed_as_json():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    info = {p["name"]: p for p in json.loads(result.stdout)}
    be = info["visguard.default_plugins.transformers_backend"]
    assert be["hooks"] == ["register_backends"] and be["provides"] == {"backends": ["transformers"]}
    assert info["visguard.default_plugins.visguard_format"]["provides"] == {"formats": ["visguard"]}
    assert all(p["distribution"] == "visguard" for n, p in info.items() if n.startswith("visguard.default_plugins"))


def test_unknown_names_list_what_is_installed():
    with pytest.raises(PluginError, match=r"no backend named 'nope'; installed: \[.*'transformers'"):
        Guard.from_pretrained("m", backend="nope")
    with pytest.raises(PluginError, match="unknown registry"):
        plugins.registry("widgets")


# --- a third-party plugin: a colour-rule backend and a one-line format -------------------------

class RednessBackend(Backend):
    """Scores P(unsafe) as the mean red share of the images: a real (if silly) guard."""

    name = "redness"

    def __init__(self, model: str, **kwargs):
        self.model_id = model

    def score(self, prompts):
        out = []
        for p in prompts:
            if not p.images:
                out.append(0.0)
                continue
            reds = []
            for img in p.images:
                r, g, b = (sum(c) / len(c) for c in zip(*img.convert("RGB").get_flattened_data(), strict=True))
                reds.append(r / max(r + g + b, 1e-9))
            out.append(sum(reds) / len(reds))
        return out

    def generate(self, prompts, *, max_new_tokens):
        return [Generation(text="VERDICT=" + ("unsafe" if s >= 0.5 else "safe")) for s in self.score(prompts)]


class OneLineFormat(GuardFormat):
    name = "oneline"

    def build(self, request, policy, *, mode, special_tokens=()):
        return GuardPrompt(messages=[{"role": "user", "content": request.text}], images=[i.image for i in request.images], mode=mode)

    def parse(self, text, policy):
        if text.startswith("VERDICT="):
            return ParsedOutput(label=text.split("=", 1)[1], verdict_offset=8)
        return ParsedOutput(label=None, error="no VERDICT=")


class ThirdPartyPlugin:
    """What a third-party distribution would expose through its entry point."""

    @hookimpl
    def register_backends(self, register):
        register("redness", RednessBackend)

    @hookimpl
    def register_formats(self, register):
        register("oneline", OneLineFormat)


third_party = ThirdPartyPlugin()


@pytest.fixture
def registered():
    plugins.pm.register(third_party, name="visguard-redness")
    yield
    plugins.pm.unregister(name="visguard-redness")


def test_third_party_plugin_registered_at_run_time(registered):
    guard = Guard.from_pretrained("rule:red", backend="redness", format="oneline")
    red, blue = Image.new("RGB", (4, 4), (250, 10, 10)), Image.new("RGB", (4, 4), (10, 10, 250))
    v = guard.check_input([red, red], "x")
    assert (v.label, v.model, v.mode) == ("unsafe", "rule:red", "fast")
    assert v.score == pytest.approx(250 / 270)
    v = guard.check_input([blue], "x", mode="reason")
    assert (v.label, v.raw) == ("safe", "VERDICT=safe")
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    mine = [p for p in json.loads(result.stdout) if p["name"] == "visguard-redness"][0]
    assert mine["provides"] == {"backends": ["redness"], "formats": ["oneline"]}
    assert sorted(mine["hooks"]) == ["register_backends", "register_formats"]


def test_duplicate_registration_is_an_error():
    class Dup:
        @hookimpl
        def register_formats(self, register):
            register("visguard", OneLineFormat)

    dup = Dup()
    plugins.pm.register(dup, name="dup")
    try:
        with pytest.raises(PluginError, match="registered by both"):
            plugins.registry("formats")
    finally:
        plugins.pm.unregister(name="dup")


def test_load_plugins_is_idempotent():
    before = len(plugins.pm.get_plugins())
    plugins.load_plugins()
    plugins.load_plugins()
    assert len(plugins.pm.get_plugins()) == before


def test_every_hook_and_argument_is_documented():
    docs = DOCS.read_text()
    specs = [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]
    assert len(specs) >= 8
    for name, fn in specs:
        heading = re.search(rf"^### `{name}\(([^)]*)\)`", docs, re.MULTILINE)
        assert heading, f"hook {name} is not documented in docs/plugins.md"
        documented = [a.strip() for a in heading.group(1).split(",") if a.strip()]
        assert documented == list(inspect.signature(fn).parameters), f"arguments of {name} differ from docs"
        assert fn.__doc__, f"hook {name} has no docstring"
    # and nothing documented that does not exist
    for name in re.findall(r"^### `(register_\w+)\(", docs, re.MULTILINE):
        assert hasattr(hookspecs, name), f"docs describe a hook {name} that does not exist"


def _plugins_json(env_value: str | None):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("VISGUARD_LOAD_PLUGINS", None)
    if env_value is not None:
        env["VISGUARD_LOAD_PLUGINS"] = env_value
    code = "from visguard.cli import main; main(['plugins', '--json'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_restricts_installed_plugins():
    everything = _plugins_json(None)
    assert everything.returncode == 0, everything.stderr
    builtin_only = _plugins_json("")
    assert builtin_only.returncode == 0, builtin_only.stderr
    names = {p["name"] for p in json.loads(builtin_only.stdout)}
    assert names and all(n.startswith("visguard.default_plugins.") for n in names)
    installed = {p["name"]: p for p in json.loads(everything.stdout)}
    assert names <= set(installed)
    # plugins installed as distributions report which one (the dev set-up installs plugins/*)
    for name, dist in (("vllm", "visguard-vllm"), ("train", "visguard-train")):
        if name in installed:
            assert installed[name]["distribution"] == dist
    unknown = _plugins_json("visguard-no-such-plugin")
    assert unknown.returncode == 2
    assert "VISGUARD_LOAD_PLUGINS names 'visguard-no-such-plugin', which is not installed" in unknown.stderr


def test_factories_declare_their_options_and_the_cli_passes_only_those():
    assert {"device", "dtype", "trust_remote_code"} <= set(plugins.option_names(plugins.get("backends", "transformers")))
    assert "device" not in plugins.option_names(plugins.get("backends", "openai"))
    shorthands = {"device": "cpu", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    assert plugins.supported_options("backends", "transformers", shorthands) == {"device": "cpu"}
    assert plugins.supported_options("backends", "openai", shorthands) == {"base_url": "http://127.0.0.1:9/v1"}
    assert plugins.supported_options("hosts", "openai", {"model": "m", "device": "cpu"}) == {"model": "m"}
    with pytest.raises(InputError, match=r"the 'transformers' backend takes no option 'nope'; its options: device"):
        Guard.from_pretrained("m", backend="transformers", nope=1)
    usage = CliRunner().invoke(cli, ["check", "--model", "m", "--backend-arg", "nope"])
    assert usage.exit_code == 2 and "expected KEY=VALUE" in usage.output
    unknown = CliRunner().invoke(cli, ["check", "--model", "m", "--backend-arg", "nope=1"])
    assert unknown.exit_code == 2 and "takes no option 'nope'" in unknown.output and "Traceback" not in unknown.output


def test_servers_forward_what_the_host_declares():
    from visguard.hosting.hosts import CallableHost
    from visguard.integrations.openai.wire import ChatCompletionRequest, generation_options

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.3)
    assert generation_options(body, plugins.get("hosts", "openai")) == {"max_new_tokens": 7, "temperature": 0.3}
    assert generation_options(body, plugins.get("hosts", "transformers")) == {"max_new_tokens": 7}
    assert generation_options(body, CallableHost(lambda images, text: "")) == {}


def test_trace_hooks_covers_the_registry_hooks():
    import os
    import subprocess
    import sys

    env = {**os.environ, "VISGUARD_TRACE_HOOKS": "1", "VISGUARD_LOAD_PLUGINS": ""}
    code = "from visguard import plugins; plugins.registry('backends'); plugins.registry('formats')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "visguard hook: register_backends -> " in done.stderr and "visguard hook: register_formats -> " in done.stderr
