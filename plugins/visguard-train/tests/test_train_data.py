"""visguard train: data layouts, path safety, configuration, CLI errors and the multi-image collator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("visguard_train")

from visguard_testing.synthetic import write_jsonl, write_mis_test_layout, write_mis_train_layout  # noqa: E402
from visguard_train import PRESETS, DatasetError, build_config, detect_format, load_records, read_config_file  # noqa: E402
from visguard_train.encode import IGNORE_INDEX  # noqa: E402

from visguard import Policy, plugins  # noqa: E402
from visguard.cli import _register_plugin_commands, cli  # noqa: E402
from visguard.datasets import reasoning_of  # noqa: E402
from visguard.default_plugins.visguard_format import VisguardFormat  # noqa: E402


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "jsonl": write_jsonl(root / "jl", 6, seed=3),
        "mis-train": write_mis_train_layout(root / "mt", 6, seed=3),
        "mis-test": write_mis_test_layout(root / "ms", {"hard": 4, "real": 2}, seed=3),
    }


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register_plugin_commands()
    return CliRunner()


def test_plugin_registers_command_trainers_and_datasets(runner):
    assert {"full", "lora"} <= set(plugins.registry("trainers"))
    assert {"mis-train", "mis-test", "jsonl"} <= set(plugins.registry("datasets"))
    out = runner.invoke(cli, ["plugins", "--json"]).output
    mine = [p for p in json.loads(out) if p["provides"].get("trainers")][0]
    assert mine["hooks"] == ["register_commands", "register_datasets", "register_trainers"]
    assert "train" in cli.commands


def test_each_layout_is_detected_and_loaded(layouts):
    assert detect_format(layouts["jsonl"]) == "jsonl"
    assert detect_format(layouts["jsonl"].parent) == "jsonl"
    assert detect_format(layouts["mis-train"]) == "mis-train"
    assert detect_format(layouts["mis-train"] / "mis_train.json") == "mis-train"
    assert detect_format(layouts["mis-test"]) == "mis-test"
    assert detect_format(layouts["mis-test"] / "mis_hard.json") == "mis-test"

    jl = load_records(layouts["jsonl"])
    assert len(jl) == 6 and all(len(r.images) == 2 and r.images[0].is_file() for r in jl)
    assert {r.label for r in jl} == {"safe", "unsafe"}
    first = json.loads(layouts["jsonl"].read_text().splitlines()[0])
    assert jl[0].reasoning and first["target"].startswith(jl[0].reasoning)  # target minus its verdict lines
    assert jl[0].text == first["text"] and jl[0].label == first["label"]

    mt = load_records(layouts["mis-train"])
    assert len(mt) == 6 and all(r.turns[-1][0] == "assistant" for r in mt)
    assert "<image>" not in mt[0].text and mt[0].rationale.startswith("Image 1 shows")
    # the format phrases the MIRage answer in its own grammar (one "Reasoning:" line)
    assert reasoning_of(VisguardFormat(), mt[0]) == f"Reasoning: {mt[0].rationale}"

    ms = load_records(layouts["mis-test"])
    assert len(ms) == 6 and all(len(r.images) == 2 for r in ms)


def test_mis_key_variants_and_default_label(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    train = [
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\n<image>\nq1"},
                                                        {"from": "gpt", "value": "a1"}],
         "category": "Violent", "sub_category": "Weapon-Related Violence"},
        {"images": ["b.png"], "messages": [{"role": "user", "content": "<image> q2"},
                                           {"role": "assistant", "content": "a2"}], "category": "Hate"},
    ]
    (tmp_path / "mis_train.json").write_text(json.dumps(train))
    recs = load_records(tmp_path / "mis_train.json")
    assert [r.text for r in recs] == ["q1", "q2"] and [len(r.images) for r in recs] == [2, 1]
    assert [r.label for r in recs] == ["unsafe", "unsafe"]  # MIS items are risky unless labelled
    assert recs[0].turns == (("user", "q1"), ("assistant", "a1"))

    test = [{"question": "q", "category": "Hate", "sub_category": None, "image_path1": "a.png", "image_path2": "b.png"}]
    (tmp_path / "mis_hard.json").write_text(json.dumps(test))
    rec = load_records(tmp_path / "mis_hard.json")[0]
    assert (rec.label, rec.category, rec.sub_category) == ("unsafe", "Hate", None)


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "sub/../../outside.png", "link.png"])
def test_image_paths_must_stay_inside_the_root(tmp_path, bad):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    line = {"images": [bad], "text": "t", "label": "safe"}
    (root / "d.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl line 1 images\[0\]: image path .*(escapes the dataset root|is absolute)"):
        load_records(root / "d.jsonl")


def test_cli_reports_user_errors_without_traceback(runner, tmp_path, layouts):
    root = tmp_path / "esc"
    root.mkdir()
    (root / "d.jsonl").write_text(json.dumps({"images": ["../x.png"], "text": "t", "label": "safe"}) + "\n")
    res = runner.invoke(cli, ["train", "--data", str(root / "d.jsonl"), "--base", "m", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "escapes the dataset root" in res.output and "Traceback" not in res.output

    res = runner.invoke(cli, ["train", "--data", str(layouts["jsonl"]), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing --base" in res.output

    (tmp_path / "weird.json").write_text(json.dumps([{"foo": 1}]))
    res = runner.invoke(cli, ["train", "--data", str(tmp_path / "weird.json"), "--base", "m", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "pass --format NAME" in res.output

    res = runner.invoke(cli, ["train", "--data", str(layouts["jsonl"]), "--base", "m", "-o", str(tmp_path / "o"),
                              "--trainer", "magic"])
    assert res.exit_code == 2 and "no trainer named 'magic'" in res.output and "lora" in res.output

    res = runner.invoke(cli, ["train", "--data", str(layouts["mis-test"]), "--base", "m", "-o", str(tmp_path / "o"),
                              "--objective", "response"])
    assert res.exit_code == 2 and "no record has an assistant answer" in res.output


def test_only_formats_with_the_training_hooks_can_be_trained(runner, tmp_path, layouts):
    from visguard_train.trainable import FollowupTrainableFormat, TrainableFormat, trainable_format

    from visguard.core.errors import InputError
    from visguard.default_plugins.llavaguard_format import LlavaGuardFormat
    from visguard.default_plugins.mirage_format import MirageFormat

    visguard, mirage, llavaguard = VisguardFormat(), MirageFormat(), LlavaGuardFormat()
    assert isinstance(visguard, TrainableFormat) and not isinstance(visguard, FollowupTrainableFormat)
    assert isinstance(mirage, FollowupTrainableFormat) and not isinstance(llavaguard, TrainableFormat)
    assert trainable_format(visguard, "guard") is visguard and trainable_format(mirage, "mirage") is mirage
    assert trainable_format(llavaguard, "response") is llavaguard  # trains answers, not the format
    with pytest.raises(InputError, match="guard format 'llavaguard' cannot be trained .*lacks target, "
                                         "reasoning_text, checkpoint_kwargs"):
        trainable_format(llavaguard, "guard")
    with pytest.raises(InputError, match="'visguard' cannot be trained \\(objective 'mirage'\\).*lacks followup, followup_target"):
        trainable_format(visguard, "mirage")
    # visguard train refuses it by name, before any data or model is loaded (the base model does not exist)
    res = runner.invoke(cli, ["train", "--data", str(layouts["jsonl"]), "--base", "no/such-model", "-o",
                              str(tmp_path / "o"), "--guard-format", "llavaguard"])
    assert res.exit_code == 2 and "guard format 'llavaguard' cannot be trained" in res.output, res.output
    assert "Traceback" not in res.output


def test_help_lists_the_main_flags(runner):
    res = runner.invoke(cli, ["train", "--help"])
    assert res.exit_code == 0
    for flag in ("--data", "--base", "--output", "--trainer", "--objective", "--epochs", "--lr", "--batch-size",
                 "--config", "--resume", "--preset", "--merge", "--gradient-checkpointing", "--bf16", "merge"):
        assert flag in res.output, flag


def test_config_precedence_defaults_preset_file_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: mirage-qwen2vl\nepochs: 5\nbatch-size: 4\nlr: 1.0e-4\n")
    cfg = build_config(read_config_file(tmp_path / "c.yaml"), {"lr": 3e-5})
    assert (cfg.trainer, cfg.warmup_ratio) == ("full", 0.03)  # from the preset
    assert (cfg.epochs, cfg.batch_size) == (5, 4)  # the file beats the preset
    assert cfg.lr == 3e-5  # a flag beats the file
    assert build_config({}, {"preset": "mirage-internvl"}).lr == PRESETS["mirage-internvl"]["lr"] == 5e-6
    assert build_config({}, {"preset": "mirage-qwen2vl"}).epochs == 3
    (tmp_path / "c.json").write_text(json.dumps({"guard_modes": "fast", "nope": 1}))
    with pytest.raises(Exception, match="nope"):
        build_config(read_config_file(tmp_path / "c.json"))


def test_collator_labels_only_the_continuation(tiny_arch, layouts):
    """Prompt tokens equal the inference encoding; labels cover the target only, on every architecture."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visguard_train.encode import (
        ExampleBuilder,
        ExampleDataset,
        MultiImageCollator,
        example_specs,
        image_token_ids,
    )

    from visguard.default_plugins.transformers_backend import TransformersBackend

    arch, path = tiny_arch
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    backend = TransformersBackend.from_objects(model, processor)
    fmt = plugins.get("formats", "visguard")()
    recs = load_records(layouts["jsonl"])[:3]
    # one record with a single image: batches mix image counts
    recs[1] = type(recs[1])(**{**recs[1].__dict__, "images": recs[1].images[:1]})
    specs = example_specs(recs, "guard", ("fast", "reason"))
    assert [s.mode for s in specs] == ["fast", "reason"] * 3
    ds = ExampleDataset(specs, ExampleBuilder(backend.codec, fmt))
    batch = MultiImageCollator(processor, image_token_ids(processor), logits_to_keep=True)([ds[i] for i in range(len(ds))])
    tok = processor.tokenizer
    for row, spec in enumerate(specs):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        picked = labels[labels != IGNORE_INDEX]
        text = tok.decode(picked)
        request = spec.record
        prompt = fmt.build(backend_request(request), Policy(), mode=spec.mode, special_tokens=backend.special_tokens)
        expected = fmt.target(backend_request(request), Policy(), label=request.label, mode=spec.mode,
                              category=request.category, sub_category=request.sub_category,
                              reasoning=request.reasoning)[len(prompt.assistant_prefix):]
        assert text.startswith(expected), (arch, text, expected)
        # the labelled tokens are the last ones; the prompt before them is exactly what the guard encodes
        n_prompt = int(batch["attention_mask"][row].sum()) - len(picked)
        inference = backend.encode([prompt])["input_ids"][0]
        assert torch.equal(ids[len(ids) - len(picked) - n_prompt : len(ids) - len(picked)], inference)
        assert (labels[: len(ids) - len(picked)] == IGNORE_INDEX).all()
    for tid in image_token_ids(processor):
        assert not (batch["labels"] == tid).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[1] == batch["logits_to_keep"]


