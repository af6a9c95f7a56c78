"""Specs: the attention module follows config.attention_variant; MoE patterns and backends behave."""
import pytest
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.torch_norm import WrappedTorchNorm

import megatron_kha
from megatron_kha import KHAConfig, get_gpt_decoder_block_spec, get_gpt_layer_spec
from megatron_kha.kha_attention import KHASelfAttention
from megatron_kha.norms import LocalNorm
from tests.single_rank import ensure_single_rank

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, normalization="RMSNorm")


@pytest.mark.parametrize("variant,cls", [("baseline", SelfAttention), ("kha", KHASelfAttention)])
def test_layer_spec_attention_follows_variant(variant, cls):
    spec = get_gpt_layer_spec(KHAConfig(**BASE, attention_variant=variant, qk_layernorm=True))
    attention = spec.submodules.self_attention
    assert attention.module is cls
    # local backend: Megatron's SP-refusing torch norm is replaced everywhere
    assert spec.submodules.input_layernorm is LocalNorm
    assert attention.submodules.q_layernorm is LocalNorm and attention.submodules.k_layernorm is LocalNorm


def test_block_spec_follows_moe_layer_freq():
    ensure_single_rank()  # Megatron slices the block spec per pipeline stage
    cfg = KHAConfig(**BASE, attention_variant="kha", num_moe_experts=4, moe_layer_freq=[1, 0, 0, 1])
    block = get_gpt_decoder_block_spec(cfg)
    assert len(block.layer_specs) == 4
    is_moe = [spec.submodules.mlp.module is MoELayer for spec in block.layer_specs]
    assert is_moe == [True, False, False, True]
    assert all(spec.submodules.self_attention.module is KHASelfAttention for spec in block.layer_specs)
    assert block.layer_norm is LocalNorm and block.layer_norm is not WrappedTorchNorm


def test_layer_spec_with_experts_is_moe():
    spec = get_gpt_layer_spec(KHAConfig(**BASE, attention_variant="kha", num_moe_experts=4))
    assert spec.submodules.mlp.module is MoELayer


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend='tensorrt' is invalid; allowed: local, te"):
        get_gpt_layer_spec(KHAConfig(**BASE), backend="tensorrt")


def test_te_backend_without_transformer_engine_names_the_alternative():
    from megatron.core.models.gpt import gpt_layer_specs

    if gpt_layer_specs.HAVE_TE:
        pytest.skip("Transformer Engine is installed here; this checks the CPU-only error path")
    with pytest.raises(ValueError, match="allowed on this machine: 'local'"):
        get_gpt_decoder_block_spec(KHAConfig(**BASE), backend="te")


def test_plain_transformer_config_is_rejected():
    from megatron.core.transformer.transformer_config import TransformerConfig

    with pytest.raises(TypeError, match="KHAConfig"):
        get_gpt_layer_spec(TransformerConfig(**BASE))


def test_enable_cpu_backend_is_idempotent():
    megatron_kha.enable_cpu_backend()
    assert megatron_kha.enable_cpu_backend() is False
