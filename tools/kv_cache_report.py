#!/usr/bin/env python
"""KV-cache size per token of the baseline vs MEA under Megatron-Core static-batching inference.

Builds a tiny randomly initialized baseline GPT and one MEA GPT per --mea-virtual-kv-heads value
(same heads and num_query_groups), runs one prefill of a random prompt through a
StaticInferenceContext, and measures the KV cache that Megatron allocated in
`ctx.key_value_memory_dict`. Prints a markdown table:

    variant | cached KV heads / layer | KV bytes / token fp32 | bf16 | ratio vs baseline

bytes / token = (allocated key + value storage over all layers) / (max_sequence_length *
max_batch_size). The fp32 column is measured; the bf16 column is the same element count x 2
bytes (what a bf16 cache would hold), not a separate bf16 run. Runs on CPU (gloo, one rank).

    python tools/kv_cache_report.py --num-query-groups 8 --mea-virtual-kv-heads 4 2
"""
import argparse
import os
import sys
import warnings

VOCAB = 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=2, help="(default: 2)")
    p.add_argument("--hidden-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--num-attention-heads", type=int, default=4, help="(default: 4)")
    p.add_argument("--num-query-groups", type=int, default=None,
                   help="h, KV heads of the baseline and composite KV heads of MEA (default: num attention heads)")
    p.add_argument("--mea-virtual-kv-heads", type=int, nargs="+", default=None,
                   help="h', the component KV heads MEA caches; one or more values (default: h/2, or 1 when h = 1)")
    p.add_argument("--seq-length", type=int, default=16, help="prompt length = max_sequence_length of the cache (default: 16)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="batch = max_batch_size of the cache (default: 2)")
    args = p.parse_args(argv)
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.mea_virtual_kv_heads is None:
        args.mea_virtual_kv_heads = [max(1, args.num_query_groups // 2)]
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "seq_length", "micro_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden_size % args.num_attention_heads:
        p.error("--hidden-size must be a multiple of --num-attention-heads")
    if args.num_attention_heads % args.num_query_groups:
        p.error("--num-query-groups must divide --num-attention-heads")
    return args


def build(args, **variant):
    import torch
    from megatron.core.models.gpt import GPTModel

    from megatron_kha import KHAConfig, get_gpt_decoder_block_spec

    config = KHAConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        **variant,
    )
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_decoder_block_spec(config),
                     vocab_size=VOCAB, max_sequence_length=args.seq_length,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return model.eval()


def measure(model, args):
    """One prefill through a StaticInferenceContext -> (cached KV heads per layer, bytes/token fp32, elements/token)."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext

    b, s = args.micro_batch_size, args.seq_length
    ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=s)
    tokens = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    with torch.inference_mode():
        model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
    ctx.increment_sequence_len_offset(s)
    buffers = list(ctx.key_value_memory_dict.values())
    assert len(buffers) == args.num_layers, "expected one KV buffer pair per layer"
    heads = {k.shape[2] for k, v in buffers} | {v.shape[2] for k, v in buffers}
    nbytes = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in buffers)
    elements = sum(k.numel() + v.numel() for k, v in buffers)
    dtype_bytes = buffers[0][0].element_size()
    assert nbytes == elements * dtype_bytes, "cache storage larger than the buffers it backs"
    tokens_capacity = s * b
    return "/".join(map(str, sorted(heads))), nbytes / tokens_capacity, elements / tokens_capacity


def fmt(x: float) -> str:
    return f"{x:g}"


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_kha.world import ensure_single_process_world  # after argparse: --help stays fast

    ensure_single_process_world()
    h = args.num_query_groups
    try:
        rows = [("baseline", build(args))]
        for hv in args.mea_virtual_kv_heads:
            rows.append((f"mea (h={h}, h'={hv})", build(args, attention_variant="mea", mea_virtual_kv_heads=hv)))
    except ValueError as e:  # KHAConfig / TransformerConfig rejects the combination
        print(f"kv_cache_report.py: error: {e}", file=sys.stderr)
        return 2
    print(f"layers={args.num_layers} hidden={args.hidden_size} heads={args.num_attention_heads} "
          f"num_query_groups={h} d_k={args.hidden_size // args.num_attention_heads} "
          f"max_seq={args.seq_length} max_batch={args.micro_batch_size}\n")
    print("| variant | cached KV heads / layer | KV bytes / token (fp32) | KV bytes / token (bf16) | ratio vs baseline |")
    print("|---|---|---|---|---|")
    base = None
    for name, model in rows:
        heads, fp32, elements = measure(model, args)
        base = fp32 if base is None else base
        print(f"| {name} | {heads} | {fmt(fp32)} | {fmt(elements * 2)} | {fp32 / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
