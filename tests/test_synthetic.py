"""Tests for :mod:`visguard_testing.synthetic`."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from visguard_testing import synthetic as syn

LABELS = {"safe", "unsafe"}


def _png_ok(path: Path, size: int) -> bytes:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.size == (size, size)
    return path.read_bytes()


def _check_taxonomy(category, sub_category, label) -> None:
    assert label in LABELS
    if label == "unsafe":
        assert category in syn.MIS_TAXONOMY
        assert sub_category in syn.MIS_TAXONOMY[category]
    else:
        assert category is None and sub_category is None


def _check_rel_path(root: Path, rel: str, pattern: str, size: int) -> bytes:
    assert not Path(rel).is_absolute()
    assert re.fullmatch(pattern, rel), rel
    return _png_ok(root / rel, size)


# --------------------------------------------------------------------------- #
# Vocabulary / rule
# --------------------------------------------------------------------------- #


def test_taxonomy_shape() -> None:
    assert len(syn.MIS_TAXONOMY) == 6
    assert sum(len(v) for v in syn.MIS_TAXONOMY.values()) == 14
    assert syn.MIS_TAXONOMY["Privacy"] == ("Unauthorized Data Collection", "Identity Theft")
    assert syn.MIS_TAXONOMY["Erotic"] == ("Erotic Visual Content",)


def test_taxonomy_matches_policy() -> None:
    policy = pytest.importorskip("visguard.core.policy")
    cats = getattr(policy, "MIS_CATEGORIES", None)
    if cats is None:
        pytest.skip("visguard.core.policy.MIS_CATEGORIES not available")
    assert {c.name: tuple(c.sub_categories) for c in cats} == syn.MIS_TAXONOMY


def test_vocabulary_every_object_in_safe_and_unsafe_pairs() -> None:
    names = syn.OBJECT_NAMES
    for a in names:
        partners = [b for b in names if b != a]
        assert any(syn.is_unsafe_pair(a, b) for b in partners), a
        assert any(not syn.is_unsafe_pair(a, b) for b in partners), a
    for pair in syn.DANGEROUS_PAIRS:
        assert pair.sub_category in syn.MIS_TAXONOMY[pair.category]


def test_rule_is_order_insensitive() -> None:
    assert syn.ORDER_MATTERS is False
    for a in syn.OBJECT_NAMES:
        for b in syn.OBJECT_NAMES:
            assert syn.is_unsafe_pair(a, b) == syn.is_unsafe_pair(b, a)
    assert syn.is_unsafe_pair("kitchen knife", "sleeping person")
    assert syn.is_unsafe_pair("lighter", "gas can")
    assert syn.is_unsafe_pair("bedroom window", "camera")
    assert not syn.is_unsafe_pair("kitchen knife", "gas can")


# --------------------------------------------------------------------------- #
# Item generation
# --------------------------------------------------------------------------- #


def test_determinism() -> None:
    a = syn.generate_items(60, seed=3)
    b = syn.generate_items(60, seed=3)
    assert a == b
    for x, y in zip(a[:5], b[:5], strict=True):
        for ix, iy in zip(syn.render_images(x), syn.render_images(y), strict=True):
            assert ix.tobytes() == iy.tobytes()


def test_different_seeds_differ() -> None:
    a = syn.generate_items(40, seed=0)
    b = syn.generate_items(40, seed=1)
    assert not {it.id for it in a} & {it.id for it in b}
    assert not {it.render_seed for it in a} & {it.render_seed for it in b}
    assert [(it.objects, it.question) for it in a] != [(it.objects, it.question) for it in b]
    assert syn.render_images(a[0])[0].tobytes() != syn.render_images(b[0])[0].tobytes()


@pytest.mark.parametrize(
    ("n", "frac", "expected"), [(100, 0.5, 50), (101, 0.5, 50), (80, 0.25, 20), (10, 0.0, 0), (10, 1.0, 10)]
)
def test_label_balance(n: int, frac: float, expected: int) -> None:
    items = syn.generate_items(n, seed=0, unsafe_fraction=frac)
    assert len(items) == n
    counts = Counter(it.label for it in items)
    assert counts["unsafe"] == expected
    assert counts["safe"] == n - expected


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        syn.generate_items(-1)
    with pytest.raises(ValueError):
        syn.generate_items(10, unsafe_fraction=1.5)


def test_labels_follow_rule_and_taxonomy() -> None:
    items = syn.generate_items(300, seed=5)
    assert len({it.id for it in items}) == len(items)
    for it in items:
        a, b = it.objects
        assert a != b
        assert a in syn.OBJECTS and b in syn.OBJECTS
        assert (it.label == "unsafe") == syn.is_unsafe_pair(a, b)
        _check_taxonomy(it.category, it.sub_category, it.label)
        if it.label == "unsafe":
            pair = syn.danger_for(a, b)
            assert (it.category, it.sub_category) == (pair.category, pair.sub_category)


def test_every_object_in_both_labels() -> None:
    items = syn.generate_items(200, seed=0)
    seen = defaultdict(set)
    for it in items:
        for o in it.objects:
            seen[o].add(it.label)
    assert set(seen) == set(syn.OBJECT_NAMES)
    assert all(labels == LABELS for labels in seen.values())


def test_single_image_does_not_determine_label() -> None:
    items = syn.generate_items(600, seed=2)
    by_pos = defaultdict(Counter)
    by_obj = defaultdict(Counter)
    for it in items:
        for pos, o in enumerate(it.objects):
            by_pos[(pos, o)][it.label] += 1
            by_obj[o][it.label] += 1
    # For each object, in either image slot, both labels occur.
    for pos in (0, 1):
        for o in syn.OBJECT_NAMES:
            assert by_pos[(pos, o)]["safe"] > 0 and by_pos[(pos, o)]["unsafe"] > 0, (pos, o)
    # ... and no object is strongly predictive on its own.
    for o, c in by_obj.items():
        rate = c["unsafe"] / (c["safe"] + c["unsafe"])
        assert 0.3 <= rate <= 0.7, (o, rate)
    # Every dangerous pair occurs in both image orders.
    orders = {it.objects for it in items if it.label == "unsafe"}
    for pair in syn.DANGEROUS_PAIRS:
        a, b = sorted(pair.objects)
        assert (a, b) in orders and (b, a) in orders


def test_questions_carry_no_label_signal() -> None:
    items = syn.generate_items(400, seed=1)
    safe_q = Counter(it.question for it in items if it.label == "safe")
    unsafe_q = Counter(it.question for it in items if it.label == "unsafe")
    assert set(safe_q) == set(unsafe_q) == set(syn.QUESTION_TEMPLATES)
    # Questions never name the objects.
    for q in syn.QUESTION_TEMPLATES:
        for name in syn.OBJECT_NAMES:
            assert name.lower() not in q.lower()


def test_guard_target_and_answer_format() -> None:
    items = syn.generate_items(40, seed=0)
    for it in items:
        lines = it.guard_target.split("\n")
        assert len(lines) == 5
        assert lines[0].startswith("Image 1: ") and it.objects[0] in lines[0]
        assert lines[1].startswith("Image 2: ") and it.objects[1] in lines[1]
        assert lines[2].startswith("Reasoning: ") and lines[2].endswith(".")
        assert lines[3] == f"Verdict: {it.label}"
        if it.label == "safe":
            assert lines[4] == "Category: none"
        else:
            assert lines[4] == f"Category: {it.category} / {it.sub_category}"
        assert it.answer.startswith("Image 1 shows ")
        assert "Image 2 shows " in it.answer
        assert it.objects[0] in it.answer and it.objects[1] in it.answer
        if it.label == "unsafe":
            assert f"{it.category} / {it.sub_category}" in it.answer
            assert "can't help" in it.answer
        else:
            assert "can't help" not in it.answer


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def test_render_images_size_and_mode() -> None:
    item = syn.generate_items(1, seed=0)[0]
    for size in (56, 32, 112):
        imgs = syn.render_images(item, size=size)
        assert len(imgs) == 2
        for im in imgs:
            assert im.mode == "RGB" and im.size == (size, size)
    assert syn.render_images(item)[0].size == (56, 56)


def test_jitter_makes_instances_unique() -> None:
    items = syn.generate_items(120, seed=0)
    hashes = [hashlib.sha1(im.tobytes()).hexdigest() for it in items for im in syn.render_images(it)]
    assert len(set(hashes)) == len(hashes)


def test_objects_are_visually_distinguishable() -> None:
    """Nearest-centroid on a 4x4 colour thumbnail identifies every object."""

    def feat(im: Image.Image) -> np.ndarray:
        return np.asarray(im.resize((4, 4), Image.BILINEAR), dtype=np.float32).ravel()

    names = syn.OBJECT_NAMES
    centroids = np.stack(
        [np.mean([feat(syn.render_object(n, seed=s)) for s in range(8)], axis=0) for n in names]
    )
    for k, n in enumerate(names):
        for s in range(100, 110):
            d = np.linalg.norm(centroids - feat(syn.render_object(n, seed=s)), axis=1)
            assert int(np.argmin(d)) == k, n


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


def test_train_test_split() -> None:
    items = syn.generate_items(200, seed=0)
    train, test = syn.train_test_split(items, 0.25, seed=0)
    assert (train, test) == syn.train_test_split(items, 0.25, seed=0)
    assert len(test) == 50 and len(train) == 150
    assert Counter(it.label for it in test) == {"safe": 25, "unsafe": 25}
    assert {it.id for it in train}.isdisjoint(it.id for it in test)
    assert {it.id for it in train} | {it.id for it in test} == {it.id for it in items}
    # Held-out images are fresh instances, never seen in training.
    train_imgs = {im.tobytes() for it in train for im in syn.render_images(it)}
    assert all(im.tobytes() not in train_imgs for it in test for im in syn.render_images(it))
    assert syn.train_test_split(items, 0.25, seed=1)[1] != test


# --------------------------------------------------------------------------- #
# Writers
# --------------------------------------------------------------------------- #


MIS_TEST_KEYS = {"id", "question", "category", "sub_category", "image_path1", "image_path2", "label"}


def test_write_mis_test_layout(tmp_path: Path) -> None:
    root = syn.write_mis_test_layout(tmp_path / "mis", size=56)
    assert root == tmp_path / "mis"
    questions = set()
    per_split_imgs = {}
    for split in ("easy", "hard"):
        records = json.loads((root / f"mis_{split}.json").read_text())
        assert isinstance(records, list) and len(records) == 40
        assert Counter(r["label"] for r in records) == {"safe": 20, "unsafe": 20}
        imgs = set()
        for n, r in enumerate(records):
            assert set(r) == MIS_TEST_KEYS
            _check_taxonomy(r["category"], r["sub_category"], r["label"])
            assert r["question"] in syn.QUESTION_TEMPLATES
            questions.add(r["question"])
            for k in (1, 2):
                rel = r[f"image_path{k}"]
                assert rel == f"{split}_image/{n}/object{k}.png"
                imgs.add(_check_rel_path(root, rel, rf"{split}_image/\d+/object{k}\.png", 56))
        per_split_imgs[split] = imgs
    assert per_split_imgs["easy"].isdisjoint(per_split_imgs["hard"])
    assert sorted(p.name for p in root.glob("mis_*.json")) == ["mis_easy.json", "mis_hard.json"]


def test_write_mis_test_layout_custom_splits(tmp_path: Path) -> None:
    root = syn.write_mis_test_layout(tmp_path, {"real": 6}, seed=4, size=32)
    records = json.loads((root / "mis_real.json").read_text())
    assert len(records) == 6
    _png_ok(root / records[0]["image_path1"], 32)
    # Deterministic: rewriting elsewhere gives identical bytes.
    root2 = syn.write_mis_test_layout(tmp_path / "again", {"real": 6}, seed=4, size=32)
    assert (root2 / "mis_real.json").read_text() == (root / "mis_real.json").read_text()
    assert (root2 / "real_image/0/object1.png").read_bytes() == (
        root / "real_image/0/object1.png"
    ).read_bytes()


def test_write_mis_train_layout(tmp_path: Path) -> None:
    root = syn.write_mis_train_layout(tmp_path / "train", n=30, seed=0, size=56)
    records = json.loads((root / "mis_train.json").read_text())
    assert len(records) == 30
    assert Counter(r["label"] for r in records) == {"safe": 15, "unsafe": 15}
    train_imgs = set()
    for n, r in enumerate(records):
        assert {"image", "conversations", "category", "sub_category", "label"} <= set(r)
        _check_taxonomy(r["category"], r["sub_category"], r["label"])
        assert r["image"] == [f"train_image/{n}/object1.png", f"train_image/{n}/object2.png"]
        for rel in r["image"]:
            train_imgs.add(_check_rel_path(root, rel, r"train_image/\d+/object[12]\.png", 56))
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n<image>\n")
        assert human["value"].removeprefix("<image>\n<image>\n") in syn.QUESTION_TEMPLATES
        assert gpt["value"].startswith("Image 1 shows ")
        assert ("can't help" in gpt["value"]) == (r["label"] == "unsafe")
    # Train and test layouts with the same seed never share image instances.
    test_root = syn.write_mis_test_layout(tmp_path / "test", {"easy": 30}, seed=0)
    test_imgs = {
        (test_root / p).read_bytes()
        for p in (f"easy_image/{i}/object{k}.png" for i in range(30) for k in (1, 2))
    }
    assert train_imgs.isdisjoint(test_imgs)


def test_write_jsonl(tmp_path: Path) -> None:
    path = syn.write_jsonl(tmp_path, 20, seed=7, size=48, name="val.jsonl")
    assert path == tmp_path / "val.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 20
    items = syn.generate_items(20, seed=7)
    for line, it in zip(lines, items, strict=True):
        rec = json.loads(line)
        assert set(rec) == {"id", "images", "text", "label", "category", "sub_category", "response", "target"}
        assert rec["id"] == it.id and rec["text"] == it.question
        assert rec["response"] is None
        assert rec["target"] == it.guard_target
        assert rec["target"].split("\n")[3] == f"Verdict: {rec['label']}"
        _check_taxonomy(rec["category"], rec["sub_category"], rec["label"])
        assert len(rec["images"]) == 2
        for k, rel in enumerate(rec["images"], start=1):
            data = _check_rel_path(tmp_path, rel, rf"val_image/\d+/object{k}\.png", 48)
        # Written images are exactly the rendered ones.
        with Image.open(tmp_path / rec["images"][1]) as im:
            assert im.tobytes() == syn.render_images(it, size=48)[1].tobytes()
        assert data


def test_write_jsonl_subsets_are_safe_parts_in_the_shapes_attribution_scores(tmp_path: Path) -> None:
    """``subsets=True``: after each item, its parts alone as safe requests, each exactly a request that
    attribution builds (``visguard.engine.attribution.subset_request`` over ``subsets(2, True)``)."""
    from visguard.core.types import GuardRequest
    from visguard.datasets import read_jsonl
    from visguard.engine.attribution import subset_request, subsets

    plain = [json.loads(line) for line in syn.write_jsonl(tmp_path / "plain", 12, seed=3).read_text().splitlines()]
    path = syn.write_jsonl(tmp_path / "aug", 12, seed=3, subsets=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    records = {r.id: r for r in read_jsonl(path)}
    items = [r for r in rows if "/" not in r["id"]]
    assert items == plain  # the two-image items are unchanged
    # every part of fewer than two images that attribution scores is written (the two images without
    # the text are not: the rule does not say whether a harmful pair is unsafe without its question)
    scored = {(s, t) for s, t in subsets(2, True) if len(s) < 2}
    assert scored and scored <= {(idx, text) for _, idx, text in syn.SUBSET_KINDS}
    for item in items:
        parts = [r for r in rows if r["id"].startswith(item["id"] + "/")]
        assert len(parts) == len(syn.SUBSET_KINDS)
        full = GuardRequest.build([tmp_path / "aug" / p for p in item["images"]], item["text"])
        for (kind, idx, with_text), part in zip(syn.SUBSET_KINDS, parts, strict=True):
            assert part["id"] == f"{item['id']}/{kind}"
            assert part["label"] == "safe" and part["category"] is None
            assert part["target"].split("\n")[-2:] == ["Verdict: safe", "Category: none"]
            expected = subset_request(full, idx, with_text)
            got = records[part["id"]]
            assert got.text == expected.text == (item["text"] if with_text else "")
            assert [Path(p) for p in got.images] == [Path(tmp_path / "aug" / item["images"][k]) for k in idx]
            assert len(expected.images) == len(got.images)
            # the reasoning describes the images shown, numbered as the subset request numbers them
            perceptions = [line for line in part["target"].split("\n") if line.startswith("Image ")]
            assert len(perceptions) == len(idx)


def test_write_jsonl_subsets_per_item_samples_the_kinds(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in
            syn.write_jsonl(tmp_path, 60, seed=0, subsets=True, subsets_per_item=1).read_text().splitlines()]
    parts = [r for r in rows if "/" in r["id"]]
    assert len(rows) == 120 and len(parts) == 60
    assert all(rows[2 * i + 1]["id"].startswith(rows[2 * i]["id"] + "/") for i in range(60))
    kinds = Counter(r["id"].split("/")[1] for r in parts)
    assert set(kinds) == {k for k, _, _ in syn.SUBSET_KINDS}  # every kind drawn
    assert {r["label"] for r in parts} == {"safe"}
    with pytest.raises(ValueError, match="subsets_per_item"):
        syn.write_jsonl(tmp_path, 2, subsets=True, subsets_per_item=6)


def test_write_jsonl_subsets_without_reasoning_give_the_verdict_only(tmp_path: Path) -> None:
    """``subsets_reasoning=False``: the parts carry no reasoning (``visguard train`` makes fast-mode
    examples of them only); the two-image items keep theirs."""
    from visguard.datasets import read_jsonl

    path = syn.write_jsonl(tmp_path, 6, seed=1, subsets=True, subsets_reasoning=False)
    records = read_jsonl(path)
    parts = [r for r in records if "/" in r.id]
    assert len(parts) == 6 * len(syn.SUBSET_KINDS)
    assert all(r.reasoning is None and r.label == "safe" for r in parts)
    assert all(r.reasoning for r in records if "/" not in r.id)
