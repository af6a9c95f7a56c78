#!/usr/bin/env bash
# Train baseline, KHA-Linear, KHA-MLP and MEA (h'=h and h'=h/2) with the same seed and data, then write
# docs/results/$TAG.md (table + machine + date) and docs/results/$TAG.png (loss curves).
# CPU (default): 2 gloo ranks, TP=2. GPU: NPROC=<gpus> TAG=gpu_... and larger sizes via the variables below.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
NPROC="${NPROC:-2}"; TP="${TP:-2}"; TAG="${TAG:-cpu_small}"; ITERS="${ITERS:-300}"
LAYERS="${LAYERS:-4}"; HIDDEN="${HIDDEN:-128}"; HEADS="${HEADS:-8}"; KV_GROUPS="${KV_GROUPS:-4}"; SEQ="${SEQ:-128}"
MBS="${MBS:-8}"; GBS="${GBS:-16}"; EXTRA=(${EXTRA:-})
out="$repo/runs/compare_$TAG"
mkdir -p "$out" "$repo/docs/results"
common=(--num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --num-query-groups "$KV_GROUPS"
        --qk-layernorm --seq-length "$SEQ" --micro-batch-size "$MBS" --global-batch-size "$GBS"
        --train-iters "$ITERS" --lr 3e-3 --lr-warmup-iters $((ITERS / 10)) --seed 1234
        --tensor-model-parallel-size "$TP" --sequence-parallel --eval-interval $((ITERS / 3)) --eval-iters 8
        --log-interval 50 --no-progress-bar "${EXTRA[@]}")
declare -A variants=(
    [baseline]="--attention-variant baseline"
    [kha_linear_qkv]="--attention-variant kha --kha-targets qkv --kha-type linear"
    [kha_mlp_v]="--attention-variant kha --kha-targets v --kha-type mlp"
    [mea]="--attention-variant mea"
    [mea_half_kv]="--attention-variant mea --mea-virtual-kv-heads $((KV_GROUPS / 2))"
)
runs=()
for name in baseline kha_linear_qkv kha_mlp_v mea mea_half_kv; do
    rm -f "$out/$name.jsonl"
    port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    echo "== $name"
    OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
        --master-port "$port" -m megatron_kha.train "${common[@]}" ${variants[$name]} --metrics-file "$out/$name.jsonl"
    runs+=("$name=$out/$name.jsonl")
done
md="$repo/docs/results/$TAG.md"
"$py" "$repo/tools/compare_runs.py" "${runs[@]}" --every 25 --markdown "$md" --plot "$repo/docs/results/$TAG.png" \
    --title "$TAG: ${LAYERS} layers, hidden ${HIDDEN}, ${HEADS} heads / ${KV_GROUPS} KV groups, seq ${SEQ}, global batch ${GBS}, ${ITERS} iterations, TP=${TP}"
{
    echo
    echo "Machine: $(nproc) CPU cores, $("$py" -c 'import torch; print("GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'), torch $("$py" -c 'import torch; print(torch.__version__)'); date: $(date -u +%Y-%m-%d)."
    echo "Data: the embedded default corpus (stdlib sources, byte-level tokens); same seed and data order for every run."
    echo "Command: examples/compare.sh (NPROC=$NPROC TP=$TP ITERS=$ITERS LAYERS=$LAYERS HIDDEN=$HIDDEN HEADS=$HEADS KV_GROUPS=$KV_GROUPS SEQ=$SEQ MBS=$MBS GBS=$GBS)"
} >> "$md"
echo "wrote $md"
