"""Small parameters replicated on every TP rank (knocking maps, MEA composition matrices).

Tensor-parallel rule: every TP rank holds a full replica but uses it only on its own
slice of heads, so each rank's gradient is a partial sum; the full gradient is the SUM
over the TP group. `replicated_for_tp` implements that with Megatron's own mapping
`copy_to_tensor_model_parallel_region` (forward: identity, backward: all-reduce over TP),
so the gradient is complete - and bit-identical on every TP rank - as soon as backward
returns, whatever training loop or DDP wrapper runs it. Consequences:
  * the params carry tensor_model_parallel=False: Megatron's grad norm counts them once
    (on TP rank 0), not TP times;
  * they must NOT carry `sequence_parallel=True`: finalize_model_grads would then
    all-reduce them a second time;
  * dist checkpointing gives them replica_id (0, tp_rank, dp_rank) through
    MegatronModule's default sharded_state_dict: one rank writes each.
"""
import math

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig


def replicated_for_tp(param: torch.Tensor, tp_group) -> torch.Tensor:
    """The parameter itself in forward; its gradient is summed over `tp_group` in backward."""
    if tp_group is None or tp_group.size() == 1:
        return param
    return copy_to_tensor_model_parallel_region(param, group=tp_group)


def new_replicated_param(config: TransformerConfig, *shape: int) -> torch.nn.Parameter:
    """An uninitialised TP-replicated parameter on the device Megatron would use."""
    use_cpu = config.use_cpu_initialization or not torch.cuda.is_available()
    device = "cpu" if use_cpu else torch.cuda.current_device()
    param = torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype, device=device))
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1
    return param


def init_replicated_(param: torch.Tensor, how, tp_group) -> None:
    """Fill with "identity", "zeros", "random" (N(0, 1/rows)) or a given tensor.

    Random draws are broadcast from TP rank 0 so the replicas agree whatever the ranks' RNG state.
    """
    with torch.no_grad():
        if torch.is_tensor(how):
            param.copy_(how)
        elif how == "identity":
            param.copy_(torch.eye(*param.shape, dtype=param.dtype, device=param.device))
        elif how == "zeros":
            param.zero_()
        elif how == "random":
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[0]))
            if tp_group is not None and tp_group.size() > 1:
                src = torch.distributed.get_global_rank(tp_group, 0)
                torch.distributed.broadcast(param.data, src=src, group=tp_group)
        else:
            raise ValueError(f"unknown init {how!r}; allowed: identity, zeros, random, or a tensor")
