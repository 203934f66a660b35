#!/usr/bin/env bash
# Multi-node MoDSE pretraining with torchrun's c10d rendezvous. Run the same command on every
# node (NODE_RANK 0..NNODES-1); MASTER_ADDR is node 0's address, reachable from all nodes.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash examples/pretrain_multinode.sh
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 bash examples/pretrain_multinode.sh  # ...
#
# Extra arguments are passed to modse_megatron.pretrain and override the config file, e.g.
#   ... bash examples/pretrain_multinode.sh --train-iters 1000 --data-path /data/my_corpus --tokenizer /data/tokenizer.json
# The dataset index cache (--data-cache-dir) and the checkpoint directory (SAVE) must be on a
# file system every node can read and write.
#
# Elastic restarts: when a worker fails (crash, OOM kill), torchrun stops and restarts
# the whole worker group on every node, up to MAX_RESTARTS times. Since --load and --save name
# the same directory, the restarted workers resume bit-exactly from the last checkpoint (weights,
# optimizer, LR schedule, RNG and data position), losing at most --save-interval iterations; a
# first start (no checkpoint yet) starts fresh. SAVE/.modse.lock stops a second job on the same
# directory at once, naming the holder; the lock of a dead job is taken over (at once when its
# process on this host is gone or it was held by an earlier restart attempt of this job on another
# host, after --save-lock-timeout seconds without a heartbeat, default 600, otherwise). "This job"
# is RDZV_ID: use the same value on every node of one job and a new one for every job
# (e.g. RDZV_ID=modse-$(date +%Y%m%d-%H%M) chosen once).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-examples/configs/modse_700mx8.yaml}"
SAVE="${SAVE:-runs/modse_700mx8/checkpoints}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-modse}" \
  -m modse_megatron.pretrain --config "$CONFIG" --load "$SAVE" --save "$SAVE" "$@"
