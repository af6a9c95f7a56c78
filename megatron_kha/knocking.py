"""Knocking maps: one small d_k x d_k transform per layer, shared by every head.

Tensors act on per-head row vectors: x has shape [..., d_k] and the result is
`x @ T` (KnockingLinear) or `2 * ((x @ U) * sigmoid(x @ G)) @ D` (KnockingMLP).
Identity init (T = U = D = I, G = 0) makes both maps the identity, so a layer
starts exactly equal to plain attention: sigmoid(0) = 1/2 cancels the factor 2.

Tensor-parallel rule for these parameters (they are NOT sharded):
    every TP rank holds a full replica and applies it to its own slice of heads,
    so each rank's gradient is only a partial sum over its heads. The full
    gradient is the SUM over the TP group. `replicated_for_tp` implements that
    with Megatron's own mapping `copy_to_tensor_model_parallel_region`
    (forward: identity, backward: all-reduce over TP), so the gradient is
    complete - and bit-identical on every TP rank - as soon as backward returns,
    whatever training loop or DDP wrapper runs it. Consequences:
      * the params carry tensor_model_parallel=False: Megatron's grad-norm counts
        them once (on TP rank 0), not TP times;
      * they must NOT carry `sequence_parallel=True`: finalize_model_grads would
        then all-reduce them a second time;
      * dist checkpointing gives them replica_id (0, tp_rank, dp_rank) through
        MegatronModule's default sharded_state_dict: one rank writes each.
"""
import math

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def replicated_for_tp(param: torch.Tensor, tp_group) -> torch.Tensor:
    """The parameter itself in forward; its gradient is summed over `tp_group` in backward."""
    if tp_group is None or tp_group.size() == 1:
        return param
    return copy_to_tensor_model_parallel_region(param, group=tp_group)


def _new_matrix(config: TransformerConfig, head_dim: int) -> torch.nn.Parameter:
    use_cpu = config.use_cpu_initialization or not torch.cuda.is_available()
    device = "cpu" if use_cpu else torch.cuda.current_device()
    param = torch.nn.Parameter(torch.empty(head_dim, head_dim, dtype=config.params_dtype, device=device))
    # Replicated over TP; the gradient is summed by replicated_for_tp (module docstring).
    param.tensor_model_parallel = False
    param.partition_dim = -1
    param.partition_stride = 1
    return param


def _init_matrix(param: torch.Tensor, how: str, tp_group) -> None:
    """Identity, zeros, or N(0, 1/d_k); random draws are broadcast from TP rank 0 so replicas agree."""
    with torch.no_grad():
        if how == "identity":
            param.copy_(torch.eye(param.shape[0], dtype=param.dtype, device=param.device))
        elif how == "zeros":
            param.zero_()
        elif how == "random":
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[0]))
            if tp_group is not None and tp_group.size() > 1:
                src = torch.distributed.get_global_rank(tp_group, 0)
                torch.distributed.broadcast(param.data, src=src, group=tp_group)
        else:
            raise ValueError(f"unknown knocking init {how!r}; allowed: identity, zeros, random")


class KnockingLinear(MegatronModule):
    """KHA-Linear: x -> x @ T with one T (d_k x d_k) shared by all heads of the layer."""

    def __init__(self, config: TransformerConfig, head_dim: int, tp_group=None):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.weight = _new_matrix(config, head_dim)
        init = getattr(config, "kha_init", "identity")
        if init == "identity" or config.perform_initialization:
            _init_matrix(self.weight, init, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, replicated_for_tp(self.weight, self.tp_group))


class KnockingMLP(MegatronModule):
    """KHA-MLP on values: x -> 2 * ((x @ U) * sigmoid(x @ G)) @ D, all d_k x d_k, shared by heads."""

    def __init__(self, config: TransformerConfig, head_dim: int, tp_group=None):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.up_weight = _new_matrix(config, head_dim)
        self.gate_weight = _new_matrix(config, head_dim)
        self.down_weight = _new_matrix(config, head_dim)
        init = getattr(config, "kha_init", "identity")
        if init == "identity":
            _init_matrix(self.up_weight, "identity", tp_group)
            _init_matrix(self.gate_weight, "zeros", tp_group)
            _init_matrix(self.down_weight, "identity", tp_group)
        elif config.perform_initialization:
            for param in (self.up_weight, self.gate_weight, self.down_weight):
                _init_matrix(param, "random", tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate, down = self.up_weight, self.gate_weight, self.down_weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            # One all-reduce for the three gradients instead of three.
            d = up.shape[0]
            flat = torch.cat([up.reshape(-1), gate.reshape(-1), down.reshape(-1)])
            up, gate, down = replicated_for_tp(flat, self.tp_group).view(3, d, d).unbind(0)
        hidden = torch.matmul(x, up) * torch.sigmoid(torch.matmul(x, gate))
        return 2.0 * torch.matmul(hidden, down)
