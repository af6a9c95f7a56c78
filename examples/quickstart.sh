#!/usr/bin/env bash
# Fresh machine, CPU only: build a venv, then train a small GPT with and without KHA
# on 2 gloo ranks with tensor parallelism 2, printing per-step losses for both.
# Extra arguments go to examples/train_tiny.py (e.g. --steps 40).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/tools/setup_venv.sh" "$repo/.venv"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
OMP_NUM_THREADS=1 "$repo/.venv/bin/python" -m torch.distributed.run --nproc-per-node 2 \
    --master-addr 127.0.0.1 --master-port "$port" "$repo/examples/train_tiny.py" "$@"
