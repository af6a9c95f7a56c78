#!/usr/bin/env bash
# Create (or reuse) a virtual environment with CPU torch 2.13.0 and megatron_kha[test] installed.
# Usage: tools/setup_venv.sh [VENV_DIR]   (default: .venv). Never installs Transformer Engine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$repo/tools/constraints-cpu.txt" -e "$repo[test]"
"$venv/bin/python" -c "import torch, megatron.core, megatron_kha; print('venv ready:', '$venv', 'torch', torch.__version__)"
