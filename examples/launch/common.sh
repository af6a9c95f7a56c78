# Shared by the launchers in examples/launch (sourced, not run).
#
# Settings are environment variables; precedence: your environment > the preset (PRESET=name loads
# examples/launch/presets/<name>.sh) > the launcher's defaults. Every launcher accepts extra flags
# as arguments ("$@"), appended last (for argparse, the last occurrence of a flag wins).
#
# Distributed layout (torchrun):
#   NNODES=1 (default): one node, rendezvous on localhost:MASTER_PORT.
#   NNODES>1: RDZV_ENDPOINT=host:port (the first node) and RDZV_ID are required, as set by
#             slurm_multi_node.sbatch; torchrun's c10d rendezvous assigns node ranks.
# DRY_RUN=1 prints the command instead of running it.

KHA_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KHA_REPO="$(cd "$KHA_LAUNCH_DIR/../.." && pwd)"

kha_die() {
    echo "error: $*" >&2
    exit 2
}

# Load PRESET (if any), then fill launcher-independent defaults.
kha_load_settings() {
    if [[ -n "${PRESET:-}" ]]; then
        local preset_file="$KHA_LAUNCH_DIR/presets/${PRESET%.sh}.sh"
        [[ -f "$preset_file" ]] || kha_die "PRESET=$PRESET: no $preset_file (see examples/launch/presets/)"
        # shellcheck source=/dev/null
        source "$preset_file"
    fi
    # Model (a small GPT unless a preset or the environment says otherwise).
    : "${NUM_LAYERS:=12}" "${HIDDEN_SIZE:=768}" "${FFN_HIDDEN_SIZE:=2048}"
    : "${NUM_ATTENTION_HEADS:=12}" "${NUM_QUERY_GROUPS:=4}" "${KV_CHANNELS:=}"
    : "${SEQ_LENGTH:=2048}" "${MAX_POSITION_EMBEDDINGS:=$SEQ_LENGTH}" "${QK_LAYERNORM:=0}"
    : "${NUM_EXPERTS:=0}" "${MOE_ROUTER_TOPK:=2}" "${MOE_FFN_HIDDEN_SIZE:=}"
    # Training.
    : "${MICRO_BATCH_SIZE:=4}" "${GLOBAL_BATCH_SIZE:=256}" "${TRAIN_ITERS:=10000}"
    : "${LR:=3e-4}" "${MIN_LR:=3e-5}" "${LR_WARMUP_ITERS:=500}" "${SEED:=1234}" "${BF16:=1}"
    # Parallelism (TP x PP x CP must divide the GPU count; EP must divide NUM_EXPERTS).
    : "${TP:=1}" "${PP:=1}" "${EP:=1}" "${CP:=1}" "${SP:=1}"
    # Attention variant (megatron_kha).
    : "${ATTENTION_VARIANT:=kha}" "${KHA_TARGETS:=v}" "${KHA_TYPE:=linear}" "${KHA_INIT:=identity}"
    : "${MEA_VIRTUAL_KV_HEADS:=}" "${MEA_HEAD_NORM:=1}"
    # Data, checkpoints, logging. DATA_PATH: a prefix or a Megatron blend "0.7 p1 0.3 p2".
    : "${DATA_PATH:=}" "${SAVE:=}" "${LOAD:=}" "${SAVE_INTERVAL:=1000}" "${EXIT_INTERVAL:=}"
    : "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=1000}" "${EVAL_ITERS:=10}"
    # Launch.
    : "${GPUS_PER_NODE:=8}" "${NNODES:=1}" "${MASTER_PORT:=29500}" "${DRY_RUN:=0}"
}

# DISTRIBUTED_ARGS for torchrun, from NNODES / GPUS_PER_NODE / RDZV_* / MASTER_PORT.
kha_distributed_args() {
    DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES")
    if [[ "$NNODES" -gt 1 ]]; then
        [[ -n "${RDZV_ENDPOINT:-}" && -n "${RDZV_ID:-}" ]] \
            || kha_die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port and RDZV_ID (see slurm_multi_node.sbatch)"
        DISTRIBUTED_ARGS+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
    else
        DISTRIBUTED_ARGS+=(--master-addr localhost --master-port "$MASTER_PORT")
    fi
}

# KHA_ARGS: our flags (the same names for megatron_kha.train and megatron_kha.megatron_lm).
kha_variant_args() {
    KHA_ARGS=(
        --attention-variant "$ATTENTION_VARIANT"
        --kha-targets "$KHA_TARGETS"
        --kha-type "$KHA_TYPE"
        --kha-init "$KHA_INIT"
    )
    if [[ -n "$MEA_VIRTUAL_KV_HEADS" ]]; then
        KHA_ARGS+=(--mea-virtual-kv-heads "$MEA_VIRTUAL_KV_HEADS")
    fi
    if [[ "$MEA_HEAD_NORM" == 1 ]]; then KHA_ARGS+=(--mea-head-norm); else KHA_ARGS+=(--no-mea-head-norm); fi
}

# DATA_PATH as an array (a blend is several words).
kha_data_path_words() {
    read -r -a DATA_PATH_WORDS <<< "$DATA_PATH"
}

# Run (or, with DRY_RUN=1, print) a command.
kha_run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        exec "$@"
    fi
}
