"""Splitting Megatron's unsplit QKV tensor into per-head queries, keys and values.

`SelfAttention.get_query_key_value_tensors(..., split_qkv=False)` returns the projected
tensor before any normalisation, as `[sq, b, ng, (np/ng + 2) * hn]` per KV group:
`[q_1 .. q_{np/ng}, k, v]`. When num_query_groups < TP, Megatron has already all-gathered
and kept this rank's group, which holds more query heads than the rank owns; the
attention subclasses then keep the rank's own query heads exactly as SelfAttention does.
"""
import torch
from megatron.core.utils import get_pg_rank


def split_heads(attention, mixed_qkv: torch.Tensor):
    """-> query [sq, b, ng, np/ng, hn], key [sq, b, ng, 1, hn], value [sq, b, ng, 1, hn] (views)."""
    hn = attention.hidden_size_per_attention_head
    q_per_group = attention.num_attention_heads_per_partition // attention.num_query_groups_per_partition
    sq, b, ng = mixed_qkv.shape[:3]
    heads = mixed_qkv.view(sq, b, ng, q_per_group + 2, hn)
    return torch.split(heads, [q_per_group, 1, 1], dim=3)


def own_query_heads(attention, query: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[sq, b, ng, np/ng, hn] -> this rank's [sq, b, np_local, hn]."""
    sq, b, ng, q_per_group, hn = query.shape
    query = query.reshape(sq, b, ng * q_per_group, hn)
    if num_groups < attention.world_size:
        ranks_per_group = attention.world_size // num_groups
        idx = get_pg_rank(attention.tp_group) % ranks_per_group
        size = attention.num_attention_heads_per_partition // ranks_per_group
        query = query[:, :, idx * size : (idx + 1) * size, :]
    return query
