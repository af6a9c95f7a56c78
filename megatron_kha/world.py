"""A one-process torch.distributed world with TP = PP = 1, for tools, tests and notebooks.

Megatron-Core modules (and dist_checkpointing) need an initialised process group and
model-parallel state even on one process. On a machine without CUDA this also installs
the CPU backend and uses gloo on a free local port.
"""
import socket

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_kha.cpu_backend import enable_cpu_backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_world(seed: int = 0) -> None:
    """Idempotent: initialise what is missing (process group, model-parallel state, RNG tracker)."""
    enable_cpu_backend()
    if not torch.distributed.is_initialized():
        port = free_port()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
