#!/usr/bin/env bash
# Multi-node MoDSE pretraining with torchrun's c10d rendezvous. Run the same command on every
# node (NODE_RANK 0..NNODES-1); MASTER_ADDR is node 0's address, reachable from all nodes.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash examples/pretrain_multinode.sh
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash examples/pretrain_multinode.sh  # ...
#
# Extra arguments are passed to modse_megatron.pretrain and override the config file, e.g.
#   ... bash examples/pretrain_multinode.sh --train-iters 1000 --data-path /data/my_corpus --tokenizer /data/tokenizer.json
# The dataset index cache (--data-cache-dir) must be on a file system every node can read.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-examples/configs/modse_700mx8.yaml}"

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-modse}" \
  -m modse_megatron.pretrain --config "$CONFIG" "$@"
