#!/usr/bin/env bash
# Fresh machine, CPU only: build a venv, then pretrain a small GPT twice with `python -m megatron_kha.train`
# on the embedded corpus (the interpreter's stdlib sources), baseline attention and KHA, each on
# 2 gloo ranks with tensor parallelism 2 + sequence parallel; print per-step losses and both
# validation losses. Extra arguments go to both training runs (e.g. --train-iters 50).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/tools/setup_venv.sh" "$repo/.venv"
py="$repo/.venv/bin/python"
out="$repo/runs/quickstart"
mkdir -p "$out"
args=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 --qk-layernorm
      --seq-length 128 --micro-batch-size 8 --train-iters 150 --lr 3e-3 --lr-warmup-iters 15 --seed 1234
      --tensor-model-parallel-size 2 --sequence-parallel --eval-interval 50 --eval-iters 8 --log-interval 25)
for variant in baseline kha; do
    rm -f "$out/$variant.jsonl"
    port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$port" \
        -m megatron_kha.train "${args[@]}" --attention-variant "$variant" --metrics-file "$out/$variant.jsonl" "$@"
done
echo
echo "per-step training loss (same seed, same data; KHA starts as an exact copy of the baseline):"
"$py" "$repo/tools/compare_runs.py" baseline="$out/baseline.jsonl" kha="$out/kha.jsonl"
