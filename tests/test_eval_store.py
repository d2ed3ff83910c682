"""Result streaming: durable rows, torn last line after a crash, no duplicates, refused foreign resumes."""

from __future__ import annotations

import json

import pytest

from visguard.eval.store import ResultStore, ResumeError, read_rows

META = {"kind": "guard", "benchmark": "mis", "model": "m1"}


def test_rows_stream_and_reopen_resumes(tmp_path):
    with ResultStore(tmp_path, meta=META) as store:
        store.append({"id": "a", "v": 1})
        store.append({"id": "b", "v": 2})
        store.append({"id": "a", "v": 99})  # an id that is done is never written twice
        # durable before close: another reader sees both rows now
        assert [r["id"] for r in read_rows(tmp_path / "results.jsonl")] == ["a", "b"]
    with ResultStore(tmp_path, meta=META) as store:
        assert store.done == {"a", "b"} and store.resumed == 2
        store.append({"id": "c", "v": 3})
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]
    assert json.loads((tmp_path / "run.json").read_text()) == META


def test_torn_last_line_is_dropped_and_appending_continues(tmp_path):
    with ResultStore(tmp_path, meta=META) as store:
        store.append({"id": "a"})
        store.append({"id": "b"})
    path = tmp_path / "results.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"id": "c", "pred": "uns')  # killed mid-write
    assert [r["id"] for r in read_rows(path)] == ["a", "b"]
    with ResultStore(tmp_path, meta=META) as store:
        assert store.done == {"a", "b"}
        store.append({"id": "c", "pred": "unsafe"})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_complete_last_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    (tmp_path / "run.json").write_text(json.dumps(META))
    with ResultStore(tmp_path, meta=META) as store:
        assert store.done == {"a", "b"}
        store.append({"id": "c"})
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_duplicate_rows_count_once_and_corrupt_middle_rows_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "a", "v": 2}\n{"id": "b"}\n')
    assert [(r["id"], r.get("v")) for r in read_rows(path)] == [("a", 1), ("b", None)]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ResumeError, match="line 2 is not a result row"):
        read_rows(path)


def test_resuming_another_runs_results_is_refused_unless_restarted(tmp_path):
    with ResultStore(tmp_path, meta=META) as store:
        store.append({"id": "a"})
    with pytest.raises(ResumeError, match=r"different run \(model: 'm1' then, 'm2' now\).*--restart"):
        ResultStore(tmp_path, meta={**META, "model": "m2"}).open()
    with ResultStore(tmp_path, meta={**META, "model": "m2"}, restart=True) as store:
        assert store.done == set()
        store.append({"id": "z"})
    assert [r["id"] for r in read_rows(tmp_path / "results.jsonl")] == ["z"]


def test_one_writer_per_directory(tmp_path):
    with ResultStore(tmp_path, meta=META):
        with pytest.raises(ResumeError, match="in use by another"):
            ResultStore(tmp_path, meta=META).open()
    with ResultStore(tmp_path, meta=META) as store:  # released on close
        assert store.resumed == 0
