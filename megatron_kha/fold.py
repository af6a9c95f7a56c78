"""Exact folding of KHA-Linear maps into Megatron's fused `linear_qkv` weight.

linear_qkv computes y = x W^T + b with W of shape [out, hidden]; its output rows
are grouped per KV group as [q_1 .. q_{np/ng}, k, v], each block hn rows. A head
block y_h = x W_h^T + b_h knocked by T becomes y_h T = x (T^T W_h)^T + b_h T, so
    W_h' = T^T W_h,   b_h' = b_h T.
Works on a full (TP=1) weight or on one TP shard, as long as the shard holds whole
groups (num_query_groups >= TP size). Written once; used by tests, training-time
folding and the absorb tool.
"""
from typing import Optional, Tuple

import torch


def _head_blocks(t: torch.Tensor, num_groups: int, q_per_group: int, head_dim: int) -> torch.Tensor:
    """[ng * (np/ng + 2) * hn, ...] -> [ng, np/ng + 2, hn, ...] (a view)."""
    if t.shape[0] != num_groups * (q_per_group + 2) * head_dim:
        raise ValueError(
            f"linear_qkv has {t.shape[0]} output rows; expected num_groups * (q_per_group + 2) * "
            f"head_dim = {num_groups} * ({q_per_group} + 2) * {head_dim}"
        )
    return t.view(num_groups, q_per_group + 2, head_dim, *t.shape[1:])


def fold_knocking_into_qkv(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_groups: int,
    q_per_group: int,
    t_q: Optional[torch.Tensor] = None,
    t_k: Optional[torch.Tensor] = None,
    t_v: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return (W', b') such that plain linear_qkv with W', b' equals linear_qkv followed by knocking."""
    given = [t for t in (t_q, t_k, t_v) if t is not None]
    if not given:
        return weight.clone(), None if bias is None else bias.clone()
    head_dim = given[0].shape[0]
    w = _head_blocks(weight, num_groups, q_per_group, head_dim).clone()
    b = None if bias is None else _head_blocks(bias, num_groups, q_per_group, head_dim).clone()
    slots = {"q": slice(0, q_per_group), "k": slice(q_per_group, q_per_group + 1),
             "v": slice(q_per_group + 1, q_per_group + 2)}
    for name, t in (("q", t_q), ("k", t_k), ("v", t_v)):
        if t is None:
            continue
        t = t.to(weight.dtype)
        s = slots[name]
        # rows of each head block: W_h' = T^T W_h  ->  einsum over the head-dim axis
        w[:, s] = torch.einsum("ji,gsjd->gsid", t, w[:, s])
        if b is not None:
            b[:, s] = b[:, s] @ t
    return w.reshape(weight.shape), None if b is None else b.reshape(bias.shape)
