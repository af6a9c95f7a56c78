#!/usr/bin/env bash
# Pretrain a GPT with KHA / MEA attention on one node (8 GPUs by default) with torchrun and
# megatron_kha's own trainer, `python -m megatron_kha.train` (flags named as in Megatron-LM).
#
#   bash examples/launch/torchrun_single_node.sh                      # small GPT, KHA on values
#   PRESET=paper_dense_0p61b TP=2 bash examples/launch/torchrun_single_node.sh
#   PRESET=paper_moe_6b EP=8 ATTENTION_VARIANT=baseline bash examples/launch/torchrun_single_node.sh
#   TP=2 PP=2 DATA_PATH=/data/corpus_text_document SAVE=/ckpt/run1 LOAD=/ckpt/run1 bash ...
#   DRY_RUN=1 bash examples/launch/torchrun_single_node.sh            # print the command only
#
# Every setting is an environment variable (defaults: examples/launch/common.sh); extra flags can
# be appended as arguments. slurm_multi_node.sbatch runs this script on every node (NNODES > 1).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
kha_load_settings
: "${PYTHON:=python}" "${TORCHRUN:=torchrun}"

MODEL_ARGS=(
    --num-layers "$NUM_LAYERS"
    --hidden-size "$HIDDEN_SIZE"
    --ffn-hidden-size "$FFN_HIDDEN_SIZE"
    --num-attention-heads "$NUM_ATTENTION_HEADS"
    --num-query-groups "$NUM_QUERY_GROUPS"
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings "$MAX_POSITION_EMBEDDINGS"
)
if [[ "$QK_LAYERNORM" == 1 ]]; then MODEL_ARGS+=(--qk-layernorm); fi
# A head dim other than hidden / heads (the MoE preset: 1536 / 32 heads, head dim 128).
if [[ -n "$KV_CHANNELS" ]]; then MODEL_ARGS+=(--kv-channels "$KV_CHANNELS"); fi

MOE_ARGS=()
if [[ "$NUM_EXPERTS" -gt 0 ]]; then
    MOE_ARGS=(--num-experts "$NUM_EXPERTS" --moe-router-topk "$MOE_ROUTER_TOPK")
    if [[ -n "$MOE_FFN_HIDDEN_SIZE" ]]; then MOE_ARGS+=(--moe-ffn-hidden-size "$MOE_FFN_HIDDEN_SIZE"); fi
fi

TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr "$LR"
    --min-lr "$MIN_LR"
    --lr-warmup-iters "$LR_WARMUP_ITERS"
    --seed "$SEED"
)
if [[ "$BF16" == 1 ]]; then TRAINING_ARGS+=(--bf16); fi

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
    --context-parallel-size "$CP"
)
if [[ "$SP" == 1 && "$TP" -gt 1 ]]; then PARALLEL_ARGS+=(--sequence-parallel); fi

kha_variant_args  # -> KHA_ARGS

DATA_ARGS=()
if [[ -n "$DATA_PATH" ]]; then
    kha_data_path_words
    DATA_ARGS=(--data-path "${DATA_PATH_WORDS[@]}")
fi  # no DATA_PATH: megatron_kha.train's default corpus

CHECKPOINT_ARGS=(--save-interval "$SAVE_INTERVAL")
if [[ -n "$SAVE" ]]; then CHECKPOINT_ARGS+=(--save "$SAVE"); fi
if [[ -n "$LOAD" ]]; then CHECKPOINT_ARGS+=(--load "$LOAD"); fi
if [[ -n "$EXIT_INTERVAL" ]]; then CHECKPOINT_ARGS+=(--exit-interval "$EXIT_INTERVAL"); fi

LOGGING_ARGS=(
    --log-interval "$LOG_INTERVAL"
    --eval-interval "$EVAL_INTERVAL"
    --eval-iters "$EVAL_ITERS"
)

kha_distributed_args  # -> DISTRIBUTED_ARGS
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # as Megatron-LM's launch scripts
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
cd "$KHA_REPO"
kha_run "$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" -m megatron_kha.train \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${KHA_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
