#!/usr/bin/env bash
# Training a guard on many GPUs: the same `visguard train` code path as one CPU process, launched
# by torchrun or accelerate (`--device` defaults to CUDA when available). `--batch-size` is global, so the loss curve does not depend on the
# number of processes. A test checks that every flag below exists in `visguard train --help`.
#
# Usage: bash examples/train_multi_gpu.sh ddp|deepspeed|fsdp   (on a machine with 8 GPUs)
set -euo pipefail
DATA=${DATA:-data/mis_train}          # MIS training set: mis_train.json + images
BASE=${BASE:-Qwen/Qwen2-VL-7B-Instruct}
OUT=${OUT:-runs/guard-qwen2vl-7b}
GPUS=${GPUS:-8}

case "${1:-ddp}" in
  ddp)        # plain data parallel, the MIRage recipe for Qwen2-VL (lr 2e-6, 3 epochs)
    torchrun --nproc_per_node "$GPUS" -m visguard_train \
      --data "$DATA" --base "$BASE" --output "$OUT" --preset mirage-qwen2vl --batch-size 128
    ;;
  deepspeed)  # ZeRO through a DeepSpeed config file (pip install 'visguard-train[deepspeed]')
    accelerate launch --multi_gpu --num_processes "$GPUS" -m visguard_train \
      --data "$DATA" --base "$BASE" --output "$OUT" --preset mirage-qwen2vl --batch-size 128 \
      --deepspeed "$(dirname "$0")/ds_zero3.json"
    ;;
  fsdp)       # fully sharded data parallel, LoRA, resumable
    torchrun --nproc_per_node "$GPUS" -m visguard_train \
      --data "$DATA" --base "$BASE" --output "$OUT" --trainer lora --fsdp "full_shard auto_wrap" --batch-size 128 \
      --save-steps 200 --resume
    ;;
  *) echo "usage: $0 ddp|deepspeed|fsdp" >&2; exit 2 ;;
esac
# Then: visguard eval -B mis -d data/mis_test -s hard -m "$OUT"
