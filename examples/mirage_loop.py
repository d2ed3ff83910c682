"""The MIS paper's loop, closed end to end: safety-CoT data -> MIRage SFT -> host eval and guard eval.

    python examples/mirage_loop.py

1. Synthetic data in the MIS train layout (two images that are benign alone; only some
   combinations are unsafe), each with a safety chain-of-thought answer (perception of each image,
   reasoning across them, a safe reply), and a held-out MIS-test-layout "hard" split.
2. `visguard train --objective mirage`: the paper's SFT on those answers, plus the `mirage` format's
   verdict steps, on $VISGUARD_EXAMPLE_BASE (default: a tiny random-weight Qwen2-VL, offline).
3. (a) The trained model as a *host*: `visguard eval --host auto` with the MIS protocol (ASR / RSR /
   RR / HR; here the keyword `refusal` judge, since no judge model is available offline; use
   `--judge-model ...` with a real judge), next to the untrained base model.
   (b) The trained model as a *guard* through the `mirage` format (found from its `visguard.json`),
   `visguard eval` guard metrics on the held-out hard split, fast and reason mode.

4. With $VISGUARD_LOOP_DISTILL=1 (off by default): a second run teaches the trained guard a fast
   verdict from its own reasoning, `visguard train --objective mirage --base <step 2's model>
   --distill self --loss-average example` ($VISGUARD_LOOP_DISTILL_EPOCHS, default 3, at
   $VISGUARD_LOOP_DISTILL_LR, default $VISGUARD_LOOP_LR): its reason mode
   labels every training record, the fast verdict examples learn those labels, the answers and
   follow-up verdicts keep training. The distilled guard is evaluated fast, reason and adaptive
   (`visguard eval`, batches of 8), and `plugins/visguard-bench/scripts/adaptive_cost.py` measures
   the three modes' accuracy and cost one request at a time, in one run (`distilled_cost`).

Sizes: $VISGUARD_LOOP_TRAIN training items (default 1600), $VISGUARD_LOOP_EPOCHS (3),
$VISGUARD_LOOP_LR (4e-3, for a from-scratch tiny model; use --preset mirage-qwen2vl for a real one),
$VISGUARD_LOOP_HELDOUT held-out items (200), $VISGUARD_LOOP_HOST_ITEMS host-evaluated items (40),
$VISGUARD_LOOP_REASON_TOKENS the guard's reasoning budget in reason mode (default: the `mirage`
format's own 1024, the MIS inference script's; a shorter one cuts answers before their verdict),
$VISGUARD_LOOP_STAGE1_AVERAGE step 2's `--loss-average` (default `token`). docs/training.md
measures VISGUARD_LOOP_STAGE1_AVERAGE=example VISGUARD_LOOP_DISTILL_EPOCHS=1 VISGUARD_LOOP_DISTILL_LR=1e-3
(issue 26's targets met with seed 0, not with seed 1).
Prints one JSON object with every number; the runs stay under $VISGUARD_EXAMPLE_OUT.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from visguard.cli import _register_plugin_commands, cli

out = Path(os.environ.get("VISGUARD_EXAMPLE_OUT", "runs/examples/mirage_loop"))
n_train = int(os.environ.get("VISGUARD_LOOP_TRAIN", "1600"))
epochs = os.environ.get("VISGUARD_LOOP_EPOCHS", "3")
lr = os.environ.get("VISGUARD_LOOP_LR", "4e-3")
n_heldout = int(os.environ.get("VISGUARD_LOOP_HELDOUT", "200"))
host_items = os.environ.get("VISGUARD_LOOP_HOST_ITEMS", "40")
reason_tokens = os.environ.get("VISGUARD_LOOP_REASON_TOKENS")
reason_budget = ["--max-new-tokens", reason_tokens] if reason_tokens else []
stage1_average = os.environ.get("VISGUARD_LOOP_STAGE1_AVERAGE", "token")
base = os.environ.get("VISGUARD_EXAMPLE_BASE")
if base is None:
    from visguard_testing.checkpoints import cached_tiny_checkpoint

    base = str(cached_tiny_checkpoint("qwen2_vl", hidden_size=64, num_layers=2))

from visguard_testing.synthetic import write_mis_test_layout, write_mis_train_layout  # noqa: E402

train_root = write_mis_train_layout(out / "mis_train", n=n_train, seed=0)
test_root = write_mis_test_layout(out / "mis_test", {"hard": n_heldout}, seed=7)
model = out / "mirage"
_register_plugin_commands()


def visguard(*args: str) -> None:
    print("visguard " + " ".join(args), flush=True)
    cli.main(args=list(args), prog_name="visguard", standalone_mode=False)


def summary(path: Path, keys: tuple[str, ...]) -> dict:
    data = json.loads((path / "summary.json").read_text())
    return {k: data.get(k) for k in keys}


# Stage 1 averages the loss over tokens by default (the Hugging Face Trainer's average, as an SFT on the
# answers would): its fast verdict then carries 0.5 % of the loss and stays at chance, like a guard
# trained only to reason. $VISGUARD_LOOP_STAGE1_AVERAGE=example gives it 16.7 % (docs/training.md).
visguard("train", "--data", str(train_root), "--base", base, "--output", str(model), "--objective", "mirage",
         "--device", "cpu", "--epochs", epochs, "--lr", lr, "--batch-size", "8", "--seed", "0",
         "--loss-average", stage1_average, "--save-steps", "100000", "--overwrite", "--cpu-threads", "1")
results: dict = {"train": json.loads((model / "visguard_train.json").read_text())["train_seconds"]}

host_keys = ("n", "n_judged", "judge_failed", "asr", "rsr", "rr", "hr", "refusal_rate")
for name, path in (("host_trained", str(model)), ("host_base", base)):
    visguard("eval", "-B", "mis", "-d", str(test_root), "-s", "hard", "-m", path, "--host", "auto",
             "--judge", "refusal", "--limit", host_items, "--host-max-new-tokens", "160", "--device", "cpu",
             "--out", str(out / name), "--restart", "--no-progress", "--no-plots")
    results[name] = summary(out / name, host_keys)

guard_keys = ("n", "accuracy", "precision", "recall", "f1", "fpr", "auroc", "unavailable", "throughput_items_per_s")


def guard_eval(path: Path, mode: str, name: str) -> dict:
    visguard("eval", "-B", "mis", "-d", str(test_root), "-s", "hard", "-m", str(path), "--mode", mode, *reason_budget,
             "--device", "cpu", "--out", str(out / name), "--restart", "--no-progress", "--no-plots")
    return summary(out / name, guard_keys)


for mode in ("fast", "reason"):
    results[f"guard_{mode}"] = guard_eval(model, mode, f"guard_{mode}")

if os.environ.get("VISGUARD_LOOP_DISTILL") == "1":
    distilled = out / "mirage-distilled"
    visguard("train", "--data", str(train_root), "--base", str(model), "--output", str(distilled),
             "--objective", "mirage", "--distill", "self", "--loss-average", "example", "--device", "cpu",
             "--epochs", os.environ.get("VISGUARD_LOOP_DISTILL_EPOCHS", "3"),
             "--lr", os.environ.get("VISGUARD_LOOP_DISTILL_LR", lr), "--batch-size", "8",
             "--seed", "0", "--save-steps", "100000", "--overwrite", "--cpu-threads", "1")
    results["distill_train"] = json.loads((distilled / "visguard_train.json").read_text())["train_seconds"]
    for mode in ("fast", "reason", "adaptive"):
        results[f"distilled_{mode}"] = guard_eval(distilled, mode, f"distilled_{mode}")
    # cost, one request at a time, the three modes in turns in one process (batched throughput above
    # makes a batch with one unsure request pay a whole generation)
    script = Path(__file__).resolve().parents[1] / "plugins" / "visguard-bench" / "scripts" / "adaptive_cost.py"
    cost = subprocess.run([sys.executable, str(script), "--guard", str(distilled), "--data", str(test_root),
                           "--limit", str(n_heldout), "--json", *reason_budget], check=True, capture_output=True, text=True)
    results["distilled_cost"] = json.loads(cost.stdout)["modes"]

print(json.dumps(results))
