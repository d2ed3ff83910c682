"""`visguard train --distill`: the fast verdict examples learn a teacher guard's reason-mode verdicts.

What is checked without training (the teacher is a stub with the :class:`visguard.Guard` surface
that ``visguard_train.distill`` uses): which examples take the teacher's verdict and which keep the
record's own label, that an unavailable teacher verdict gives no fast example (fail closed), the
rendered target, the labels file, and the option's validation.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("visguard_train")

from click.testing import CliRunner  # noqa: E402
from visguard_testing.synthetic import write_mis_train_layout  # noqa: E402
from visguard_train import build_config, load_records  # noqa: E402
from visguard_train.distill import LABELS_FILE, distilled_fast_labels  # noqa: E402
from visguard_train.encode import ExampleBuilder, example_specs  # noqa: E402

from visguard import Policy, plugins  # noqa: E402
from visguard.cli import _register_plugin_commands, cli  # noqa: E402
from visguard.core.errors import InputError  # noqa: E402
from visguard.core.types import Verdict  # noqa: E402


class StubTeacher:
    """Answers reason-mode checks with fixed verdicts, in request order; records the modes asked."""

    def __init__(self, verdicts):
        self.verdicts = list(verdicts)
        self.policy = Policy()
        self.modes = []

    def report_batch(self, requests, *, mode=None):
        self.modes.append(mode)
        out, self.verdicts = self.verdicts[: len(requests)], self.verdicts[len(requests):]
        return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_records(write_mis_train_layout(tmp_path_factory.mktemp("mt"), 4, seed=5))


def _teacher_verdicts(records):
    """The teacher says the opposite of the first record's label, is unavailable on the second, agrees on the rest."""
    flip = {"safe": "unsafe", "unsafe": "safe"}
    out = [Verdict(label=flip[records[0].label], score=0.9 if records[0].label == "safe" else 0.1, mode="reason"),
           Verdict(label="unavailable", error="unparseable guard output", mode="reason")]
    return out + [Verdict(label=r.label, score=1.0 if r.label == "unsafe" else 0.0, mode="reason") for r in records[2:]]


def test_fast_examples_take_the_teachers_reason_verdicts_and_the_rest_keep_the_labels(records, tmp_path):
    teacher = StubTeacher(_teacher_verdicts(records))
    labels = distilled_fast_labels("TEACHER", "base", records, tmp_path, guard=teacher)
    assert set(teacher.modes) == {"reason"}
    flipped = {"safe": "unsafe", "unsafe": "safe"}[records[0].label]
    assert labels == [flipped, None, *[r.label for r in records[2:]]]

    rows = [json.loads(line) for line in (tmp_path / LABELS_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert rows[0]["teacher_label"] == flipped and rows[0]["label"] == records[0].label
    assert rows[1]["teacher_label"] is None and "unparseable" in rows[1]["error"]

    # guard objective: fast examples on the teacher's verdicts (none where it was unavailable);
    # reason examples keep the records' labels
    specs = example_specs(records, "guard", ("fast", "reason"), labels)
    fast = [s for s in specs if s.mode == "fast"]
    assert [s.record.id for s in fast] == [records[0].id, *[r.id for r in records[2:]]]
    assert fast[0].label == flipped
    assert all(s.label is None for s in specs if s.mode == "reason") and sum(s.mode == "reason" for s in specs) == 4
    # mirage objective: answers and follow-up verdicts keep the labels, the fast verdict is distilled
    mirage = example_specs(records, "mirage", ("fast",), labels)
    assert [s.objective for s in mirage if s.record.id == records[1].id] == ["response", "followup"]
    assert [(s.objective, s.label) for s in mirage if s.record.id == records[0].id] == [
        ("response", None), ("followup", None), ("guard", flipped)]
    # without a teacher nothing changes: every example on the record's label
    assert all(s.label is None for s in example_specs(records, "mirage", ("fast",)))


def test_the_rendered_fast_target_is_the_teachers_verdict(records, qwen_path):
    from transformers import AutoProcessor

    from visguard.integrations.hf import HFPromptCodec

    flipped = {"safe": "unsafe", "unsafe": "safe"}[records[0].label]
    builder = ExampleBuilder(HFPromptCodec(AutoProcessor.from_pretrained(qwen_path)), plugins.get("formats", "visguard")())
    spec = example_specs(records[:1], "guard", ("fast",), [flipped])[0]
    assert builder.build(spec).continuation.startswith(f" {flipped}\nCategory:")
    mirage = ExampleBuilder(builder.codec, plugins.get("formats", "mirage")())
    by_objective = {s.objective: mirage.build(s).continuation for s in example_specs(records[:1], "mirage", ("fast",), [flipped])}
    assert by_objective["guard"].startswith(flipped.capitalize())  # the distilled fast verdict
    assert by_objective["followup"].startswith(records[0].label.capitalize())  # the label, after the answer


def test_distill_needs_a_fast_verdict_to_teach(tmp_path, records):
    for bad in ({"objective": "response"}, {"guard_modes": "reason"}):
        with pytest.raises(InputError, match="distill teaches the fast verdict"):
            build_config({}, {"distill": "self", **bad})
    assert build_config({}, {"distill": "self", "objective": "mirage"}).distill == "self"
    _register_plugin_commands()
    res = CliRunner().invoke(cli, ["train", "--data", str(tmp_path), "--base", "m", "-o", str(tmp_path / "o"),
                                   "--objective", "response", "--distill", "self"])
    assert res.exit_code == 2 and "distill teaches the fast verdict" in res.output and "Traceback" not in res.output
