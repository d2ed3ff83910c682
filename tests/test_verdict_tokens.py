"""Verdict spellings a tokenizer splits: the others are used, the split ones are named (issue 10, item 1)."""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from visguard import Guard
from visguard.core.errors import BackendError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split_case_path(qwen_path, tmp_path_factory) -> str:
    """" Safe" and " Unsafe" both start with the same space token; " safe"/" unsafe" stay single tokens."""
    from visguard_testing.checkpoints import with_added_words

    return str(with_added_words(qwen_path, ("Safe", "Unsafe"), tmp_path_factory.mktemp("split") / "ckpt"))


@pytest.fixture(scope="module")
def all_split_path(qwen_path, tmp_path_factory) -> str:
    from visguard_testing.checkpoints import with_added_words

    return str(with_added_words(qwen_path, ("safe", "unsafe", "Safe", "Unsafe"), tmp_path_factory.mktemp("all") / "ckpt"))


def test_split_spellings_are_dropped_not_fatal(split_case_path):
    with pytest.warns(UserWarning, match=r"\[' Safe', ' Unsafe'\] left out"):
        guard = Guard.from_pretrained(split_case_path, device="cpu")
    backend = guard.backend
    assert backend.dropped_verdict_spellings == (" Safe", " Unsafe")
    tok = backend.tokenizer
    safe_ids, unsafe_ids = backend.codec.verdict_token_ids("Verdict:", guard.format.verdict_words)
    assert [tok.decode([i]) for i in safe_ids] == [" safe"] and [tok.decode([i]) for i in unsafe_ids] == [" unsafe"]
    img = Image.new("RGB", (40, 40), (200, 10, 10))
    fast = guard.check_input([img], "what is this?", mode="fast")
    assert fast.label in ("safe", "unsafe"), fast.error
    assert fast.score is not None and 0.0 <= fast.score <= 1.0
    for mode in ("adaptive", "reason"):
        # Random weights: the generated text may hold no verdict line, but no backend error.
        verdict = guard.with_policy(max_new_tokens=4).check_input([img], "what is this?", mode=mode)
        assert verdict.label != "unavailable" or verdict.error.startswith("unparseable"), verdict.error
    guard.close()


def test_no_distinct_pair_fails_at_load_with_a_clear_message(all_split_path):
    with pytest.raises(BackendError, match="no safe/unsafe verdict spellings with distinct first tokens"):
        Guard.from_pretrained(all_split_path, device="cpu")


def test_normal_tokenizer_drops_nothing(qwen_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = Guard.from_pretrained(qwen_path, device="cpu")
    assert guard.backend.dropped_verdict_spellings == ()


def _train(args: list[str]):
    pytest.importorskip("visguard_train")
    from click.testing import CliRunner

    from visguard.cli import _register_plugin_commands, cli

    _register_plugin_commands()
    return CliRunner().invoke(cli, ["train", "--device", "cpu", "--cpu-threads", "1", *args])


def test_train_refuses_a_base_without_distinct_verdict_tokens_up_front(all_split_path, tmp_path):
    from visguard_testing.synthetic import write_jsonl

    data = write_jsonl(tmp_path / "data", 4, seed=1)
    out = tmp_path / "run"
    res = _train(["--data", str(data), "--base", all_split_path, "--output", str(out), "--max-steps", "1"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "cannot become a 'visguard' guard" in lines[0] and "distinct first tokens" in lines[0]
    assert "Traceback" not in res.output
    assert not (out / "checkpoints").exists()  # refused before any training step


def test_guard_trained_on_a_split_tokenizer_is_usable(split_case_path, tmp_path):
    from visguard_testing.synthetic import write_jsonl

    data = write_jsonl(tmp_path / "data", 4, seed=1)
    out = tmp_path / "run"
    res = _train(["--data", str(data), "--base", split_case_path, "--output", str(out), "--max-steps", "1",
                  "--guard-modes", "fast", "--batch-size", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with pytest.warns(UserWarning, match="left out"):
        guard = Guard.from_pretrained(str(out), device="cpu")
    verdict = guard.check_input([Image.new("RGB", (32, 32))], "hello")
    assert verdict.label in ("safe", "unsafe"), verdict.error
