#!/usr/bin/env python
"""Upcycle a plain (baseline) checkpoint into KHA or MEA with identity-initialised new parameters.

    python tools/upcycle.py --load SRC --save DST --variant kha [--kha-targets v] [--kha-type linear]
    python tools/upcycle.py --load SRC --save DST --variant mea [--mea-head-norm]
    (--force, --sample-tokens N, --seed S; --hf-dir HF (llama/qwen2/qwen3 safetensors, read with
     megatron_kha.convert.hf_convert / hf_mapping) instead of --load)

SRC: attention_variant='baseline' checkpoint written with megatron_kha.convert.checkpoint_io.
DST: the same weights with knocking maps T = I (KHA-MLP: U = D = I, G = 0) or MEA compositions
A_K = A_V = I (h' = h): the logits are unchanged before training. --mea-head-norm adds the head-wise
output RMSNorm (scale 1), which is not an identity: the logits change (a warning says so).
Prints the max abs logit difference between SRC and DST on N random tokens.
"""
import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upcycle.py",
        description="Turn a plain checkpoint into KHA or MEA (h' = h) with identity-initialised new parameters.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", metavar="DIR", help="source checkpoint directory (attention_variant='baseline')")
    src.add_argument("--hf-dir", metavar="DIR",
                     help="source Hugging Face llama/qwen2/qwen3 directory (config.json + safetensors) instead of --load")
    p.add_argument("--save", required=True, metavar="DIR", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--variant", required=True, choices=("kha", "mea"), help="attention variant of the result")
    p.add_argument("--kha-targets", default="v", metavar="QKV",
                   help="--variant kha: subset of q, k, v that get a knocking map (default: v)")
    p.add_argument("--kha-type", default="linear", choices=("linear", "mlp"),
                   help="--variant kha: knocking map type (default: linear; mlp needs --kha-targets v)")
    p.add_argument("--mea-head-norm", action="store_true",
                   help="--variant mea: add the head-wise output RMSNorm (changes the logits; off by default)")
    p.add_argument("--force", action="store_true", help="replace an existing --save directory")
    p.add_argument("--sample-tokens", type=int, default=None, metavar="N",
                   help="random tokens for the logit comparison (default: min(64, max_sequence_length); 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample tokens (default 0)")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    source_dir = args.load if args.load is not None else args.hf_dir
    source_flag = "--load" if args.load is not None else "--hf-dir"
    from megatron_kha.convert.verify import check_load_save_args, max_logit_diff

    check_load_save_args(parser, source_dir, args.save, args.sample_tokens, load_flag=source_flag)
    if args.variant == "mea" and (args.kha_targets != "v" or args.kha_type != "linear"):
        parser.error("argument --kha-targets/--kha-type: only with --variant kha")
    if args.variant == "kha" and args.mea_head_norm:
        parser.error("argument --mea-head-norm: only with --variant mea")
    from megatron_kha.config import normalize_kha_targets

    if args.variant == "kha":
        try:
            targets = normalize_kha_targets(args.kha_targets)
        except ValueError as err:
            parser.error(f"argument --kha-targets: {err}")
        if args.kha_type == "mlp" and targets != "v":
            parser.error(f"argument --kha-targets: {args.kha_targets!r} is invalid with --kha-type mlp "
                         "(KHA-MLP acts on values only); allowed: v")
    if os.path.lexists(args.save) and not args.force:
        parser.error(f"argument --save: {args.save!r} already exists; pass --force to replace it")

    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint deprecations
    from megatron_kha.convert import checkpoint_io
    from megatron_kha.convert.upcycle import upcycle_state_dict
    from megatron_kha.world import ensure_single_process_world

    ensure_single_process_world()
    if args.load is not None:
        try:
            cfg = checkpoint_io.load_config(args.load)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"argument --load: {err}")
        if cfg.get("attention_variant", "baseline") != "baseline":
            parser.error(f"argument --load: attention_variant={cfg.get('attention_variant')!r}; upcycling starts "
                         "from a plain checkpoint; allowed: 'baseline' (tools/absorb.py makes one from KHA-Linear/MEA)")
        source, cfg = checkpoint_io.load_model_checkpoint(args.load)
    else:
        from megatron_kha.convert import hf_convert, hf_mapping
        try:
            hf_state, hf_config = hf_convert.read_hf_dir(args.hf_dir, progress=False)
            state, cfg = hf_mapping.hf_to_megatron(hf_state, hf_config)
        except hf_mapping.ConversionError as err:
            parser.error(f"argument --hf-dir: {err}")
        source, _ = checkpoint_io.build_model(cfg)
        result = source.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            parser.error(f"argument --hf-dir: converted weights do not match the model: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")

    max_tokens = cfg.get("max_sequence_length", 64)
    n_tokens = min(64, max_tokens) if args.sample_tokens is None else args.sample_tokens
    if n_tokens > max_tokens and cfg.get("position_embedding_type") == "learned_absolute":
        parser.error(f"argument --sample-tokens: {n_tokens} is invalid; allowed: 0..{max_tokens} (max_sequence_length)")
    variant = dict(variant=args.variant)
    if args.variant == "kha":
        variant.update(kha_targets=targets, kha_type=args.kha_type)
    else:
        variant.update(mea_head_norm=args.mea_head_norm)
        if args.mea_head_norm:
            print("WARNING: --mea-head-norm adds a head-wise RMSNorm on each head's output; it is not an identity, "
                  "so the upcycled model's logits differ from the source's until it is trained", file=sys.stderr)
    try:
        model, new_cfg = upcycle_state_dict(source.state_dict(), cfg, **variant)
    except ValueError as err:
        parser.error(f"argument {source_flag}: {err}")
    checkpoint_io.save_model_checkpoint(model, new_cfg, args.save, force=args.force)

    if args.variant == "kha":
        what = f"KHA-{args.kha_type} (targets {targets}, identity init)"
    else:
        what = f"MEA (h' = h = {cfg['num_query_groups']}, A = I, head norm {'on' if args.mea_head_norm else 'off'})"
    print(f"upcycled {source_dir} -> {args.save}: {what}")
    if n_tokens > 0:
        diff = max_logit_diff(source, model, n_tokens, args.seed)
        print(f"max abs logit difference on {n_tokens} random tokens: {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
