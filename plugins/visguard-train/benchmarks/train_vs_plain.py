"""`visguard train` against a plain PyTorch loop: same base model, data, hyper-parameters and evaluation.

Each variant trains the same tiny random-init Qwen2-VL (``visguard_testing.checkpoints``) on the same
synthetic two-image training set (``visguard_testing.synthetic.write_jsonl``; each image is benign
alone, only the pair is unsafe) and is scored the same way: visguard's ``Guard`` in fast mode (one
forward pass, P(unsafe) from the verdict token) on a held-out split of fresh items, accuracy at the
policy's threshold and AUROC.

- ``visguard``: ``visguard_train.run.run_training`` (what ``visguard train`` runs), with the
  variant's extra options.
- ``plain``: the loop below, written from the processor and the model only (not from
  ``visguard_train``): the guard format's prompt and target per example, the processor's chat
  template, prompt tokens labelled -100, the model's own causal-LM loss (mean over the batch's
  target tokens), ``torch.optim.AdamW``, linear warm-up then cosine decay, a seeded shuffle per epoch.

Every variant runs in a child process of its own (no state carried from one to the next), with a
fixed number of torch threads. ``--jobs 2`` runs two at a time.

Usage::

    python plugins/visguard-train/benchmarks/train_vs_plain.py                    # default: visguard vs plain, 400 items, 20 epochs
    python plugins/visguard-train/benchmarks/train_vs_plain.py --variants all --epochs 5 --json
    python plugins/visguard-train/benchmarks/train_vs_plain.py --list             # the variants and what each changes
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Variant:
    """One way to train: the trainer (``visguard`` or ``plain``), guard modes, and what else it changes."""

    name: str
    kind: str
    modes: tuple[str, ...] = ("fast", "reason")
    #: extra TrainConfig values (visguard) or loop options (plain: clip, shuffle_pairs)
    options: dict[str, Any] = field(default_factory=dict)
    about: str = ""


VARIANTS = {
    v.name: v
    for v in [
        Variant("visguard", "visguard", options={"loss_average": "token"},
                about="visguard train, fast + reason examples, every target token weighs the same "
                      "(--loss-average token, the default before issue 26)"),
        Variant("plain", "plain", about="plain PyTorch loop, fast + reason examples"),
        Variant("visguard-fast", "visguard", ("fast",), options={"loss_average": "token"},
                about="visguard train, fast examples only (token average)"),
        Variant("plain-fast", "plain", ("fast",), about="plain loop, fast examples only"),
        Variant("plain-clip", "plain", options={"clip": 1.0},
                about="plain loop + gradient clipping at norm 1.0 (the HF Trainer's default)"),
        Variant("visguard-noclip", "visguard", options={"loss_average": "token", "max_grad_norm": 0.0},
                about="visguard train without gradient clipping (token average)"),
        Variant("visguard-example", "visguard", options={"loss_average": "example"},
                about="visguard train, every example weighs the same in the loss, not every token "
                      "(--loss-average example, the default)"),
        Variant("plain-example", "plain", options={"loss_average": "example"},
                about="plain loop, every example weighs the same in the loss"),
        Variant("visguard-example-noclip", "visguard", options={"loss_average": "example", "max_grad_norm": 0.0},
                about="visguard-example without gradient clipping"),
        Variant("visguard-example-fast", "visguard", ("fast",), options={"loss_average": "example"},
                about="visguard-example, fast examples only"),
        Variant("visguard-layout1", "visguard", options={"loss_average": "token", "layout": 1},
                about="visguard train on the visguard format's prompt layout 1 (images first, then the instructions; "
                      "token average)"),
    ]
}
DEFAULT_VARIANTS = ("visguard", "plain")


@dataclass
class Settings:
    train: int = 400
    test: int = 200
    epochs: float = 20.0
    lr: float = 4e-3
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    threads: int = 1
    #: ``jsonl``: visguard JSONL (perception lines + short reasoning); ``mis``: the MIS layouts
    #: (``mis_train.json`` with the MIS answer as the rationale; held-out: a ``mis_hard.json`` split)
    data: str = "jsonl"


# ----------------------------------------------------------------------------- data
def make_data(workdir: Path, s: Settings) -> tuple[Path, Path]:
    from visguard_testing.synthetic import write_jsonl, write_mis_test_layout, write_mis_train_layout

    if s.data == "mis":
        root = workdir / f"mis-{s.train}-{s.test}"
        train, test = root / "mis_train.json", root / "mis_hard.json"
        if not (train.is_file() and test.is_file()):
            write_mis_train_layout(root, s.train, seed=1)
            write_mis_test_layout(root, {"hard": s.test}, seed=0)  # other items, fresh images
        return train, test
    root = workdir / f"data-{s.train}-{s.test}"
    train, test = root / "train.jsonl", root / "test.jsonl"
    if not (train.is_file() and test.is_file()):
        write_jsonl(root, s.train, seed=0, name="train.jsonl")
        write_jsonl(root, s.test, seed=1, name="test.jsonl")  # other items, fresh images
    return train, test


def base_model(s: Settings) -> Path:
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    return cached_tiny_checkpoint("qwen2_vl", hidden_size=s.hidden, num_layers=s.layers)


# ----------------------------------------------------------------------------- the two trainers
def train_visguard(v: Variant, s: Settings, data: Path, out: Path) -> None:
    from visguard_train.config import build_config
    from visguard_train.run import run_training

    options = dict(v.options)
    layout = options.pop("layout", None)
    if layout is not None:  # this child process only: the visguard format builds (and records) that layout
        from visguard.default_plugins.visguard_format import VisguardFormat

        VisguardFormat.__init__.__defaults__ = (layout,)
    config = build_config(flag_values={
        "data": str(data), "base": str(base_model(s)), "output": str(out), "device": "cpu",
        "epochs": s.epochs, "lr": s.lr, "batch_size": s.batch_size, "warmup_ratio": s.warmup_ratio,
        "weight_decay": s.weight_decay, "seed": s.seed, "guard_modes": v.modes, "save_steps": 10**9,
        "logging_steps": 10**9, "overwrite": True, **options,
    })
    run_training(config)


def plain_examples(data: Path, modes: tuple[str, ...], processor: Any) -> list[tuple[str, str, list[Any]]]:
    """(prompt text, target text, images) per example: the guard format's prompt through the chat template."""
    from PIL import Image

    from visguard.core.policy import Policy
    from visguard.core.types import GuardRequest
    from visguard.datasets import read_jsonl, reasoning_of
    from visguard.default_plugins.visguard_format import VisguardFormat

    fmt, policy, eot = VisguardFormat(), Policy(), "<|im_end|>"
    examples = []
    for rec in read_jsonl(data):
        request = GuardRequest.build(list(rec.images), rec.text)
        images = [Image.open(p).convert("RGB") for p in rec.images]
        for mode in modes:
            reasoning = reasoning_of(fmt, rec) if mode == "reason" else None
            if mode == "reason" and not reasoning:
                continue
            prompt = fmt.build(request, policy, mode=mode)
            text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
            target = fmt.target(request, policy, label=rec.label, mode=mode, category=rec.category,
                                sub_category=rec.sub_category, reasoning=reasoning)
            examples.append((text + prompt.assistant_prefix, target[len(prompt.assistant_prefix):] + eot, images))
    return examples


