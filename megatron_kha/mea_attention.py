"""MEASelfAttention: Multi-head Explicit Attention (arXiv 2601.19611) as a SelfAttention subclass.

h = config.num_query_groups composite KV heads are built from h' = config.mea_virtual_kv_heads
component heads by head-level linear composition (HLC), separately for keys and values:
    k~_j = sum_i A_K[i, j] k_i,   v~_j = sum_i A_V[i, j] v_i,   A of shape [h', h].
Then ordinary attention, then (mea_head_norm) a head-wise RMSNorm on each head's output
before linear_proj (HeadNormRowParallelLinear).

Where each step happens (no fork of Attention.forward):
  get_query_key_value_tensors   Megatron projects q and the h' component k/v heads (its
                                 own code with num_query_groups = h'); the component heads
                                 are all-gathered over TP (backward: reduce-scatter).
  _adjust_key_value_for_inference  Megatron stores the h' components in the KV cache (static
                                 batching); afterwards we compose this rank's composite heads
                                 and apply k-norm. Order: HLC -> k RMSNorm -> RoPE, so HLC can
                                 be folded into linear_qkv (DESIGN.md). RoPE commutes with HLC.
  _allocate_memory              the cache holds h' heads per layer (replicated over TP).

TP layout of A_K, A_V: replicated on every rank, gradients summed over TP
(megatron_kha/replicated.py); each rank uses only its own composite columns.
Parameters of a plain layer keep their names (h' = h gives Megatron's linear_qkv layout).
Settings come from a KHAConfig or from spec params (keyword arguments, which win), as for KHA.
"""
import copy
from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank

from megatron_kha.config import resolve_attention_config
from megatron_kha.qkv_heads import own_query_heads, split_heads
from megatron_kha.replicated import init_replicated_, new_replicated_param, replicated_for_tp


def grouped_identity(h_virtual: int, h: int) -> torch.Tensor:
    """[h', h] with A[i, j] = 1 iff component i = j * h' // h: identity when h' = h, GQA-like otherwise."""
    a = torch.zeros(h_virtual, h)
    a[torch.arange(h) * h_virtual // h, torch.arange(h)] = 1.0
    return a


class HeadNormRowParallelLinear(RowParallelLinear):
    """linear_proj whose input (each head's attention output) first gets a head-wise RMSNorm.

    The norm's scale has one entry per input channel (heads x d_k, like GroupNorm's affine
    with one group per head), sharded over TP with the heads: `head_norm_weight`, init 1.
    """

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.head_dim = config.kv_channels
        self.eps = config.layernorm_epsilon
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.head_norm_weight = torch.nn.Parameter(
            torch.ones(self.input_size_per_partition, dtype=config.params_dtype, device=device)
        )
        set_tensor_model_parallel_attributes(self.head_norm_weight, is_parallel=True, dim=0, stride=1)

    def forward(self, input_: torch.Tensor):
        shape = input_.shape
        heads = input_.view(*shape[:-1], -1, self.head_dim).float()
        heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = heads.view(shape).to(input_.dtype) * self.head_norm_weight
        return super().forward(normed)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As RowParallelLinear (weight split on axis 1), plus the head-norm scale split on axis 0."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 1, "head_norm_weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class MEASelfAttention(SelfAttention):
    """SelfAttention with cross-head composition of keys and values over h' component heads."""

    def __init__(
        self,
        config,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        mea_virtual_kv_heads: Optional[int] = None,
        mea_head_norm: Optional[bool] = None,
    ):
        # mea_head_norm is recorded in the config; the norm itself is the spec's linear_proj.
        config = resolve_attention_config(
            config, "mea", mea_virtual_kv_heads=mea_virtual_kv_heads, mea_head_norm=mea_head_norm
        )
        h, h_virtual = config.num_query_groups, config.mea_virtual_kv_heads
        # Megatron builds linear_qkv and splits heads for h' groups: the components.
        component_config = copy.copy(config)
        component_config.num_query_groups = h_virtual
        super().__init__(
            config=component_config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        tp, rank = self.world_size, get_pg_rank(self.tp_group)
        # Core attention sees the h composite heads (as Attention does when groups < TP).
        core_config = copy.copy(config)
        core_config.num_query_groups = max(h, tp)
        self.core_attention = submodules.core_attention(
            config=core_config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            cp_comm_type=cp_comm_type,
            softmax_scale=config.softmax_scale,
            pg_collection=self.pg_collection,
        )
        # This rank's composite heads: those its query heads attend with.
        if h >= tp:
            self.composite_heads = slice(rank * (h // tp), (rank + 1) * (h // tp))
        else:
            j = rank // (tp // h)
            self.composite_heads = slice(j, j + 1)
        self.key_composition = new_replicated_param(config, h_virtual, h)
        self.value_composition = new_replicated_param(config, h_virtual, h)
        for param in (self.key_composition, self.value_composition):
            init_replicated_(param, grouped_identity(h_virtual, h), self.tp_group)

    def _all_components(self, heads: torch.Tensor) -> torch.Tensor:
        """[sq, b, g_local, hn] component heads of this rank -> all h' of them, on every rank."""
        if self.world_size == 1:
            return heads
        sq, b, g, hn = heads.shape
        gathered = all_gather_last_dim_from_tensor_parallel_region(heads.reshape(sq, b, g * hn), group=self.tp_group)
        gathered = gathered.view(sq, b, -1, hn)
        h_virtual = self.config.num_query_groups
        if h_virtual < self.world_size:  # each component was computed by world_size // h' ranks
            gathered = gathered[:, :, :: self.world_size // h_virtual]
        return gathered

    def _compose(self, components: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
        """[s, b, h', hn] x A[:, own] -> [s, b, h_local, hn], contiguous (core attention views it)."""
        own = replicated_for_tp(mixing, self.tp_group)[:, self.composite_heads]
        return torch.matmul(own.t().to(components.dtype), components)  # [h_local, h'] @ [s, b, h', hn]

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Optional[torch.Tensor] = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ):
        """-> query [sq, b, np_local, hn] (q-normed), key/value components [sq, b, h', hn] (not yet composed)."""
        # KHAConfig rejects the output gate and the fused single-QKV RoPE for MEA.
        assert split_qkv and not output_gate, "MEA needs split q/k/v without an output gate"
        mixed_qkv, _ = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=False, split_qkv=False
        )
        query, key, value = split_heads(self, mixed_qkv)
        query = own_query_heads(self, query, self.config.num_query_groups)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        return query, self._all_components(key.squeeze(3)), self._all_components(value.squeeze(3))

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        """Cache the h' components (Megatron's code), then compose this rank's heads and k-norm them."""
        if inference_context is not None and not inference_context.is_static_batching():
            raise NotImplementedError("MEA supports static-batching inference only (StaticInferenceContext)")
        query, key, value, rotary_pos_emb, attn_mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )
        key = self._compose(key, self.key_composition)
        value = self._compose(value, self.value_composition)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value, rotary_pos_emb, attn_mask_type, block_table

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        """KV cache of the h' component heads only."""
        return torch.empty(
            inference_max_sequence_length,
            batch_size,
            self.config.num_query_groups,  # h' (this module's config is the component config)
            dim,
            dtype=dtype,
            device=torch.cuda.current_device(),
        )
