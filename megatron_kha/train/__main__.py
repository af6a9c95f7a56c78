"""`python -m megatron_kha.train [flags]`, alone or under torchrun. Flags: megatron_kha/train/args.py."""
import sys

from megatron_kha.train.args import parse_args


def main(argv=None) -> int:
    args = parse_args(argv)  # bad flags fail here, before any process group or model exists
    from megatron_kha.observe.nonfinite import NonFiniteError
    from megatron_kha.train.loop import train

    try:
        train(args)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
