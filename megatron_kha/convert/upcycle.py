"""Upcycle a plain (baseline) GPT checkpoint into KHA or MEA with identity-initialised new parameters.

Every parameter of a plain layer keeps its name in a KHA or MEA layer (h' = h), so the new model
loads the plain state dict and only the variant's own parameters are new:
  KHA-Linear   knocking_{q,k,v}.weight = I                 -> x @ I = x
  KHA-MLP      knocking_v.{up,down}_weight = I, gate = 0   -> 2 * (x * sigmoid(0)) = x
  MEA (h' = h) key_composition = value_composition = I     -> composite head j = component j
  MEA head norm linear_proj.head_norm_weight = 1           -> NOT the identity: the per-head RMSNorm
               of each head's output changes the function (off unless asked for)
With the head norm off the upcycled model computes the source's logits (tested bit-exact on CPU).
"""
from typing import Dict, Tuple

import torch

from megatron_kha.config import normalize_kha_targets


def upcycled_config(config_dict: dict, variant: str, kha_targets: str = "v", kha_type: str = "linear",
                    mea_head_norm: bool = False) -> dict:
    """The "kha_config" of the upcycled model (source must be attention_variant='baseline')."""
    source_variant = config_dict.get("attention_variant", "baseline")
    if source_variant != "baseline":
        raise ValueError(f"attention_variant={source_variant!r}: upcycling starts from a plain checkpoint; "
                         "allowed: 'baseline' (absorb a KHA/MEA checkpoint first with tools/absorb.py)")
    new = dict(config_dict)
    if variant == "kha":
        targets = normalize_kha_targets(kha_targets)
        if kha_type not in ("linear", "mlp"):
            raise ValueError(f"kha_type={kha_type!r} is invalid; allowed: linear, mlp")
        if kha_type == "mlp" and targets != "v":
            raise ValueError(f"kha_type='mlp' acts on values only; kha_targets={targets!r} is invalid; allowed: 'v'")
        new.update(attention_variant="kha", kha_targets=targets, kha_type=kha_type, kha_init="identity")
    elif variant == "mea":
        new.update(attention_variant="mea", mea_virtual_kv_heads=config_dict["num_query_groups"],
                   mea_head_norm=bool(mea_head_norm))
    else:
        raise ValueError(f"variant={variant!r} is invalid; allowed: kha, mea")
    return new


def identity_values(model) -> Dict[str, torch.Tensor]:
    """{name: identity value} for every variant-specific parameter of a KHA/MEA GPTModel."""
    out = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".knocking_" in name:
            if leaf == "gate_weight":
                out[name] = torch.zeros_like(p)
            else:  # weight (linear), up_weight, down_weight
                out[name] = torch.eye(p.shape[0], dtype=p.dtype)
        elif leaf in ("key_composition", "value_composition"):
            if p.shape[0] != p.shape[1]:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; upcycling uses h' = h")
            out[name] = torch.eye(p.shape[0], dtype=p.dtype)
        elif leaf == "head_norm_weight":
            out[name] = torch.ones_like(p)
    return out


def load_plain_into(model, plain_state: Dict[str, torch.Tensor]) -> list:
    """Load a plain state dict into an upcycled model; set the new parameters to identity.

    Fails unless the only missing keys are the variant's new parameters and nothing is unexpected.
    Returns the names of the new parameters.
    """
    identity = identity_values(model)
    result = model.load_state_dict(plain_state, strict=False)
    missing = sorted(k for k in result.missing_keys if not k.endswith("._extra_state"))
    unexpected = sorted(k for k in result.unexpected_keys if not k.endswith("._extra_state"))
    if unexpected:
        raise ValueError(f"source has parameters the upcycled model does not: {unexpected[:4]}")
    if sorted(identity) != missing:
        extra = sorted(set(missing) - set(identity))
        raise ValueError(f"source lacks parameters of a plain layer: {extra[:4]}" if extra else
                         f"source already has variant parameters: {sorted(set(identity) - set(missing))[:4]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in identity.items():
            params[name].copy_(value)
    return sorted(identity)


def upcycle_state_dict(plain_state: Dict[str, torch.Tensor], config_dict: dict, **variant) -> Tuple[object, dict]:
    """(upcycled GPTModel with the plain weights + identity new params, its "kha_config")."""
    from megatron_kha.convert import checkpoint_io

    new_cfg = upcycled_config(config_dict, **variant)
    model, _ = checkpoint_io.build_model(new_cfg)
    load_plain_into(model, plain_state)
    return model, new_cfg
