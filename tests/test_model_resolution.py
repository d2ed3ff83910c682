"""Model ids that cannot be had fail fast, with one line saying how to point at a local checkpoint.

``visguard check -m no/such-model`` used to spend minutes in hub retries (77 lines of them) before
its error. :func:`visguard.integrations.hf.resolve_checkpoint` now looks a hub id up once, with no retries and
a short timeout: offline (``HF_HUB_OFFLINE=1``) only the local cache counts; online, an unknown id
or an unreachable hub is one typed error. A local checkpoint directory is loaded as before, without
the hub. No test here asserts a wall time (the figures are measured by hand, see issue 20).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from visguard.core.errors import BackendError
from visguard.integrations.hf import resolve_checkpoint

LOCAL_HINT = "pass a local checkpoint directory as the guard model instead (e.g. --model /path/to/checkpoint)"


def _visguard() -> list[str]:
    script = Path(sys.executable).with_name("visguard")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from visguard.cli import main; main()"]


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(path)
    return str(path)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def _env(tmp_path: Path, **changes: str | None) -> dict[str, str]:
    """The CLI's environment: an empty HF cache, no hub token, loopback never proxied, plus ``changes``."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _check(model: str, image: str, env: dict[str, str], *extra: str, merged: bool = True) -> tuple[int, list[str]]:
    """``visguard check``'s exit code and output lines (stdout and stderr together, or stdout alone)."""
    proc = subprocess.run([*_visguard(), "check", "-m", model, image, "--text", "hi", *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout.strip().splitlines()


def test_cli_unknown_id_offline_is_one_line_exit_2(tmp_path, image):
    rc, lines = _check("no/such-model", image, _env(tmp_path, HF_HUB_OFFLINE="1"))
    assert rc == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("Error: cannot load guard model 'no/such-model': no such local directory")
    assert "HF_HUB_OFFLINE is set" in line and str(tmp_path / "hf-cache") in line
    assert LOCAL_HINT in line and "hf download no/such-model" in line


def test_cli_unreachable_hub_is_one_line_exit_2(tmp_path, image, closed_port):
    env = _env(tmp_path, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    rc, lines = _check("no/such-model", image, env)
    assert rc == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("Error: cannot load guard model 'no/such-model': no such local directory")
    assert f"hub (http://127.0.0.1:{closed_port}) could not be reached (ConnectError" in line
    assert LOCAL_HINT in line and "Retry" not in line


def test_cli_silent_hub_is_one_line_exit_2(tmp_path, image, silent_port):
    env = _env(tmp_path, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_ENDPOINT=f"http://127.0.0.1:{silent_port}",
               VISGUARD_HUB_TIMEOUT="1")
    rc, lines = _check("no/such-model", image, env)
    assert rc == 2 and len(lines) == 1, lines
    assert "did not answer within 1 s (VISGUARD_HUB_TIMEOUT sets the wait)" in lines[0] and LOCAL_HINT in lines[0]


def test_cli_local_checkpoint_loads_with_the_hub_unreachable(tmp_path, image, closed_port, qwen_path):
    env = _env(tmp_path, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    rc, lines = _check(qwen_path, image, env, "--device", "cpu", "--json", merged=False)
    assert rc in (0, 1), lines
    verdict = json.loads("\n".join(lines))
    assert verdict["label"] in ("safe", "unsafe") and verdict["model"] == qwen_path


# --------------------------------------------------------------------- resolve_checkpoint in process


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Online mode against an empty cache in ``tmp_path``; ``hub.endpoint(url)`` points the hub there."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("VISGUARD_HUB_TIMEOUT", raising=False)

    class Hub:
        cache = tmp_path / "hf-cache"

        @staticmethod
        def endpoint(url: str) -> None:
            monkeypatch.setattr(constants, "ENDPOINT", url)

        @staticmethod
        def offline() -> None:
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

        @staticmethod
        def cache_model(repo_id: str) -> Path:
            """A cached snapshot of ``repo_id`` at ``main`` (refs/main and a config.json); its directory."""
            folder = Hub.cache / ("models--" + repo_id.replace("/", "--"))
            snapshot = folder / "snapshots" / ("a" * 40)
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text("{}")
            (folder / "refs").mkdir()
            (folder / "refs" / "main").write_text("a" * 40)
            return snapshot

    return Hub


@pytest.fixture
def fake_hub() -> Iterator[str]:
    """A loopback hub API that knows one model, ``known/model``, at revision ``main``; ``gated/model`` is
    gated, ``down/model`` answers 503 and ``mirror/model`` a plain 404 (a mirror without the model API)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path in ("/api/models/known/model", "/api/models/known/model/revision/main"):
                body, status, headers = json.dumps({"id": "known/model", "sha": "b" * 40}), 200, {}
            elif path.startswith("/api/models/known/model/revision/"):
                body, status, headers = json.dumps({"error": "Invalid rev id"}), 404, {"X-Error-Code": "RevisionNotFound"}
            elif path == "/api/models/gated/model":
                body, status, headers = json.dumps({"error": "Access restricted"}), 403, {"X-Error-Code": "GatedRepo"}
            elif path == "/api/models/down/model":
                body, status, headers = json.dumps({"error": "Service unavailable"}), 503, {}
            elif path == "/api/models/mirror/model":  # a mirror that serves files but not this API
                body, status, headers = "not here", 404, {}
            else:
                body, status, headers = json.dumps({"error": "Repository not found"}), 404, {"X-Error-Code": "RepoNotFound"}
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_local_directory_is_returned_as_is(tmp_path, hub):
    hub.endpoint("http://127.0.0.1:9")  # never asked
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)
    assert resolve_checkpoint(tmp_path) == str(tmp_path)


@pytest.mark.parametrize("model", ["/no/such/model", "./missing-dir", "a/b/c", "bad--id/x"])
def test_neither_a_directory_nor_a_hub_id(model, hub):
    with pytest.raises(BackendError, match="no such local directory, and not a valid Hugging Face hub id") as err:
        resolve_checkpoint(model, role="host")
    assert str(err.value).startswith(f"cannot load host model {model!r}")
    assert "pass a local checkpoint directory as the host model instead (e.g. /path/to/checkpoint)" in str(err.value)


def test_a_file_is_not_a_checkpoint(tmp_path, hub):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(BackendError, match="it is a file, not a checkpoint directory"):
        resolve_checkpoint(str(weights))


def test_offline_uses_the_cache_only(hub):
    hub.offline()
    hub.endpoint("http://127.0.0.1:9")
    hub.cache_model("cached/model")
    assert resolve_checkpoint("cached/model") == "cached/model"  # transformers reads its own cache offline
    with pytest.raises(BackendError, match="HF_HUB_OFFLINE is set but the Hugging Face cache .* has no copy of it"):
        resolve_checkpoint("not/cached")


def test_online_asks_the_hub_once(hub, fake_hub):
    hub.endpoint(fake_hub)
    assert resolve_checkpoint("known/model") == "known/model"
    assert resolve_checkpoint("known/model", revision="main") == "known/model"
    with pytest.raises(BackendError, match="no model of that id on the Hugging Face hub") as err:
        resolve_checkpoint("no/such-model")
    assert LOCAL_HINT in str(err.value)
    with pytest.raises(BackendError, match="the Hugging Face hub has no revision 'v9' of it"):
        resolve_checkpoint("known/model", revision="v9")
    with pytest.raises(BackendError, match=r"it is gated on the Hugging Face hub: accept its terms there and log in"):
        resolve_checkpoint("gated/model")
    with pytest.raises(BackendError, match=r"the Hugging Face hub \(http://127\.0\.0\.1:\d+\) answered HTTP 503"):
        resolve_checkpoint("down/model")
    assert resolve_checkpoint("mirror/model") == "mirror/model"  # an answer, just not this one: the loader decides


def test_unreachable_hub_falls_back_to_the_cached_snapshot(hub, closed_port):
    hub.endpoint(f"http://127.0.0.1:{closed_port}")
    snapshot = hub.cache_model("cached/model")
    assert resolve_checkpoint("cached/model") == str(snapshot)
    with pytest.raises(BackendError, match="could not be reached"):
        resolve_checkpoint("not/cached")
    shutil.rmtree(hub.cache)
    with pytest.raises(BackendError, match="could not be reached"):
        resolve_checkpoint("cached/model")


def test_silent_hub_gives_up_after_the_timeout(hub, silent_port, monkeypatch):
    hub.endpoint(f"http://127.0.0.1:{silent_port}")
    monkeypatch.setenv("VISGUARD_HUB_TIMEOUT", "0.5")
    with pytest.raises(BackendError, match=r"did not answer within 0\.5 s"):
        resolve_checkpoint("no/such-model")
