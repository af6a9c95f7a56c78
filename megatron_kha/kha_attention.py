"""KHASelfAttention: Megatron's SelfAttention with knocking maps after linear_qkv.

Placement (DESIGN.md section 1): after the QKV projection, before QK-norm and
RoPE, then ordinary core attention. Megatron's own projection code still runs
(including the all-gather + slice used when num_query_groups < TP size): we
ask it for the unsplit `[sq, b, ng, (np/ng + 2) * hn]` tensor, which it returns
before any normalisation, then split, knock and normalise here.

Every parameter a plain SelfAttention has keeps its name; the new ones live in
`knocking_q`, `knocking_k`, `knocking_v` (only the enabled targets exist).

Settings come from a KHAConfig, or from spec params (`kha_targets=...` keyword arguments,
which win over the config): Megatron-LM's pretrain_gpt.py builds a plain TransformerConfig,
so a `--spec` carries them (megatron_kha/megatron_lm.py).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_kha.config import resolve_attention_config
from megatron_kha.knocking import KnockingLinear, KnockingMLP
from megatron_kha.qkv_heads import own_query_heads, split_heads


@dataclass
class KHASelfAttentionSubmodules(SelfAttentionSubmodules):
    """SelfAttention's submodules plus the knocking map classes (swappable, e.g. for a fused kernel)."""

    knocking_linear: Union[ModuleSpec, type] = KnockingLinear
    knocking_mlp: Union[ModuleSpec, type] = KnockingMLP


class KHASelfAttention(SelfAttention):
    """Knocking-Heads Attention (arXiv 2510.23052) as a drop-in SelfAttention."""

    def __init__(
        self,
        config,
        submodules: KHASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        kha_targets: Optional[str] = None,
        kha_type: Optional[str] = None,
        kha_init: Optional[str] = None,
    ):
        config = resolve_attention_config(
            config, "kha", kha_targets=kha_targets, kha_type=kha_type, kha_init=kha_init
        )
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        knocking_spec = submodules.knocking_mlp if config.kha_type == "mlp" else submodules.knocking_linear
        for target in config.kha_targets:
            module = build_module(
                knocking_spec,
                config=self.config,
                head_dim=self.hidden_size_per_attention_head,
                tp_group=self.tp_group,
            )
            self.add_module(f"knocking_{target}", module)

    def _knock(self, target: str, x: torch.Tensor) -> torch.Tensor:
        module = getattr(self, f"knocking_{target}", None)
        return x if module is None else module(x)

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Optional[torch.Tensor] = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ):
        # KHAConfig rejects attention_output_gate, so output_gate is always False here.
        assert not output_gate, "attention_output_gate is not supported with KHA"
        mixed_qkv, split_arg_list = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=False, split_qkv=False
        )
        query, key, value = split_heads(self, mixed_qkv)
        key = self._knock("k", key)
        value = self._knock("v", value)

        if not split_qkv:
            # Fused-RoPE path: hand back the unsplit layout Megatron expects (it has no QK-norm).
            query = self._knock("q", query)
            mixed_qkv = torch.cat([query, key, value], dim=3).view(*mixed_qkv.shape)
            return mixed_qkv, split_arg_list

        query = self._knock("q", own_query_heads(self, query, self.config.num_query_groups))
        key, value = key.squeeze(3), value.squeeze(3)  # [sq, b, ng, 1, hn] -> [sq, b, ng, hn]
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value
