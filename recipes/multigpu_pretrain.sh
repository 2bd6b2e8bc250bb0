#!/usr/bin/env bash
# Pre-training on one node with N GPUs (or CPU processes): FSDP2 data parallel x expert parallel, NCCL on GPU,
# gloo on CPU. Multi-node: add torchrun's --nnodes/--node-rank/--rdzv-endpoint flags; nothing else changes.
# The global batch is --batch-size x N; resume at another N keeps it equal (see docs/distributed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-8}
EP=${EP:-2}
.venv/bin/torchrun --nproc_per_node "$N" -m openk2 pretrain --ep "$EP" --preset small --steps 2000 \
    --batch-size 16 --seq-len 1024 --out runs/pretrain-dist "$@"
.venv/bin/openk2 consolidate runs/pretrain-dist/checkpoints/$(cat runs/pretrain-dist/checkpoints/latest) runs/pretrain-dist/hf