def plain_batch(processor: Any, rows: list[tuple[str, str, list[Any]]]) -> dict[str, Any]:
    """Right-padded prompt + target tokens; labels are the target tokens, everything else -100."""
    enc = processor(text=[p + t for p, t, _ in rows], images=[im for _, _, ims in rows for im in ims],
                    padding=True, padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].clone()
    for r, (p, _, ims) in enumerate(rows):  # prompt tokens (with their image tokens) learn nothing
        labels[r, : processor(text=[p], images=ims or None, return_tensors="pt")["input_ids"].shape[1]] = -100
    labels[enc["attention_mask"] == 0] = -100
    return {**enc, "labels": labels}


def train_plain(v: Variant, s: Settings, data: Path, out: Path) -> None:
    """A plain loop: the guard format's prompts and targets, the processor, the model's loss, AdamW."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(s.seed)
    processor = AutoProcessor.from_pretrained(base_model(s))
    model = AutoModelForImageTextToText.from_pretrained(base_model(s), dtype=torch.float32)
    examples = plain_examples(data, v.modes, processor)
    batch_of = functools.partial(plain_batch, processor)

    steps_per_epoch = math.ceil(len(examples) / s.batch_size)
    total = math.ceil(steps_per_epoch * s.epochs)
    warmup = math.ceil(total * s.warmup_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / (warmup + 1) if k < warmup else
                                              0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(s.seed)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), s.batch_size):
            batch = batch_of([examples[j] for j in order[i:i + s.batch_size]])
            if v.options.get("loss_average") == "example":  # mean over each example's tokens, then over examples
                logits, labels = model(**{k: x for k, x in batch.items() if k != "labels"}).logits, batch["labels"]
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
                mask = labels[:, 1:] != -100
                loss = ((ce * mask).sum(1) / mask.sum(1)).mean()
            else:
                loss = model(**batch).loss  # the model's own loss: mean over the batch's target tokens
            loss.backward()
            if v.options.get("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), v.options["clip"])
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step >= total:
                break
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "visguard.json").write_text(json.dumps({"format": "visguard", "format_kwargs": {"version": 2}}))


def check_encoding(s: Settings, data: Path, n: int = 4) -> list[dict[str, Any]]:
    """The first ``n`` records' examples as both trainers batch them: same target tokens, same loss per example.

    visguard's collator left-pads and asks for the last positions' logits only; the plain loop
    right-pads and computes every position. Both must feed the model the same tokens and give each
    example the same loss (under the base model, in eval mode).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visguard_train.data import load_records
    from visguard_train.encode import (
        ExampleBuilder,
        ExampleDataset,
        MultiImageCollator,
        continuation_loss,
        example_specs,
        image_token_ids,
    )

    from visguard import plugins
    from visguard.integrations.hf import HFPromptCodec

    processor = AutoProcessor.from_pretrained(base_model(s))
    model = AutoModelForImageTextToText.from_pretrained(base_model(s), dtype=torch.float32).eval()
    specs = example_specs(load_records(data)[:n], "guard", ("fast", "reason"))
    dataset = ExampleDataset(specs, ExampleBuilder(HFPromptCodec(processor), plugins.get("formats", "visguard")()))
    collate = MultiImageCollator(processor, image_token_ids(processor), logits_to_keep=True)
    rows = []
    with torch.no_grad():
        for i, (spec, plain) in enumerate(zip(specs, plain_examples(data, ("fast", "reason"), processor)[:len(specs)],
                                              strict=True)):
            vb, pb = collate([dataset[i]]), plain_batch(processor, [plain])
            v_loss = continuation_loss(model(**{k: x for k, x in vb.items() if k != "labels"}), vb["labels"])
            p_loss = model(**pb).loss
            rows.append({"example": i, "mode": spec.mode,
                         "same_tokens": torch.equal(vb["input_ids"][vb["attention_mask"].bool()],
                                                    pb["input_ids"][pb["attention_mask"].bool()]),
                         "same_targets": torch.equal(vb["labels"][vb["labels"] != -100], pb["labels"][pb["labels"] != -100]),
                         "loss_visguard": round(float(v_loss), 6), "loss_plain": round(float(p_loss), 6)})
    return rows


