"""The learned head-mixing matrices of a model, each with the value it was initialised to.

KHA layers: `knocking_{q,k,v}` submodules of each self_attention, either
KnockingLinear (`weight`, init I) or KnockingMLP (`up_weight` init I, `gate_weight`
init 0, `down_weight` init I). MEA layers: `key_composition` / `value_composition`
([h', h], init the grouped identity A[i, j] = 1 iff i = j * h' // h).

All of them are replicated over tensor parallelism, so every rank holds the full matrix.
Labels use the global layer index (0-based), so they agree across pipeline stages:
"layer3/knocking_v.weight", "layer3/key_composition".
"""
import re
from typing import Iterator, NamedTuple

import torch

from megatron_kha.knocking import KnockingLinear, KnockingMLP
from megatron_kha.mea_attention import grouped_identity

_KNOCKING_INITS = {
    KnockingLinear: {"weight": "identity"},
    KnockingMLP: {"up_weight": "identity", "gate_weight": "zeros", "down_weight": "identity"},
}
_COMPOSITIONS = ("key_composition", "value_composition")


class HeadMixingMatrix(NamedTuple):
    label: str            # "layer{global index}/{name}"
    value: torch.Tensor   # the parameter (not detached; callers detach)
    init: torch.Tensor    # its identity-init pattern, float32 on the parameter's device


def attention_layer_label(name: str, attention: torch.nn.Module) -> str:
    """"layer{N}" with N the 0-based global layer index (from Megatron's 1-based layer_number)."""
    number = getattr(attention, "layer_number", None)
    if isinstance(number, int):
        return f"layer{number - 1}"
    match = re.search(r"layers\.(\d+)\.", name + ".")
    return f"layer{match.group(1)}" if match else name


def self_attention_modules(model: torch.nn.Module) -> Iterator[tuple]:
    """(label, module) for every `...self_attention` module of the model, in module order."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "self_attention":
            yield attention_layer_label(name, module), module


def _pattern(kind: str, like: torch.Tensor) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(like.shape, device=like.device)
    return torch.eye(like.shape[0], like.shape[1], device=like.device)


def head_mixing_matrices(model: torch.nn.Module) -> Iterator[HeadMixingMatrix]:
    """Every knocking / composition matrix of the model with its init pattern."""
    for label, attention in self_attention_modules(model):
        for child_name, child in attention.named_children():
            inits = next((v for cls, v in _KNOCKING_INITS.items() if isinstance(child, cls)), {})
            for param_name, kind in inits.items():
                param = getattr(child, param_name)
                yield HeadMixingMatrix(f"{label}/{child_name}.{param_name}", param, _pattern(kind, param))
        for param_name in _COMPOSITIONS:
            param = getattr(attention, param_name, None)
            if isinstance(param, torch.Tensor):
                init = grouped_identity(param.shape[0], param.shape[1]).to(param.device)
                yield HeadMixingMatrix(f"{label}/{param_name}", param, init)