def backend_request(record):
    from visguard.core.types import GuardRequest

    return GuardRequest.build(list(record.images), record.text, record.response)


def test_loss_averages_over_tokens_or_over_examples_exactly_across_micro_batches():
    """token: every target token weighs the same; example: every example's mean weighs the same, and a
    global batch split into micro-batches (gradient accumulation) sums to the same loss."""
    import torch
    from visguard_train.encode import continuation_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 5:] = torch.tensor([1])  # a one-token target (a fast verdict)
    labels[1, 2:] = torch.tensor([2, 3, 4, 5])  # a long one (a reason target)
    labels[2, 4:] = torch.tensor([6, 7])
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    per_row = [ce[0, 4:].mean(), ce[1, 1:].mean(), ce[2, 3:].mean()]
    out = {"logits": logits}
    assert continuation_loss(out, labels).item() == pytest.approx(ce[labels[:, 1:] != IGNORE_INDEX].mean().item())
    assert continuation_loss(out, labels, torch.tensor(6)).item() == pytest.approx(ce.sum().item() / 6)
    example = continuation_loss(out, labels, average="example")
    assert example.item() == pytest.approx(sum(per_row).item() / 3)
    # logits of the last positions only (logits_to_keep): the same loss
    assert continuation_loss({"logits": logits[:, 1:]}, labels, average="example").item() == pytest.approx(example.item())
    split = sum(continuation_loss({"logits": logits[i:j]}, labels[i:j], average="example", examples_per_step=3)
                for i, j in ((0, 1), (1, 3)))
    assert split.item() == pytest.approx(example.item())
    with pytest.raises(ValueError, match="average"):
        continuation_loss(out, labels, average="sequence")
