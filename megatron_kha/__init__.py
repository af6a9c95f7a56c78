"""megatron_kha: Knocking-Heads Attention (KHA) and Multi-head Explicit Attention (MEA) for Megatron-Core.

Public API (stable names):
    KHAConfig                    TransformerConfig with the attention-variant fields
    get_gpt_layer_spec           TransformerLayer ModuleSpec for the configured variant
    get_gpt_decoder_block_spec   block spec for dense/MoE layouts (follows moe_layer_freq)
    enable_cpu_backend           run Megatron-Core local specs on a CPU build of torch with gloo
"""
from megatron_kha.cpu_backend import enable_cpu_backend
from megatron_kha.config import KHAConfig
from megatron_kha.specs import get_gpt_decoder_block_spec, get_gpt_layer_spec

__all__ = ["KHAConfig", "get_gpt_layer_spec", "get_gpt_decoder_block_spec", "enable_cpu_backend"]