def loss_shares(data: Path, s: Settings, objective: str = "guard") -> dict[str, Any]:
    """How much of the training loss the fast verdict token carries, under each loss average.

    Counts, over every training example of ``data``, the continuation tokens each example is trained on;
    the fast verdict is the first continuation token of a ``fast`` example (the word after ``Verdict:``,
    ``Safe``/``Unsafe`` for mirage). Under ``token`` averaging a token's weight is 1 / (all target
    tokens); under ``example`` averaging it is 1 / (examples x the tokens of its own example).
    """
    from transformers import AutoProcessor
    from visguard_train.data import load_records
    from visguard_train.encode import ExampleBuilder, ExampleDataset, example_specs

    from visguard import plugins
    from visguard.integrations.hf import HFPromptCodec

    processor = AutoProcessor.from_pretrained(base_model(s))
    fmt = "mirage" if objective == "mirage" else "visguard"
    specs = example_specs(load_records(data), objective, ("fast", "reason"))
    dataset = ExampleDataset(specs, ExampleBuilder(HFPromptCodec(processor), plugins.get("formats", fmt)()))
    lengths = [(spec.objective, spec.mode, len(dataset[i]["continuation_ids"])) for i, spec in enumerate(specs)]
    total = sum(n for _, _, n in lengths)
    fast = [n for o, m, n in lengths if o == "guard" and m == "fast"]
    kinds: dict[str, list[int]] = {}
    for o, m, n in lengths:
        kinds.setdefault(f"{o}:{m}" if m else o, []).append(n)
    return {"objective": objective, "examples": len(lengths), "target_tokens": total,
            "mean_target_tokens": {k: round(sum(v) / len(v), 1) for k, v in kinds.items()},
            "fast_verdict_share_token_average": round(len(fast) / total, 4),
            "fast_verdict_share_example_average": round(sum(1 / n for n in fast) / len(lengths), 4)}


