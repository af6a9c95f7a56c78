"""Per-layer head diagnostics: drift of the head-mixing matrices, and head-output similarity.

knocking_identity_distance(model) -> {"layer0/knocking_v.weight": 0.013, ...}
    ||W - W0||_F / ||W0||_F for every knocking / composition matrix W with init pattern W0
    (I for T, U, D; the grouped identity for MEA compositions). The gate G of KnockingMLP
    starts at 0, so its distance is ||G||_F / ||I||_F (same scale as U and D). 0 at init.

HeadOutputSimilarity(model): forward hooks on each layer's `self_attention.core_attention`.
    While `.enabled` is True, every forward adds the mean pairwise cosine similarity between
    the heads of each token (output [s, b, heads_local * d_k] split by kv_channels) to a
    running sum; `compute()` returns the per-layer means and clears them; `close()` removes
    the hooks. Only this rank's heads are compared (under TP, heads_local = heads / TP).
    Nothing is stored but two numbers per layer, so it is cheap to leave enabled for a step.
    With activation recomputation the recomputed forward is counted too (same value).
"""
import math
from typing import Dict, Optional

import torch

from megatron_kha.observe.head_mixing_matrices import head_mixing_matrices, self_attention_modules


@torch.no_grad()
def knocking_identity_distance(model: torch.nn.Module) -> Dict[str, float]:
    """Relative Frobenius distance of each knocking / composition matrix from its init pattern."""
    distances = {}
    for label, value, init in head_mixing_matrices(model):
        reference = init.norm()
        if reference == 0:  # the gate: compare with the identity of the same shape
            reference = torch.tensor(math.sqrt(min(init.shape)))
        distances[label] = float((value.detach().float() - init).norm() / reference)
    return distances


def mean_pairwise_head_cosine(output: torch.Tensor, head_dim: int) -> tuple:
    """(sum over tokens of the mean off-diagonal head cosine similarity, token count).

    output: [..., heads * head_dim]. Returns (0.0, 0) with fewer than two heads.
    """
    heads = output.detach().float().reshape(-1, output.shape[-1] // head_dim, head_dim)
    n = heads.shape[1]
    if n < 2:
        return 0.0, 0
    unit = torch.nn.functional.normalize(heads, dim=-1)
    summed = unit.sum(dim=1)  # sum_ij <u_i, u_j> = |sum_i u_i|^2; remove the diagonal (|u_i|^2)
    pair_sum = summed.pow(2).sum(-1) - unit.pow(2).sum(dim=(1, 2))
    per_token = (pair_sum / (n * (n - 1))).clamp(-1.0, 1.0)
    return float(per_token.sum()), per_token.numel()


class HeadOutputSimilarity:
    """Mean pairwise cosine similarity between attention heads' outputs, per layer."""

    def __init__(self, model: torch.nn.Module, head_dim: Optional[int] = None):
        self.enabled = False
        self._sums: Dict[str, list] = {}
        self._handles = []
        for label, attention in self_attention_modules(model):
            core = getattr(attention, "core_attention", None)
            if core is None:
                continue
            dim = head_dim or attention.config.kv_channels
            self._handles.append(core.register_forward_hook(self._hook(label, dim)))

    def _hook(self, label: str, head_dim: int):
        def hook(module, inputs, output):
            if not self.enabled:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            total, count = mean_pairwise_head_cosine(out, head_dim)
            if count:
                acc = self._sums.setdefault(label, [0.0, 0])
                acc[0] += total
                acc[1] += count
        return hook

    @property
    def layers(self) -> int:
        """How many core-attention modules are hooked."""
        return len(self._handles)

    def compute(self) -> Dict[str, float]:
        """{"layer0": mean similarity, ...} over the forwards captured since the last call; clears."""
        result = {label: total / count for label, (total, count) in self._sums.items()}
        self._sums.clear()
        return result

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sums.clear()
