"""Layer and block specs: Megatron-Core's own GPT specs with the attention module swapped.

We start from Megatron's spec builders (so MLP, MoE, norms and the TE/local
choice stay exactly Megatron's) and change two things:
  * `self_attention` becomes KHASelfAttention ("kha") or MEASelfAttention ("mea", with the
    head-norm linear_proj when config.mea_head_norm);
  * on the local backend, WrappedTorchNorm (which refuses sequence parallelism)
    becomes LocalNorm (same torch modules, SP-aware gradients).
"""
import copy
from dataclasses import fields
from typing import Optional

from megatron.core.models.gpt import gpt_layer_specs as mcore_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_kha.config import KHAConfig
from megatron_kha.kha_attention import KHASelfAttention, KHASelfAttentionSubmodules
from megatron_kha.mea_attention import HeadNormRowParallelLinear, MEASelfAttention
from megatron_kha.norms import LocalNorm

BACKENDS = ("local", "te")


def _check(config, backend: str) -> None:
    if not isinstance(config, KHAConfig):
        raise TypeError(f"config must be a megatron_kha.KHAConfig, got {type(config).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    if backend == "te" and config.attention_variant == "mea" and config.mea_head_norm:
        raise ValueError(
            "attention_variant='mea' with mea_head_norm=True has no Transformer Engine projection yet; "
            "allowed: backend='local', or mea_head_norm=False"
        )
    if backend == "te" and not mcore_specs.HAVE_TE:
        raise ValueError(
            "backend='te' needs Transformer Engine, which is not importable here; "
            "allowed on this machine: 'local' (install megatron_kha[te] on a GPU host for 'te')"
        )


def _local_norm(norm):
    return LocalNorm if norm is WrappedTorchNorm else norm


def _with_variant(layer_spec: ModuleSpec, config: KHAConfig, backend: str) -> ModuleSpec:
    """A copy of Megatron's layer spec with our attention module and (local) norms."""
    spec = copy.deepcopy(layer_spec)
    layer = spec.submodules
    attention = layer.self_attention
    if backend == "local":
        layer.input_layernorm = _local_norm(layer.input_layernorm)
        layer.pre_mlp_layernorm = _local_norm(layer.pre_mlp_layernorm)
        attention.submodules.q_layernorm = _local_norm(attention.submodules.q_layernorm)
        attention.submodules.k_layernorm = _local_norm(attention.submodules.k_layernorm)
    if config.attention_variant == "mea":
        attention.module = MEASelfAttention
        if config.mea_head_norm:
            attention.submodules.linear_proj = HeadNormRowParallelLinear
    elif config.attention_variant == "kha":
        base = attention.submodules
        attention.module = KHASelfAttention
        attention.submodules = KHASelfAttentionSubmodules(
            **{f.name: getattr(base, f.name) for f in fields(base)}
        )
    return spec


def _megatron_layer_spec(config: KHAConfig, backend: str, num_experts: Optional[int]) -> ModuleSpec:
    common = dict(
        num_experts=num_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
        qk_l2_norm=config.qk_l2_norm,
    )
    if backend == "te":
        return mcore_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return mcore_specs.get_gpt_layer_local_spec(normalization=config.normalization, **common)


def get_gpt_layer_spec(config: KHAConfig, backend: str = "local") -> ModuleSpec:
    """TransformerLayer spec for `config.attention_variant`; MoE MLP when config.num_moe_experts is set.

    With the local backend and sequence_parallel, prefer get_gpt_decoder_block_spec: a bare layer
    spec lets TransformerBlock pick Megatron's default final norm, which refuses SP on CPU.
    """
    _check(config, backend)
    return _with_variant(_megatron_layer_spec(config, backend, config.num_moe_experts), config, backend)


def get_gpt_decoder_block_spec(
    config: KHAConfig,
    backend: str = "local",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage: dense and MoE layers following config.moe_layer_freq."""
    _check(config, backend)
    block = mcore_specs.get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=backend == "te",
        normalization=config.normalization,
        qk_l2_norm=config.qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    converted = {}  # Megatron reuses one spec object for all dense (or MoE) layers
    layer_specs = []
    for layer_spec in block.layer_specs:
        if id(layer_spec) not in converted:
            converted[id(layer_spec)] = _with_variant(layer_spec, config, backend)
        layer_specs.append(converted[id(layer_spec)])
    layer_norm = _local_norm(block.layer_norm) if backend == "local" else block.layer_norm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=layer_norm)