def token_losses(model_dir: Path, data: Path, n: int = 16) -> dict[str, Any]:
    """Mean loss of a trained guard at the tokens that need the images, on its first ``n`` training records.

    Reason examples: the object name after ``Image N shows a`` (needs one image) and the verdict word
    (follows from the text the example already wrote); fast examples: the verdict word (needs both
    images). ``ln 2`` = 0.693 is a coin flip between two verdict words.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from visguard_train.data import load_records
    from visguard_train.encode import (
        IGNORE_INDEX,
        ExampleBuilder,
        ExampleDataset,
        MultiImageCollator,
        example_specs,
        image_token_ids,
    )

    from visguard import plugins
    from visguard.integrations.hf import HFPromptCodec

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    specs = example_specs(load_records(data)[:n], "guard", ("fast", "reason"))
    dataset = ExampleDataset(specs, ExampleBuilder(HFPromptCodec(processor), plugins.get("formats", "visguard")()))
    collate, tok = MultiImageCollator(processor, image_token_ids(processor)), processor.tokenizer
    kinds: dict[str, list[float]] = {"fast_verdict": [], "reason_object_name": [], "reason_verdict": [], "other": []}
    with torch.no_grad():
        for start in range(0, len(specs), 8):
            batch = collate([dataset[j] for j in range(start, min(start + 8, len(specs)))])
            logits = model(**{k: x for k, x in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                                   ignore_index=IGNORE_INDEX)
            for r in range(labels.shape[0]):
                positions = (labels[r] != IGNORE_INDEX).nonzero().flatten().tolist()
                if specs[start + r].mode == "fast":
                    kinds["fast_verdict"].append(float(ce[r, positions[0]]))
                    kinds["other"] += [float(ce[r, q]) for q in positions[1:]]
                    continue
                text = ""
                for q in positions:
                    piece = tok.decode([int(labels[r, q])])
                    kind = ("reason_object_name" if text.rstrip().endswith(("shows a", "shows an")) else
                            "reason_verdict" if text.rstrip().endswith("Verdict:") else "other")
                    kinds[kind].append(float(ce[r, q]))
                    text += piece
    return {"model": str(model_dir), "records": n,
            **{k: round(sum(v) / len(v), 3) if v else None for k, v in kinds.items()}}


# ----------------------------------------------------------------------------- evaluation
def evaluate(model_dir: Path, test: Path) -> dict[str, Any]:
    """Fast-mode accuracy and AUROC of a trained guard on held-out data, through visguard's Guard."""
    from visguard_train.data import load_records

    from visguard import Guard
    from visguard.eval import EvalItem, evaluate_guard

    guard = Guard.from_pretrained(str(model_dir), device="cpu")
    items = [EvalItem.of(r) for r in load_records(test)]
    summary = evaluate_guard(guard, items, mode="fast", batch_size=16, progress=False, plots=False)
    fp, tn = summary.confusion["fp"], summary.confusion["tn"]
    return {"accuracy": summary.accuracy, "auroc": summary.auroc, "fpr": round(fp / max(fp + tn, 1), 3),
            "n": summary.n, "unavailable": summary.unavailable}


