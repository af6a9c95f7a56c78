"""A one-rank gloo world inside the pytest process, for tests that need no parallelism."""
import socket

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_kha import enable_cpu_backend


def ensure_single_rank() -> None:
    enable_cpu_backend()
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
