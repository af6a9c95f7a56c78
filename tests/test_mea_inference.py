"""MEA under Megatron-Core's static-batching inference (StaticInferenceContext, KV cache).

- greedy generation with the KV cache (prefill, then 32 single-token decode steps, the
  context driven as Megatron's static generation loop drives it) gives at every step the
  logits of a full forward without cache over the sequence so far (fp32, <= 1e-5);
- the cache holds only the h' component heads: KV bytes per token of MEA with h' = h/2 are
  exactly half of the baseline with the same num_query_groups;
- the composition happens after the cache: new composition matrices set in the last layer
  between prefill and decode act on the already-cached tokens too (a cache of composed heads
  could not); a baseline control shows a stale cache is detected.
"""
import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_kha.mea_attention import grouped_identity
from tests.gpt_factory import VOCAB, build_gpt, randomize_, tiny_config
from tests.single_rank import ensure_single_rank

TOL = 1e-5
DECODE_STEPS = 32
BATCH = 2

# (id, config overrides): attention heads, KV groups h, and for MEA h' (component heads).
CASES = [
    ("baseline-mha", dict(num_attention_heads=4, num_query_groups=4)),
    ("baseline-gqa", dict(num_attention_heads=8, num_query_groups=4)),
    ("mea-mha-h'=h", dict(num_attention_heads=4, num_query_groups=4, attention_variant="mea", mea_virtual_kv_heads=4)),
    ("mea-mha-h'=h/2", dict(num_attention_heads=4, num_query_groups=4, attention_variant="mea", mea_virtual_kv_heads=2)),
    ("mea-gqa-h'=h", dict(num_attention_heads=8, num_query_groups=4, attention_variant="mea", mea_virtual_kv_heads=4)),
    ("mea-gqa-h'=h/2", dict(num_attention_heads=8, num_query_groups=4, attention_variant="mea", mea_virtual_kv_heads=2)),
    ("mea-gqa-h'=h/2-nohn",
     dict(num_attention_heads=8, num_query_groups=4, attention_variant="mea", mea_virtual_kv_heads=2, mea_head_norm=False)),
]


@pytest.fixture(scope="module", autouse=True)
def _world():
    ensure_single_rank()


def _seed(name: str) -> int:
    return sum(map(ord, name)) * 7919 % 100_003


def _model(overrides: dict, seed: int):
    """Randomized tiny GPT (RoPE, dropout 0) in eval mode; MEA compositions checked off their init."""
    model = build_gpt(tiny_config(**overrides), seed=seed)
    randomize_(model, seed=seed + 1)
    model.eval()
    for name, p in model.named_parameters():
        if name.endswith("_composition"):
            assert (p - grouped_identity(*p.shape)).abs().max() > 0.05, f"{name} still at its init"
    return model