def run_one(name: str, s: Settings, workdir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(s.threads)
    v = VARIANTS[name]
    train, test = make_data(workdir, s)
    out = workdir / f"{name}-{s.data}{s.train}-t{s.threads}-seed{s.seed}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    (train_visguard if v.kind == "visguard" else train_plain)(v, s, train, out)
    seconds = time.perf_counter() - start
    return {"variant": name, "seed": s.seed, "threads": s.threads, "train_seconds": round(seconds, 1), **evaluate(out, test)}


# ----------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n".join(
        f"  {v.name:24s} {v.about}" for v in VARIANTS.values()), formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated variant names, or 'all' (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds; each variant runs once per seed")
    p.add_argument("--train", type=int, default=d.train, help="training items (each gives a fast and a reason example)")
    p.add_argument("--test", type=int, default=d.test, help="held-out items (fresh items and images)")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"default {d.epochs:g}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per optimiser step (default {d.batch_size})")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help=f"default {d.warmup_ratio:g}; then cosine decay")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay:g})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden size of the tiny Qwen2-VL (default {d.hidden})")
    p.add_argument("--layers", type=int, default=d.layers, help=f"decoder layers of the tiny Qwen2-VL (default {d.layers})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads per run (default {d.threads})")
    p.add_argument("--data", choices=("jsonl", "mis"), default=d.data,
                   help="jsonl: visguard JSONL (perception lines + short reasoning), held-out JSONL; mis: MIS train "
                        "layout (the MIS answer as rationale), held-out MIS 'hard' split (default jsonl)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    p.add_argument("--workdir", default="/tmp/visguard-train-vs-plain", help="data, models and results")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--check-encoding", action="store_true",
                   help="compare how both trainers batch the first training examples (tokens, targets, loss) and exit")
    p.add_argument("--loss-shares", choices=("guard", "mirage"),
                   help="print the share of the loss that the fast verdict token carries under token and example "
                        "averaging, for this objective on the training data, and exit")
    p.add_argument("--token-losses", metavar="MODEL_DIR",
                   help="print a trained guard's mean loss at the tokens that need the images (object names, verdict "
                        "words) on the first 16 training records, and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    a = p.parse_args(argv)
    if a.list:
        print(p.epilog)
        return 0
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = {k: getattr(a, k) for k in ("train", "test", "epochs", "lr", "batch_size", "warmup_ratio",
                                       "weight_decay", "hidden", "layers", "threads", "data")}
    if a.check_encoding:
        rows = check_encoding(Settings(**base), make_data(workdir, Settings(**base))[0])
        print(json.dumps(rows, indent=2) if a.json else "\n".join(str(r) for r in rows))
        return 0 if all(r["same_tokens"] and r["same_targets"] for r in rows) else 1
    if a.token_losses:
        print(json.dumps(token_losses(Path(a.token_losses), make_data(workdir, Settings(**base))[0])))
        return 0
    if a.loss_shares:
        print(json.dumps(loss_shares(make_data(workdir, Settings(**base))[0], Settings(**base), a.loss_shares)))
        return 0
    if a.one:
        print(json.dumps(run_one(a.one, Settings(**base, seed=int(a.seeds)), workdir)))
        return 0
    names = list(VARIANTS) if a.variants == "all" else [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; --list shows them")
    make_data(workdir, Settings(**base))
    base_model(Settings(**base))
    jobs = [(n, seed) for seed in (int(x) for x in a.seeds.split(",")) for n in names]
    results, running = [], []
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]
    while jobs or running:
        while jobs and len(running) < a.jobs:
            n, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, "--one", n, "--seeds", str(seed), "--workdir", str(workdir), *flags]
            running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        done = running.pop(0)
        out, _ = done.communicate()
        if done.returncode:
            print(f"a run failed (exit {done.returncode}): {done.args}", file=sys.stderr)
            return 1
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {results[-1]}", file=sys.stderr)
    report = {"settings": {**base, "base": "tiny random-init Qwen2-VL (visguard_testing)"}, "results": results}
    (workdir / "results.json").write_text(json.dumps(report, indent=2))
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"settings: {base}")
        print(f"{'variant':24s} {'seed':>4s} {'accuracy':>8s} {'auroc':>6s} {'train s':>8s}")
        for r in results:
            print(f"{r['variant']:24s} {r['seed']:4d} {r['accuracy']:8.3f} {r['auroc'] or float('nan'):6.3f} "
                  f"{r['train_seconds']:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
