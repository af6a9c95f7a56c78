#!/usr/bin/env python
"""Tokenize text files or JSON lines into a Megatron IndexedDataset (.bin/.idx) for --data-path.

    python tools/preprocess_data.py --input 'corpus/**/*.txt' --output-prefix data/corpus
    python tools/preprocess_data.py --input a.jsonl b.jsonl --json-keys text --output-prefix data/ab \
        --tokenizer /path/to/hf-tokenizer-dir --workers 8

A .jsonl/.json/.ndjson file holds one JSON object per line: one document per record (several
--json-keys write one dataset per key, "<prefix>_<key>"). Any other file is one document.
Each document ends with the tokenizer's end-of-document id. Output is written under temporary
names and renamed at the end; an existing prefix is refused unless --force.
Then train with:  python -m megatron_kha.train --data-path data/corpus --tokenizer <same> ...
"""
import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess_data.py",
                                description="Text / JSON lines -> Megatron IndexedDataset (.bin/.idx).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="input files or globs (quote globs; ** recurses)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|DIR",
                   help="'bytes' (default) or a Hugging Face tokenizer directory on disk")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="keys of the JSON records to tokenize (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing --output-prefix")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from megatron_kha.train.preprocess import PreprocessError, preprocess

    try:
        prefixes = preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer, json_keys=args.json_keys,
                              workers=args.workers, force=args.force)
    except PreprocessError as err:
        parser.error(str(err))  # exits with status 2
    print("--data-path " + " ".join(prefixes.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
