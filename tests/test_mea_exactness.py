"""MEA on one rank against independent references.

- identity composition, no head norm == the plain GPT with the same weights, bit for bit;
- the MEA attention layer (random composition matrices, random head-norm scale) == an fp64
  plain-PyTorch reference of the formulas, for MHA, GQA and virtual heads (h' < h).
"""
import pytest
import torch

from tests.gpt_factory import batch, build_gpt, randomize_, run_attention_layer, tiny_config
from tests.references import causal_gqa_attention, rms_norm, split_fused_qkv
from tests.single_rank import ensure_single_rank


@pytest.fixture(scope="module", autouse=True)
def _world():
    ensure_single_rank()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_identity_without_head_norm_equals_plain_gpt(groups, qk_norm):
    base = build_gpt(tiny_config(num_query_groups=groups, qk_layernorm=qk_norm))
    randomize_(base, seed=3)
    mea = build_gpt(tiny_config(num_query_groups=groups, qk_layernorm=qk_norm, attention_variant="mea", mea_head_norm=False), seed=8)
    result = mea.load_state_dict(base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(n for n in mea.state_dict() if n.endswith("_composition"))
    assert result.missing_keys and not result.unexpected_keys
    tokens, _, pos, mask = batch(5)
    with torch.no_grad():
        ref, out = base(tokens, pos, mask), mea(tokens, pos, mask)
    assert ref.abs().max() > 0.1
    assert torch.equal(ref, out)


def reference_mea(x, p, cfg):
    """fp64 MEA self-attention (no RoPE): HLC over h' components -> k-norm -> attention -> head norm."""
    heads, h, h_virtual, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.mea_virtual_kv_heads, cfg.kv_channels
    q, k_components, v_components = split_fused_qkv(x, p["linear_qkv.weight"], heads, h_virtual, hn)
    k = torch.einsum("sbid,ij->sbjd", k_components, p["key_composition"])
    v = torch.einsum("sbid,ij->sbjd", v_components, p["value_composition"])
    if cfg.qk_layernorm:
        q = rms_norm(q, p["q_layernorm.weight"], cfg.layernorm_epsilon)
        k = rms_norm(k, p["k_layernorm.weight"], cfg.layernorm_epsilon)
    ctx = causal_gqa_attention(q, k, v)  # [s, b, heads, hn]
    if cfg.mea_head_norm:
        ctx = rms_norm(ctx, p["linear_proj.head_norm_weight"].view(heads, hn), cfg.layernorm_epsilon)
    return ctx.reshape(*ctx.shape[:2], -1) @ p["linear_proj.weight"].T


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("head_norm", [True, False], ids=["headnorm", "nohn"])
@pytest.mark.parametrize("groups,virtual", [(4, 4), (2, 2), (4, 2), (2, 1)], ids=["mha", "gqa", "mha-virtual2", "gqa-virtual1"])
def test_attention_layer_equals_fp64_reference(groups, virtual, head_norm, qk_norm):
    cfg = tiny_config(attention_variant="mea", num_query_groups=groups, mea_virtual_kv_heads=virtual,
                      mea_head_norm=head_norm, qk_layernorm=qk_norm)
    out, params, x = run_attention_layer(cfg)
    eye = torch.eye(virtual, groups, dtype=torch.float64)
    assert (params["key_composition"] - eye).abs().max() > 0.05, "composition still at its init"
    ref = reference_mea(x, params, cfg)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() <= 1e-5
