"""Plain-PyTorch references (use fp64 inputs): no Megatron code, written from the formulas."""
import torch


def rms_norm(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def split_fused_qkv(x, w_qkv, heads, groups, hn):
    """Megatron's fused QKV rows: per KV group [q_1 .. q_{heads/groups}, k, v]."""
    s, b, _ = x.shape
    npg = heads // groups
    y = (x @ w_qkv.T).view(s, b, groups, npg + 2, hn)
    return y[:, :, :, :npg].reshape(s, b, heads, hn), y[:, :, :, npg], y[:, :, :, npg + 1]


def causal_gqa_attention(q, k, v):
    """q [s, b, heads, hn]; k, v [s, b, groups, hn]; query head i uses group i // (heads/groups)."""
    s, b, heads, hn = q.shape
    rep = heads // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / hn**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