def _positions(start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end).unsqueeze(0).expand(BATCH, -1)


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] of a plain forward over the whole sequence (causal mask, no cache)."""
    return model(tokens, _positions(0, tokens.shape[1]), None)


def _cached_step(model, ctx: StaticInferenceContext, tokens: torch.Tensor) -> torch.Tensor:
    """One forward through the cache, then advance the offset (forward_pass_without_pipeline_parallel)."""
    start = ctx.sequence_len_offset
    logits = model(tokens, _positions(start, start + tokens.shape[1]), None,
                   inference_context=ctx, runtime_gather_output=True)
    ctx.increment_sequence_len_offset(tokens.shape[1])
    return logits


def _generate_and_compare(model, prompt: torch.Tensor, steps: int, between=None):
    """Greedy generation with the static KV cache; per step the max |cached - full| of the logits.

    Driven like megatron.core.inference's static loop: reset(), prefill in prefill mode, then
    decode mode with one new token per step, `increment_sequence_len_offset` after each forward.
    Prefill materializes all prompt positions (as with return_log_probs); decode only the last.
    `between(model)` runs after prefill, before the first decode step.
    """
    ctx = StaticInferenceContext(max_batch_size=BATCH, max_sequence_length=prompt.shape[1] + steps)
    ctx.reset()
    diffs, tokens = [], prompt
    with torch.inference_mode():
        ctx.materialize_only_last_token_logits = False
        cached = _cached_step(model, ctx, tokens)
        full = _full_logits(model, tokens)
        assert cached.shape == full.shape == (BATCH, prompt.shape[1], VOCAB)
        assert full.abs().max() > 0.1, "degenerate logits"
        diffs.append((cached - full).abs().max().item())
        if between is not None:
            between(model)
        ctx.enable_decode_mode()
        ctx.materialize_only_last_token_logits = True
        for _ in range(steps):
            tokens = torch.cat([tokens, cached[:, -1].argmax(-1, keepdim=True)], dim=1)
            cached = _cached_step(model, ctx, tokens[:, -1:])
            full = _full_logits(model, tokens)
            assert cached.shape == (BATCH, 1, VOCAB)
            diffs.append((cached[:, -1] - full[:, -1]).abs().max().item())
    assert ctx.sequence_len_offset == tokens.shape[1] == prompt.shape[1] + steps
    return diffs, ctx


def _prompt(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(3, 10, (1,), generator=g))
    return torch.randint(1, VOCAB, (BATCH, length), generator=g)


def kv_bytes_per_token(ctx: StaticInferenceContext) -> float:
    """Allocated K+V cache bytes over all layers / (max_sequence_length * max_batch_size).

    Counts each buffer's storage, not just the view in the dict, so an over-allocated cache
    that is sliced down to h' heads would still be caught."""
    total = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
                for k, v in ctx.key_value_memory_dict.values())
    return total / (ctx.max_sequence_length * ctx.max_batch_size)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_cached_greedy_generation_matches_full_forward(overrides, qk_norm, request):
    seed = _seed(request.node.callspec.id)
    model = _model(dict(overrides, qk_layernorm=qk_norm), seed)
    diffs, ctx = _generate_and_compare(model, _prompt(seed + 2), DECODE_STEPS)
    assert len(diffs) == DECODE_STEPS + 1
    assert max(diffs) <= TOL, f"cached vs full logits, max |diff| per step: {diffs}"
    expected_heads = overrides.get("mea_virtual_kv_heads", overrides["num_query_groups"])
    assert sorted(ctx.key_value_memory_dict) == [1, 2]
    for key, value in ctx.key_value_memory_dict.values():
        assert key.shape == value.shape == (ctx.max_sequence_length, BATCH, expected_heads, 64 // overrides["num_attention_heads"])


@pytest.mark.parametrize("heads", [4, 8], ids=["mha", "gqa"])
def test_kv_cache_holds_only_component_heads(heads):
    per_token = {}
    for name, extra in [("baseline", {}), ("mea_h", dict(attention_variant="mea", mea_virtual_kv_heads=4)),
                        ("mea_half", dict(attention_variant="mea", mea_virtual_kv_heads=2))]:
        model = _model(dict(num_attention_heads=heads, num_query_groups=4, **extra), seed=heads + len(name))
        _, ctx = _generate_and_compare(model, _prompt(heads * 31 + len(name)), steps=1)
        per_token[name] = kv_bytes_per_token(ctx)
    # 2 layers x (K + V) x groups x d_k x 4 bytes (fp32)
    assert per_token["baseline"] == 2 * 2 * 4 * (64 // heads) * 4
    assert per_token["mea_h"] == per_token["baseline"]
    assert per_token["mea_half"] * 2 == per_token["baseline"]


@pytest.mark.parametrize("heads,virtual", [(4, 2), (8, 2), (8, 4)], ids=["mha-h'=h/2", "gqa-h'=h/2", "gqa-h'=h"])
def test_composition_is_applied_after_the_cache(heads, virtual):
    """New A_K, A_V in the last layer after prefill: decode still equals a full forward with the
    new matrices, so the cached prompt tokens are composed with them too (the last layer's cache
    depends only on its input, which the change leaves alone; earlier layers' would go stale)."""
    seed = 97 * heads + virtual
    model = _model(dict(num_attention_heads=heads, num_query_groups=4, attention_variant="mea",
                        mea_virtual_kv_heads=virtual, qk_layernorm=True), seed)

    def recompose(m):
        g = torch.Generator().manual_seed(seed + 5)
        attention = m.decoder.layers[-1].self_attention
        for p in (attention.key_composition, attention.value_composition):
            p.add_(0.5 * torch.randn(p.shape, generator=g))

    diffs, _ = _generate_and_compare(model, _prompt(seed), steps=4, between=recompose)
    assert max(diffs) <= TOL, diffs


def test_stale_cache_is_detected():
    """Control: in the baseline the cache holds projected keys, so changing W_qkv after prefill
    must make cached decoding differ from the full forward (the comparison is not vacuous)."""
    model = _model(dict(num_attention_heads=4, num_query_groups=4), seed=5)

    def change_keys(m):
        g = torch.Generator().manual_seed(6)
        for name, p in m.named_parameters():
            if name.endswith("linear_qkv.weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))

    diffs, _ = _generate_and_compare(model, _prompt(7), steps=2, between=change_keys)
    assert diffs[0] <= TOL and min(diffs[1:]) > 1e-3, diffs
