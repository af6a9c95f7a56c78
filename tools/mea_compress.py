#!/usr/bin/env python
"""Compress a checkpoint's KV heads into H' MEA component heads (per-layer SVD; megatron_kha.convert).

    python tools/mea_compress.py --load SRC --save DST --virtual-kv-heads 2 [--force] [--sample-tokens 64]

SRC: a baseline (plain GQA/MHA) or MEA checkpoint written with megatron_kha.convert.checkpoint_io.
DST: an MEA checkpoint with mea_virtual_kv_heads = H' and the same h = num_query_groups composite
heads. Prints each layer's relative reconstruction error of the K and V projections and the max
abs logit difference between source and compressed model on N random tokens. Runs on one process
(CPU or GPU-less machine; a one-rank gloo world).
"""
import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mea_compress.py",
        description="Compress the K/V heads of every layer to H' MEA component heads by SVD.",
    )
    p.add_argument("--load", required=True, metavar="DIR", help="source checkpoint directory (baseline or MEA)")
    p.add_argument("--save", required=True, metavar="DIR", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--virtual-kv-heads", required=True, type=int, metavar="H'",
                   help="component KV heads to keep: 1..num_query_groups, dividing num_attention_heads")
    p.add_argument("--force", action="store_true", help="replace an existing --save directory")
    p.add_argument("--sample-tokens", type=int, default=None, metavar="N",
                   help="random tokens for the logit comparison (default: min(64, max_sequence_length); 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample tokens (default 0)")
    return p


def _allowed_heads(cfg: dict):
    h, heads = cfg["num_query_groups"], cfg["num_attention_heads"]
    return [n for n in range(1, h + 1) if heads % n == 0]


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from megatron_kha.convert.verify import check_load_save_args, max_logit_diff

    check_load_save_args(parser, args.load, args.save, args.sample_tokens)

    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint deprecations
    from megatron_kha.convert import checkpoint_io
    from megatron_kha.convert.mea_compress import compress_state_dict, compressed_config
    from megatron_kha.world import ensure_single_process_world

    ensure_single_process_world()
    try:
        cfg = checkpoint_io.load_config(args.load)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"argument --load: {err}")
    if cfg.get("attention_variant", "baseline") not in ("baseline", "mea"):
        parser.error(f"argument --load: attention_variant={cfg.get('attention_variant')!r} cannot be compressed; "
                     "allowed: 'baseline', 'mea'")
    allowed = _allowed_heads(cfg)
    if args.virtual_kv_heads not in allowed:
        parser.error(
            f"argument --virtual-kv-heads: {args.virtual_kv_heads} is invalid; must be 1..num_query_groups "
            f"({cfg['num_query_groups']}) and divide num_attention_heads ({cfg['num_attention_heads']}); "
            f"allowed: {', '.join(map(str, allowed))}"
        )
    if os.path.lexists(args.save) and not args.force:
        parser.error(f"argument --save: {args.save!r} already exists; pass --force to replace it")
    max_tokens = cfg.get("max_sequence_length", 64)
    n_tokens = min(64, max_tokens) if args.sample_tokens is None else args.sample_tokens
    if n_tokens > max_tokens and cfg.get("position_embedding_type") == "learned_absolute":
        parser.error(f"argument --sample-tokens: {n_tokens} is invalid; allowed: 0..{max_tokens} (max_sequence_length)")

    source, cfg = checkpoint_io.load_model_checkpoint(args.load)
    new_state, reports = compress_state_dict(source.state_dict(), cfg, args.virtual_kv_heads)
    new_cfg = compressed_config(cfg, args.virtual_kv_heads)
    compressed, _ = checkpoint_io.build_model(new_cfg)
    compressed.load_state_dict(new_state, strict=True)
    checkpoint_io.save_model_checkpoint(compressed, new_cfg, args.save, force=args.force)

    h_old = cfg.get("mea_virtual_kv_heads") or cfg["num_query_groups"]
    print(f"compressed {args.load} -> {args.save}: component KV heads {h_old} -> {args.virtual_kv_heads} "
          f"(composite heads h = {cfg['num_query_groups']})")
    print(f"{'layer':<36} {'K rel. error':>13} {'V rel. error':>13}")
    for layer, r in reports.items():
        print(f"{layer:<36} {r['key_rel_error']:>13.3e} {r['value_rel_error']:>13.3e}")
    if n_tokens > 0:
        diff = max_logit_diff(source, compressed, n_tokens, args.seed)
        print(f"max abs logit difference on {n_tokens} random tokens: {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
