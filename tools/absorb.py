#!/usr/bin/env python
"""Absorb KHA-Linear knocking maps / MEA compositions (h' = h) into a plain baseline checkpoint (exact).

    python tools/absorb.py --load SRC --save DST [--force] [--sample-tokens 64] [--seed 0]
                           [--hf-dir OUT --architecture llama|qwen2|qwen3]

SRC: a KHA (kha_type='linear', any q/k/v targets) or MEA (mea_virtual_kv_heads = num_query_groups,
mea_head_norm=False) checkpoint written with megatron_kha.convert.checkpoint_io.
DST: the same model as attention_variant='baseline' (plain Megatron attention), T or A_K/A_V folded
into linear_qkv's rows (and bias). Refused, with the reason: KHA-MLP, MEA with h' < h, MEA with the
head norm (no plain equivalent). Prints the max abs logit difference between SRC and DST on N random
tokens (rounding only, ~1e-6 in fp32). Runs on one process (a one-rank gloo world on CPU).
"""
import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="absorb.py",
        description="Fold KHA-Linear maps or MEA (h' = h, no head norm) compositions into linear_qkv: "
                    "a plain baseline checkpoint with the same logits.",
    )
    p.add_argument("--load", required=True, metavar="DIR", help="source checkpoint directory (KHA-Linear or MEA)")
    p.add_argument("--save", required=True, metavar="DIR",
                   help="output checkpoint directory, attention_variant='baseline' (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --save (and --hf-dir) directory")
    p.add_argument("--sample-tokens", type=int, default=None, metavar="N",
                   help="random tokens for the logit comparison (default: min(64, max_sequence_length); 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample tokens (default 0)")
    p.add_argument("--hf-dir", default=None, metavar="DIR",
                   help="also write Hugging Face safetensors + config.json here (via megatron_kha.convert.hf_mapping.megatron_to_hf)")
    p.add_argument("--architecture", choices=ARCHITECTURES, default=None,
                   help="Hugging Face architecture for --hf-dir")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from megatron_kha.convert.verify import check_load_save_args, max_logit_diff

    check_load_save_args(parser, args.load, args.save, args.sample_tokens)
    if (args.hf_dir is None) != (args.architecture is None):
        parser.error("argument --hf-dir/--architecture: give both or neither "
                     f"(--architecture allowed: {', '.join(ARCHITECTURES)})")
    if args.hf_dir is not None:
        if os.path.abspath(args.hf_dir) in (os.path.abspath(args.save), os.path.abspath(args.load)):
            parser.error("argument --hf-dir: must differ from --load and --save")
        if os.path.lexists(args.hf_dir) and not args.force:
            parser.error(f"argument --hf-dir: {args.hf_dir!r} already exists; pass --force to replace it")

    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint deprecations
    from megatron_kha.convert import checkpoint_io
    from megatron_kha.convert.absorb import (AbsorbRefused, absorb_state_dict, baseline_config, check_absorbable)
    from megatron_kha.world import ensure_single_process_world

    hf_convert = hf_mapping = None
    if args.hf_dir is not None:
        from megatron_kha.convert import hf_convert, hf_mapping

    ensure_single_process_world()
    try:
        cfg = checkpoint_io.load_config(args.load)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"argument --load: {err}")
    try:
        check_absorbable(cfg)
    except AbsorbRefused as err:
        parser.error(f"argument --load: {err}")
    if os.path.lexists(args.save) and not args.force:
        parser.error(f"argument --save: {args.save!r} already exists; pass --force to replace it")
    if hf_mapping is not None:  # inexpressible configs (e.g. a QKV bias for llama) fail before anything is written
        try:
            hf_mapping.kha_to_hf_config(baseline_config(cfg), args.architecture)
        except hf_mapping.ConversionError as err:
            parser.error(f"argument --architecture: {args.architecture} cannot hold this model: {err}")
    max_tokens = cfg.get("max_sequence_length", 64)
    n_tokens = min(64, max_tokens) if args.sample_tokens is None else args.sample_tokens
    if n_tokens > max_tokens and cfg.get("position_embedding_type") == "learned_absolute":
        parser.error(f"argument --sample-tokens: {n_tokens} is invalid; allowed: 0..{max_tokens} (max_sequence_length)")

    source, cfg = checkpoint_io.load_model_checkpoint(args.load)
    new_state = absorb_state_dict(source.state_dict(), cfg)
    new_cfg = baseline_config(cfg)
    plain, _ = checkpoint_io.build_model(new_cfg)
    plain.load_state_dict(new_state, strict=True)
    checkpoint_io.save_model_checkpoint(plain, new_cfg, args.save, force=args.force)

    what = (f"KHA-Linear (targets {cfg['kha_targets']})" if cfg["attention_variant"] == "kha"
            else f"MEA (h' = h = {cfg['num_query_groups']}, no head norm)")
    print(f"absorbed {what}: {args.load} -> {args.save} (attention_variant='baseline')")
    if hf_mapping is not None:
        state = {k: v for k, v in plain.state_dict().items() if torch.is_tensor(v)}
        hf_state, hf_config = hf_mapping.megatron_to_hf(state, new_cfg, args.architecture)
        hf_convert.write_hf_dir(hf_state, hf_config, args.hf_dir, force=args.force)
        print(f"wrote Hugging Face {args.architecture} safetensors to {args.hf_dir}")
    if n_tokens > 0:
        diff = max_logit_diff(source, plain, n_tokens, args.seed)
        print(f"max abs logit difference on {n_tokens} random tokens: {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
