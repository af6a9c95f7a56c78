"""KHA on one rank against independent references.

- identity init == the baseline model with the same weights (every target/type, +-QK-norm);
- KHA-Linear with random T == a plain Megatron GPT whose linear_qkv has T folded in (MHA/GQA/MQA);
- the KHA attention layer == a plain-PyTorch fp64 reference of the formulas.
"""
import pytest
import torch

from megatron_kha.fold import fold_knocking_into_qkv
from tests.references import causal_gqa_attention, rms_norm, split_fused_qkv
from tests.gpt_factory import batch, build_gpt, full_params, randomize_, run_attention_layer, tiny_config
from tests.single_rank import ensure_single_rank


@pytest.fixture(scope="module", autouse=True)
def _world():
    ensure_single_rank()


def _logits(model, seed=7):
    tokens, _, pos, mask = batch(seed)
    with torch.no_grad():
        return model(tokens, pos, mask)


COMBOS = [(t, "linear") for t in ("q", "k", "v", "qk", "qv", "kv", "qkv")] + [("v", "mlp")]


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("targets,kha_type", COMBOS, ids=[f"{t}-{k}" for t, k in COMBOS])
def test_identity_init_equals_baseline(targets, kha_type, qk_norm):
    base = build_gpt(tiny_config(qk_layernorm=qk_norm))
    randomize_(base, seed=3)
    kha = build_gpt(tiny_config(qk_layernorm=qk_norm, attention_variant="kha", kha_targets=targets, kha_type=kha_type), seed=99)
    result = kha.load_state_dict(base.state_dict(), strict=False)
    knocking = {n for n in kha.state_dict() if ".knocking_" in n}
    assert set(result.missing_keys) == knocking and knocking, result
    assert not result.unexpected_keys
    ref, out = _logits(base), _logits(kha)
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert (ref - out).abs().max().item() <= 1e-6


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("groups,qkv_bias", [(4, False), (2, False), (1, False), (2, True)], ids=["mha", "gqa", "mqa", "gqa-bias"])
def test_random_kha_linear_equals_folded_plain_gpt(groups, qkv_bias, qk_norm):
    common = dict(num_query_groups=groups, qk_layernorm=qk_norm, add_qkv_bias=qkv_bias)
    kha = build_gpt(tiny_config(attention_variant="kha", kha_targets="qkv", kha_init="random", **common))
    randomize_(kha, seed=5)
    plain = build_gpt(tiny_config(**common), seed=77)
    params = full_params(kha)
    q_per_group = 4 // groups
    folded = {}
    for layer in range(2):
        pre = f"decoder.layers.{layer}.self_attention."
        t = {x: params[f"{pre}knocking_{x}.weight"] for x in "qkv"}
        assert all((m - torch.eye(16)).abs().max() > 0.1 for m in t.values())
        w, b = fold_knocking_into_qkv(
            params[f"{pre}linear_qkv.weight"], params.get(f"{pre}linear_qkv.bias"), groups, q_per_group,
            t_q=t["q"], t_k=t["k"], t_v=t["v"],
        )
        folded[f"{pre}linear_qkv.weight"] = w
        if b is not None:
            folded[f"{pre}linear_qkv.bias"] = b
    state = {n: v for n, v in params.items() if ".knocking_" not in n}
    state.update(folded)
    plain.load_state_dict(state, strict=True)
    ref, out = _logits(plain), _logits(kha)
    assert ref.abs().max() > 0.1
    assert (ref - out).abs().max().item() <= 2e-5


def reference_attention(x, p, cfg):
    """fp64 plain-PyTorch KHA self-attention (no RoPE)."""
    heads, groups, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    q, k, v = split_fused_qkv(x, p["linear_qkv.weight"], heads, groups, hn)
    if cfg.kha_type == "linear":
        knock = {t: (lambda z, T=p[f"knocking_{t}.weight"]: z @ T) for t in cfg.kha_targets}
    else:
        U, G, D = p["knocking_v.up_weight"], p["knocking_v.gate_weight"], p["knocking_v.down_weight"]
        knock = {"v": lambda z: 2 * ((z @ U) * torch.sigmoid(z @ G)) @ D}
    q, k, v = (knock[t](z) if t in knock else z for t, z in zip("qkv", (q, k, v)))
    if cfg.qk_layernorm:
        q = rms_norm(q, p["q_layernorm.weight"], cfg.layernorm_epsilon)
        k = rms_norm(k, p["k_layernorm.weight"], cfg.layernorm_epsilon)
    ctx = causal_gqa_attention(q, k, v)
    return ctx.reshape(*ctx.shape[:2], -1) @ p["linear_proj.weight"].T


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kha_type,targets", [("mlp", "v"), ("linear", "qkv")])
def test_attention_layer_equals_fp64_reference(kha_type, targets, groups, qk_norm):
    cfg = tiny_config(attention_variant="kha", kha_type=kha_type, kha_targets=targets, kha_init="random",
                      num_query_groups=groups, qk_layernorm=qk_norm)
    out, params, x = run_attention_layer(cfg)
    ref = reference_attention(x, params, cfg)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() <= 1e-5
